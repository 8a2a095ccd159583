"""Experts on demand (run_server --offload_experts): a server keeps a bounded number of its MoE blocks'
experts resident and reads the others from the checkpoint when a token is routed to them.

Why: an MoE model's experts are most of its weights (Mixtral 8x7B: 45B of 47B parameters), but each
token uses only its top k of them per block. A small server can host a span of an MoE model with a
fraction of the experts' memory, paying a read from the checkpoint (the OS page cache after the first
one) for each expert that is not resident.

How (ProMoE's idea, with its two parts measured apart, `stats()`):
- an LRU of resident experts, `capacity` of them over the whole span; a call holds the experts it
  runs until it ends, so memory exceeds the capacity by at most one block's chosen experts;
- a prefetch: while block i computes, the router of block i + 1 is applied to block i's hidden state
  (normalized by block i + 1's own norm), and the experts it picks are read on a background thread.
  The residual stream changes little from one block to the next, so the guess is often right; a
  wrong guess costs a read that the LRU may still use later.

Reads go through safetensors' memory-mapped files, kept open (one handle per shard). Weights are
converted to the span's dtype as they are read; gate and up stay separate (no concatenation copy).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import Tensor

from petals_like.models.linear import linear

Key = tuple[int, int]  # (model block index, expert index)


@dataclass
class StoreStats:
    uses: int = 0  # experts run
    resident_hits: int = 0  # ... found resident (including those a prefetch had read)
    prefetch_waits: int = 0  # ... found still being read by a prefetch (waited for it)
    misses: int = 0  # ... read on the spot
    predicted: int = 0  # next-block experts the prefetch guessed
    predicted_used: int = 0  # ... that the next block then ran
    next_block_uses: int = 0  # experts run by blocks that had a guess made for them
    reads: int = 0
    read_seconds: float = 0.0

    def summary(self) -> dict:
        """The counters, and the rates they give."""
        return dict(asdict(self), **rates(self))


def rates(counts: StoreStats) -> dict:
    uses = max(counts.uses, 1)
    return {
        "hit_rate": round(counts.resident_hits / uses, 3),
        "prefetch_wait_rate": round(counts.prefetch_waits / uses, 3),
        "miss_rate": round(counts.misses / uses, 3),
        "prefetch_precision": round(counts.predicted_used / max(counts.predicted, 1), 3),
        "prefetch_recall": round(counts.predicted_used / max(counts.next_block_uses, 1), 3),
        "read_ms_mean": round(1000 * counts.read_seconds / max(counts.reads, 1), 2),
    }


def rates_between(before: dict, after: dict) -> dict:
    """rates() of what happened between two summary() snapshots."""
    counts = StoreStats(**{f.name: after[f.name] - before.get(f.name, 0) for f in fields(StoreStats)})
    return dict(expert_uses=counts.uses, reads=counts.reads, **rates(counts))


class ExpertStore:
    """The resident experts of a span, read from `path` (a checkpoint folder) as needed.

    names(block, expert) -> the checkpoint tensor names of that expert's (gate, up, down) weights;
    weight_map: tensor name -> shard file (models/checkpoint.py's CheckpointReader.weight_map).
    """

    def __init__(
        self,
        path: Path,
        weight_map: dict[str, str],
        names: Callable[[int, int], tuple[str, str, str]],
        *,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        prefetch: bool = True,
    ):
        if capacity < 1:
            raise ValueError(f"an expert store needs room for at least one expert, got capacity={capacity}")
        self.path, self.weight_map, self.names = Path(path), weight_map, names
        self.capacity, self.dtype, self.device = capacity, dtype, device
        self.stats = StoreStats()
        self._resident: OrderedDict[Key, tuple[Tensor, Tensor, Tensor]] = OrderedDict()
        self._pending: dict[Key, Future] = {}
        self._guessed: dict[int, set[int]] = {}  # block -> experts guessed for its next call
        self._handles: dict[str, object] = {}
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()  # one reader of the shard handles at a time
        self._predictors: dict[int, tuple[Callable[[Tensor], Tensor], Tensor, int]] = {}  # block -> (norm, router, top k)
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch") if prefetch else None

    # ---- set-up ----

    def add_predictor(self, block: int, norm: Callable[[Tensor], Tensor], router: Tensor, top_k: int) -> None:
        """What predicts block `block`'s experts: its feed-forward norm and router weight."""
        self._predictors[block] = (norm, router, top_k)

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for weights in self._resident.values() for t in weights)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._resident.clear()
            self._handles.clear()

    # ---- compute thread ----

    def acquire(self, block: int, expert: int) -> tuple[Tensor, Tensor, Tensor]:
        """The expert's (gate, up, down) weights: resident, from a prefetch under way, or read now."""
        return self._get((block, expert))

    def finish_call(self, block: int, used: set[int]) -> None:
        """Account for the guess made for this block (if any) against the experts it ran."""
        guessed = self._guessed.pop(block, None)
        if guessed is not None:
            self.stats.predicted_used += len(guessed & used)
            self.stats.next_block_uses += len(used)

    def prefetch_next(self, block: int, hidden: Tensor) -> None:
        """Guess block + 1's experts from `hidden` (block's residual stream) and read them in the background."""
        predictor = self._predictors.get(block + 1)
        if predictor is None or self._prefetcher is None:
            return
        norm, router, top_k = predictor
        with torch.no_grad():
            chosen = torch.topk(linear(norm(hidden), router), top_k, dim=-1).indices.unique().tolist()
        self._guessed[block + 1] = set(chosen)
        self.stats.predicted += len(chosen)
        with self._lock:
            for expert in chosen:
                key = (block + 1, expert)
                if key in self._resident:
                    self._resident.move_to_end(key)  # about to be used: keep it
                elif key not in self._pending:
                    self._pending[key] = self._prefetcher.submit(self._read_into_cache, key)

    def _get(self, key: Key) -> tuple[Tensor, Tensor, Tensor]:
        self.stats.uses += 1
        with self._lock:
            weights = self._resident.get(key)
            if weights is not None:
                self._resident.move_to_end(key)
                self.stats.resident_hits += 1
                return weights
            pending = self._pending.get(key)
        if pending is not None:
            self.stats.prefetch_waits += 1
            return pending.result()
        self.stats.misses += 1
        weights = self._read(key)
        self._insert(key, weights)
        return weights

    # ---- reading ----

    def _read_into_cache(self, key: Key) -> tuple[Tensor, Tensor, Tensor]:
        try:
            weights = self._read(key)
            self._insert(key, weights)
            return weights
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def _insert(self, key: Key, weights: tuple[Tensor, Tensor, Tensor]) -> None:
        with self._lock:
            self._resident[key] = weights
            self._resident.move_to_end(key)
            while len(self._resident) > self.capacity:
                self._resident.popitem(last=False)

    def _read(self, key: Key) -> tuple[Tensor, Tensor, Tensor]:
        started = time.perf_counter()
        tensors = []
        # plain tensors even when read during an inference step: a backward pass may reuse them from the cache
        with self._read_lock, torch.inference_mode(False):
            for name in self.names(*key):
                file_name = self.weight_map[name]
                handle = self._handles.get(file_name)
                if handle is None:
                    handle = self._handles[file_name] = safe_open(str(self.path / file_name), framework="pt", device="cpu")
                tensors.append(handle.get_tensor(name).to(self.device, self.dtype))
            self.stats.reads += 1
            self.stats.read_seconds += time.perf_counter() - started
        return tuple(tensors)  # type: ignore[return-value]

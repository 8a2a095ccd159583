"""What a server announces as its throughput, and how it is measured and cached.

Unit: block-steps per second, i.e. how many tokens per second one block of this server can push
through at batch 1 (a span of n blocks decodes throughput / n tokens per second). It is what the
balancer sums per block and what routers divide a span's length by.

    throughput = min(inference block-steps/s, network tokens/s x span length)

  inference block-steps/s: decode steps at batch 1 through the loaded span, timed after a
      warm-up, times the span's length (so the figure does not depend on the span);
  forward tokens/s per block: one 128-token forward through the span (announced as forward_rps
      for training routes; not part of `throughput`);
  network tokens/s: --network_mbps (default 100 Mbit/s, a typical volunteer uplink) over the
      bytes one token's hidden state takes in and out (2 x hidden x 4 bytes): a server passes each
      token through its whole span with one transfer, hence the factor of the span length.

--throughput auto uses the measurement cached on disk for this exact setup (model block shape,
dtype, quantization, device, torch threads, torch and project versions), measuring and caching it
when there is none; eval re-measures and overwrites the cache; a number is announced as given.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from petals_like import __version__
from petals_like.models.spec import ModelSpec
from petals_like.server.batched_span import PagedRunner
from petals_like.utils.cache import cache_dir

logger = logging.getLogger(__name__)

CACHE_DIR = cache_dir()
CACHE_FILE = "throughput_v1.json"


@dataclass
class Rates:
    inference_block_steps: float  # decode steps/s at batch 1, times the blocks they went through
    forward_block_tokens: float  # forward tokens/s, times the blocks

    def throughput(self, num_blocks: int, hidden_size: int, network_mbps: float) -> float:
        network_tokens = network_mbps * 1e6 / 8 / (2 * hidden_size * 4)
        return min(self.inference_block_steps, network_tokens * num_blocks)


def cache_key(spec: ModelSpec, dtype: torch.dtype, device: torch.device, quant_type: str) -> str:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    shape = f"{spec.family}-h{spec.hidden_size}-i{spec.intermediate_size}-q{spec.num_heads}-kv{spec.num_kv_heads}"
    if spec.num_experts:
        shape += f"-e{spec.num_experts}x{spec.moe_intermediate_size}-top{spec.experts_per_token}"
    return "|".join([shape, str(dtype), quant_type, device_name, torch.__version__, __version__])


def measure(span, *, steps: int = 8, forward_tokens: int = 128) -> Rates:
    """Time decode steps and one forward pass through `span` (a BlockSpan on its device)."""
    spec, device = span.spec, next(span.parameters()).device
    dtype = next(span.parameters()).dtype
    num_blocks = len(span.blocks)
    with torch.inference_mode():
        session = PagedRunner(span, 1, steps + 2)  # the serving path: paged pool, batched span
        hidden = torch.randn(1, 1, spec.hidden_size, device=device, dtype=dtype)
        session.step(hidden)  # warm-up
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            session.step(hidden)
        _sync(device)
        inference = steps * num_blocks / max(time.perf_counter() - started, 1e-9)
        tokens = torch.randn(1, forward_tokens, spec.hidden_size, device=device, dtype=dtype)
        span(tokens[:, :8])  # warm-up
        _sync(device)
        started = time.perf_counter()
        span(tokens)
        _sync(device)
        forward = forward_tokens * num_blocks / max(time.perf_counter() - started, 1e-9)
    return Rates(inference, forward)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def get_rates(span, key: str, mode: str, cache_dir: Optional[Path] = None) -> Rates:
    """mode 'auto': the cached rates for `key`, measured and cached if missing; 'eval': measured and cached."""
    if mode not in ("auto", "eval"):
        raise ValueError(f"throughput mode must be auto, eval or a number, got {mode!r}")
    path = (cache_dir or CACHE_DIR) / CACHE_FILE
    cached = _read(path)
    if mode == "auto" and key in cached:
        try:
            rates = Rates(**cached[key])
            logger.info(f"Throughput from {path}: {rates}")
            return rates
        except TypeError:
            logger.warning(f"Ignoring a malformed throughput cache entry in {path}")
    logger.info("Measuring throughput (cached for the next start; --throughput eval re-measures)")
    rates = measure(span)
    cached[key] = asdict(rates)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)  # atomic: servers starting together never read half a file
    except OSError as e:
        logger.warning(f"Could not cache the throughput in {path}: {e}")
    return rates


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}

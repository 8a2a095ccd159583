"""What the benchmark's workloads share: timers and summaries of per-token latencies, a seeded prompt,
the bench swarm (BenchSwarm) and the serving path's block math in-process (LocalSession). It imports
no workload module."""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from petals_like.testing.local_swarm import LocalSwarm
from petals_like.utils.cache import cache_dir

BENCH_DIR = cache_dir()


def prompt(length: int, seed: int, vocab: int = 300) -> torch.Tensor:
    """A (1, length) prompt of token ids in [4, vocab), the same for the same seed."""
    return torch.randint(4, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


class TokenTimer:
    """A generate() streamer that records when each token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.started = time.perf_counter()

    def put(self, tokens: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def latencies(self) -> list[float]:
        stamps = [self.started] + self.times
        return [b - a for a, b in zip(stamps, stamps[1:])]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(latencies: list[float], skip_first: bool = True) -> dict:
    """Per-token stats over decode steps (the first token also pays for the prompt, so it is left out)."""
    decode = latencies[1:] if skip_first and len(latencies) > 1 else latencies
    return {
        "tokens_per_s": round(len(decode) / sum(decode), 2),
        "p50_ms": round(1000 * statistics.median(decode), 2),
        "p90_ms": round(1000 * percentile(decode, 0.9), 2),
        "first_token_ms": round(1000 * latencies[0], 2),
    }


class LocalSession:
    """The serving path's block math (paged pool, batched span) in-process, behind the
    InferenceSession interface generate uses."""

    def __init__(self, span, max_length: int):
        self.span = span
        self.runner = None
        self.max_length = max_length
        self.position = 0
        self.last_token_ids = None
        self.finished = None
        self.token_ids = None

    def step(self, hidden: torch.Tensor, *, pad_lens=None, token_ids=None) -> torch.Tensor:
        from petals_like.server.batched_span import PagedRunner

        if self.runner is None:
            self.runner = PagedRunner(self.span, hidden.shape[0], self.max_length, pad_lens=pad_lens)
        out = self.runner.step(hidden)
        self.position += hidden.shape[1]
        return out


def server_footprint(pid: int) -> dict:
    """Processes and resident memory of one server (its Python process and its p2pd daemon)."""
    import psutil

    root = psutil.Process(pid)
    processes = [root] + root.children(recursive=True)
    rss = sum(p.memory_info().rss for p in processes)
    return {"processes": len(processes), "rss_mib": round(rss / 2**20, 1)}


def pick_median(results: list[dict], key: str = "tokens_per_s") -> dict:
    """The run with the median `key`, plus the best value of it seen (best_<key>)."""
    ordered = sorted(results, key=lambda r: r[key])
    return dict(ordered[len(ordered) // 2], **{f"best_{key}": ordered[-1][key]}, runs=len(results))


class BenchSwarm(LocalSwarm):
    """A LocalSwarm (by default 2 servers, each half of the blocks) and a client of it in this process
    (`model`); also how long the swarm took to start and each server's footprint."""

    def __init__(
        self, model_dir: Path, server_args: list[str], spans: Optional[list[str]] = None, client_args: Optional[dict] = None
    ):
        if spans is None:
            from petals_like.models.spec import ModelSpec

            num_blocks = ModelSpec.from_pretrained(model_dir).num_blocks
            spans = [f"0:{num_blocks // 2}", f"{num_blocks // 2}:{num_blocks}"]
        super().__init__(model_dir, spans, server_args=server_args)
        self.client_args = client_args or {}
        self.model = None

    def start(self) -> BenchSwarm:
        from petals_like import AutoDistributedModelForCausalLM

        started = time.perf_counter()
        super().start()
        try:
            self.start_s = time.perf_counter() - started
            self.footprint = [server_footprint(server.pid) for server in self.servers]
            self.model = AutoDistributedModelForCausalLM.from_pretrained(
                self.model_dir, initial_peers=self.peers, torch_dtype="float32", **self.client_args
            )
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def stop(self) -> None:
        if self.model is not None:
            self.model.shutdown()
            self.model = None
        super().stop()

    def one_session(self, prompt: torch.Tensor, new_tokens: int) -> dict:
        """(a)"""
        timer = TokenTimer()
        self.model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[], streamer=timer)
        return summarize(timer.latencies())

    def prefill(self, prefill_len: int) -> float:
        """(b): seconds to run a prompt of prefill_len tokens through every block."""
        prompt = torch.randint(3, self.model.spec.vocab_size, (1, prefill_len), generator=torch.Generator().manual_seed(1))
        with self.model.inference_session(max_length=prefill_len + 1) as session:
            hidden = self.model.local.embed(prompt)
            started = time.perf_counter()
            session.step(hidden)
            return time.perf_counter() - started


def run_concurrently(count: int, fn: Callable[[int], None]) -> float:
    """fn(0..count-1) on as many threads, started together; returns the wall time."""
    barrier = threading.Barrier(count + 1)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            fn(i)
        except BaseException as e:  # reported after the join
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def server_infos(model) -> dict:
    """Every server the model can see: peer id -> its rpc_info answer (wire.InfoReply)."""
    from petals_like.wire import call_info

    async def read() -> dict:
        await model.routes.refresh(force=True)
        return {peer: await call_info(model.node.p2p, peer, timeout=10) for peer in model.routes.spans}

    return model.node.run(read(), timeout=60)


def server_counters(model) -> dict[str, tuple[int, int]]:
    """(iterations, inference tokens) of every server the model can see."""
    return {peer: (info.iterations, info.inference_tokens) for peer, info in server_infos(model).items()}


def sessions_at_once(model, count: int, prompt_len: int = 16, new_tokens: int = 64) -> dict:
    """`count` sessions started together, each a prompt_len-token prompt and new_tokens greedy tokens:
    aggregate tokens/s, p50 / p90 per decode step, and tokens per server iteration (batching)."""
    before = server_counters(model)
    timers = [TokenTimer() for _ in range(count)]

    def one(i: int) -> None:
        with model.inference_session(max_length=prompt_len + new_tokens, reuse_prefix=False) as session:
            timers[i].started = time.perf_counter()
            model.generate(prompt(prompt_len, i), max_new_tokens=new_tokens, session=session, eos_token_id=[], streamer=timers[i])

    wall = run_concurrently(count, one)
    latencies = [lat for timer in timers for lat in timer.latencies()[1:]]  # decode steps
    after = server_counters(model)
    per_iteration = [(after[p][1] - before[p][1]) / max(1, after[p][0] - before[p][0]) for p in after if p in before]
    return {
        "tokens_per_server_iteration": round(statistics.mean(per_iteration), 2) if per_iteration else None,
        "aggregate_tokens_per_s": round(count * new_tokens / wall, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p90_ms": round(1000 * percentile(latencies, 0.9), 1),
    }

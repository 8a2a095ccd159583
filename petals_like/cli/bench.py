"""python -m petals_like.cli.bench: the standard workloads, printed as JSON.

bench model: Llama family, hidden 1024, 16 layers, 16 heads / 4 KV heads, intermediate 2816,
vocab 32000, float32, on CPU. Swarm: 1 DHT + 2 servers (blocks 0:8 and 8:16) on 127.0.0.1, each
its own process, the client in this one.

  (a) one session: 16-token prompt, 128 new tokens greedy: tokens/s, p50 / p90 per-token latency
  (b) prefill of a 512-token prompt through the swarm: seconds
  (c) the same model in one process: transformers generate(), and this project's block math
      without any network: tokens/s
  (d)-(g) engine workloads, see bench_engine; (h)-(j) routing workloads, see bench_routing;
  (k), (l) quantized servers and wire formats, see bench_quant; (m) LoRA training steps vs. local
      peft, see bench_finetune; (n) direct and relayed chains over links with delay, NAT and 20 Mbit/s
      uplinks (a network test bed: needs root), see bench_network
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from petals_like.testing.local_swarm import LocalSwarm

BENCH_DIR = Path(os.environ.get("PETALS_LIKE_CACHE", Path.home() / ".cache" / "petals_like"))


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


def local_runners(model_dir: Path, prompt: torch.Tensor, new_tokens: int) -> dict[str, Callable[[], dict]]:
    """(c): transformers generate() and this project's block math, both in this process, no network."""
    from transformers import AutoModelForCausalLM

    from petals_like.client.generation import SamplingParams, generate_tokens
    from petals_like.models.checkpoint import CheckpointReader
    from petals_like.models.llama.head import LocalModules
    from petals_like.models.spec import ModelSpec
    from petals_like.server.server import load_span

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    spec = ModelSpec.from_pretrained(model_dir)
    span = load_span(model_dir, spec, 0, spec.num_blocks, torch.float32, torch.device("cpu"), progress=False)
    local = LocalModules.from_state_dict(spec, CheckpointReader(model_dir).client_state_dict(torch.float32)).eval()

    def run_hf() -> dict:
        timer = TokenTimer()
        with torch.inference_mode():
            hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=timer)
        return summarize(timer.latencies()[1:])  # transformers' streamer also receives the prompt first

    def run_ours() -> dict:
        timer = TokenTimer()
        session = LocalSession(span, prompt.shape[1] + new_tokens)
        with torch.inference_mode():
            generate_tokens(
                session,
                local.embed,
                local.logits,
                prompt,
                pad_lens=None,
                max_new_tokens=new_tokens,
                sampling=SamplingParams(),
                eos_token_ids=[],
                pad_token_id=0,
                streamer=timer,
            )
        return summarize(timer.latencies())

    return {"transformers_generate": run_hf, "block_math_no_network": run_ours}


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


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench", choices=["bench", "tiny"], help="model size (tiny = quick check)")
    parser.add_argument("--model_dir", type=Path, default=None, help="checkpoint to use (created if missing)")
    parser.add_argument(
        "--workloads",
        default="a,b,c",
        help="comma-separated subset of a..n, or 'all' (d..g: engine workloads, see bench_engine; "
        "h..j: routing, see bench_routing; k, l: quantization, see bench_quant; "
        "m: fine-tuning, see bench_finetune; n: network test bed, see bench_network)",
    )
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--prefill_len", type=int, default=512)
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds; each runner runs once per round and the median round is reported"
    )
    parser.add_argument("--server_args", default="", help="extra run_server arguments, e.g. '--num_threads 2'")
    args = parser.parse_args(argv)

    from petals_like.models.tiny import make_tiny_model
    from petals_like.utils.cli import setup_logging

    setup_logging("WARNING")
    model_dir = args.model_dir or BENCH_DIR / f"{args.preset}-llama"
    make_tiny_model(model_dir, family="llama", preset=args.preset)
    prompt = torch.randint(3, 300, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    workloads = set("abcdefghijklmn") if args.workloads == "all" else set(args.workloads.split(","))
    unknown = workloads - set("abcdefghijklmn")
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from a..n")

    report: dict = {
        "model": {"preset": args.preset, "path": str(model_dir), "dtype": "float32"},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "workload": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "prefill_len": args.prefill_len},
    }
    with contextlib.ExitStack() as stack:
        runners: dict[str, Callable[[], dict]] = {}
        swarm = None
        if workloads & {"a", "b", "d", "e", "f"}:
            swarm = stack.enter_context(BenchSwarm(model_dir, args.server_args.split()))
            report["swarm_start_s"] = round(swarm.start_s, 2)
            report["servers"] = swarm.footprint
            if "a" in workloads:
                runners["a_swarm_one_session"] = lambda: swarm.one_session(prompt, args.new_tokens)
        if "c" in workloads:
            runners.update(local_runners(model_dir, prompt, args.new_tokens))
        # rounds interleave the runners, so that a noisy moment of the machine hits all of them alike
        results: dict[str, list[dict]] = {name: [] for name in runners}
        for name, run in runners.items():
            run()  # warm-up: routes found, streams opened, allocator and caches warm
        for _ in range(args.repeats):
            for name, run in runners.items():
                results[name].append(run())
        for name, runs in results.items():
            target = report.setdefault("c_local", {}) if name != "a_swarm_one_session" else report
            target[name] = pick_median(runs)
        if "a_swarm_one_session" in results and "transformers_generate" in results:
            ratios = [
                a["tokens_per_s"] / b["tokens_per_s"]
                for a, b in zip(results["a_swarm_one_session"], results["transformers_generate"])
            ]
            report["a_vs_transformers"] = round(statistics.median(ratios), 3)
            report["a_vs_transformers_per_round"] = [round(r, 3) for r in ratios]
        if swarm is not None and "b" in workloads:
            times = [swarm.prefill(args.prefill_len) for _ in range(args.repeats + 1)][1:]
            report["b_swarm_prefill"] = {
                "tokens": args.prefill_len,
                "seconds": round(statistics.median(times), 3),
                "best_seconds": round(min(times), 3),
            }
        if swarm is not None and workloads & {"d", "e", "f"}:
            from petals_like.cli import bench_engine

            if "d" in workloads:
                report["d_concurrent_sessions"] = bench_engine.concurrent_sessions(swarm.model, rounds=args.repeats)
            if "e" in workloads:
                report["e_decode_during_prefill"] = bench_engine.decode_during_prefill(swarm.model)
            if "f" in workloads:
                report["f_shared_prefix"] = bench_engine.shared_prefix(swarm.model)
    if "g" in workloads:
        from petals_like.cli import bench_engine

        with BenchSwarm(model_dir, args.server_args.split() + ["--kv_cache_tokens", "4096"]) as small:
            report["g_sessions_in_4096_token_pool"] = bench_engine.sessions_in_pool(small.model)
    if workloads & {"h", "i", "j"}:
        from petals_like.cli import bench_routing

        server_args = args.server_args.split()
        if "h" in workloads:
            report["h_push_latency"] = bench_routing.push_latency(model_dir, server_args)
        if "i" in workloads:
            report["i_failover_recovery"] = bench_routing.failover_recovery(model_dir, server_args)
        if "j" in workloads:
            report["j_forward_spread"] = bench_routing.forward_spread(model_dir, server_args)
    if workloads & {"k", "l"}:
        from petals_like.cli import bench_quant

        if "k" in workloads:
            report["k_quantized_servers"] = bench_quant.quantized_servers(model_dir, args.server_args.split())
        if "l" in workloads:
            report["l_wire_formats"] = bench_quant.wire_formats(model_dir, args.server_args.split())
    if "m" in workloads:
        from petals_like.cli import bench_finetune

        report["m_training_step"] = bench_finetune.training_steps(model_dir, args.server_args.split())
    if "n" in workloads:
        from petals_like.cli import bench_network

        report["n_network_chains"] = bench_network.network_chains(
            args.preset, args.server_args.split(), model_dir=args.model_dir, prefill_len=args.prefill_len, rounds=args.repeats
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

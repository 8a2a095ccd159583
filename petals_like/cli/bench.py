"""python -m petals_like.cli.bench: the standard workloads, printed as JSON.

bench model: Llama family, hidden 1024, 16 layers, 16 heads / 4 KV heads, intermediate 2816,
vocab 32000, float32, on CPU. Swarm: 1 DHT + 2 servers (blocks 0:8 and 8:16) on 127.0.0.1, each
its own process, the client in this one.

  (a) one session: 16-token prompt, 128 new tokens greedy: tokens/s, p50 / p90 per-token latency
  (b) prefill of a 512-token prompt through the swarm: seconds
  (c) the same model in one process: transformers generate(), and this project's block math
      without any network: tokens/s
  (d)-(g) engine workloads, see petals_like/bench/engine.py; (h)-(j) routing workloads, see
  petals_like/bench/routing.py; (k), (l) quantized servers and wire formats, see petals_like/bench/quant.py;
  (m) LoRA training steps vs. local peft, see petals_like/bench/finetune.py; (n) direct and relayed chains
  over links with delay, NAT and 20 Mbit/s uplinks (a network test bed: needs root), see
  petals_like/bench/network.py; (o) the OpenAI-compatible API vs the Python client, see
  petals_like/bench/api.py; (q) perplexity of the lossy formats, see petals_like/bench/quality.py; (r) a
  mixture-of-experts model: batching by expert and experts on demand, see petals_like/bench/moe.py; (s)
  speculative generation over a slow client link, see petals_like/bench/speculative.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Callable, Optional

import torch

from petals_like.bench.harness import BENCH_DIR, BenchSwarm, pick_median
from petals_like.bench.workloads import SHARED_SWARM, WORKLOADS, Bench
from petals_like.models.tiny import PRESETS


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench", choices=sorted(PRESETS), help="model size (tiny = quick check)")
    parser.add_argument("--model_dir", type=Path, default=None, help="checkpoint to use (created if missing)")
    parser.add_argument(
        "--workloads",
        default="a,b,c",
        help="comma-separated subset of a..s, or 'all' (d..g: engine workloads, see petals_like/bench/engine.py; "
        "h..j: routing, see routing.py; k, l: quantization, see quant.py; "
        "m: fine-tuning, see finetune.py; n: network test bed, see network.py; o: the OpenAI API, see api.py; "
        "q: perplexity of the lossy formats on the trained reference model, see quality.py; "
        "r: a mixture-of-experts model, see moe.py; s: speculative generation, see speculative.py)",
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
    letters = set(WORKLOADS) if args.workloads == "all" else set(args.workloads.split(","))
    unknown = letters - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {min(WORKLOADS)}..{max(WORKLOADS)}")
    selected = [w for w in WORKLOADS.values() if w.letter in letters]
    bench = Bench(
        preset=args.preset,
        model_dir=model_dir,
        asked_model_dir=args.model_dir,
        server_args=args.server_args.split(),
        prompt=prompt,
        new_tokens=args.new_tokens,
        prefill_len=args.prefill_len,
        repeats=args.repeats,
    )

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
        if any(w.needs == SHARED_SWARM for w in selected):
            bench.swarm = stack.enter_context(BenchSwarm(model_dir, bench.server_args))
            report["swarm_start_s"] = round(bench.swarm.start_s, 2)
            report["servers"] = bench.swarm.footprint
        # (report key, runner name or None for a workload's only runner) -> runner
        runners: dict[tuple[str, Optional[str]], Callable[[], dict]] = {}
        for workload in (w for w in selected if w.rounds):
            made = workload.run(bench)
            if callable(made):
                runners[(workload.key, None)] = made
            else:
                runners.update({(workload.key, name): run for name, run in made.items()})
        # rounds interleave the runners, so that a noisy moment of the machine hits all of them alike
        results: dict[tuple[str, Optional[str]], list[dict]] = {slot: [] for slot in runners}
        for run in runners.values():
            run()  # warm-up: routes found, streams opened, allocator and caches warm
        for _ in range(args.repeats):
            for slot, run in runners.items():
                results[slot].append(run())
        for (key, name), runs in results.items():
            if name is None:
                report[key] = pick_median(runs)
            else:
                report.setdefault(key, {})[name] = pick_median(runs)
        swarm_runs = results.get((WORKLOADS["a"].key, None))
        hf_runs = results.get((WORKLOADS["c"].key, "transformers_generate"))
        if swarm_runs is not None and hf_runs is not None:
            ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(swarm_runs, hf_runs)]
            report["a_vs_transformers"] = round(statistics.median(ratios), 3)
            report["a_vs_transformers_per_round"] = [round(r, 3) for r in ratios]
        for workload in (w for w in selected if not w.rounds and w.needs == SHARED_SWARM):
            report[workload.key] = workload.run(bench)
    bench.swarm = None
    for workload in (w for w in selected if not w.rounds and w.needs != SHARED_SWARM):
        report[workload.key] = workload.run(bench)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

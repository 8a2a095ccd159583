"""(t) Per-token overhead on a small model: what the swarm adds where compute is only a few ms.

The anchor model (`make_tiny_model --preset anchor`: Llama, hidden 512 x 8 blocks, GQA 8/2 heads,
32000-token vocabulary, float32) on 2 servers (0:4, 4:8) and the client, all on 127.0.0.1. One
session decodes `new_tokens` tokens with one generate() call per token (as a chat front end
drives it), and the same session length runs through transformers' generate() in this process;
rounds interleave the two, and the medians are reported with the median of the per-round ratios.

The per-token timeline splits one generate() call (medians over its decode calls, ms):
- client_head: the LM head pass (client/head_batcher.py);
- client_other: the rest of the client's work outside the trip through the chain: embedding,
  sampling, generate()'s own work and its hand-offs to the node's event loop and the head's thread;
- server_i_blocks: the scheduler iterations that ran the step on server i (wire.StepReply.iterations_s);
- server_i_other: the rest of the server's time on the step, from its session taking the step to
  its answer leaving: the hand-off to the scheduler thread and back, the event loop, and on a server
  that pushes, the push to the next one (whose acknowledgement overlaps the next server's work);
- crossings: the rest of the trip (p2pd daemons and their sockets, the event loops' reads and writes).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from petals_like.bench.harness import BENCH_DIR, BenchSwarm, TokenTimer

ANCHOR_SPANS = ["0:4", "4:8"]


def per_token_overhead(
    server_args: list[str], new_tokens: int = 64, rounds: int = 3, prompt_len: int = 16, model_dir: Optional[Path] = None
) -> dict:
    """model_dir: another 8-block checkpoint instead of the anchor (tests)."""
    from transformers import AutoModelForCausalLM

    from petals_like.models.spec import ModelSpec
    from petals_like.models.tiny import make_tiny_model

    if model_dir is None:
        model_dir = make_tiny_model(BENCH_DIR / "anchor-llama", family="llama", preset="anchor")
    spec = ModelSpec.from_pretrained(model_dir)
    prompt = torch.randint(3, 300, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def transformers_rate() -> float:
        timer = TokenTimer()
        with torch.inference_mode():
            hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=timer)
        return 1 / statistics.median(timer.latencies()[2:])  # its streamer gets the prompt first, then token 1

    rows: list[dict] = []
    with BenchSwarm(model_dir, server_args, spans=ANCHOR_SPANS) as swarm:
        model = swarm.model

        def swarm_calls() -> dict:
            calls, trips, heads = [], [], []
            with model.inference_session(max_length=prompt_len + new_tokens) as session:
                for i in range(new_tokens):
                    started = time.perf_counter()
                    model.generate(prompt if i == 0 else None, max_new_tokens=1, session=session)
                    calls.append(time.perf_counter() - started)
                    trips.append(list(session.last_trip))
                    heads.append(model.head_batcher.last_pass_s)
            # decode calls only (the first runs the prompt)
            return {"calls": calls[1:], "trips": trips[1:], "heads": heads[1:]}

        for r in range(rounds + 1):  # round 0 warms both up
            order = [transformers_rate, swarm_calls] if r % 2 else [swarm_calls, transformers_rate]
            measured = {fn.__name__: fn() for fn in order}
            if r:
                rows.append(measured)
    results = []
    for row in rows:
        calls = row["swarm_calls"]["calls"]
        rate = 1 / statistics.median(calls)
        results.append((rate, row["transformers_rate"], rate / row["transformers_rate"], row["swarm_calls"]))
    ratios = [r[2] for r in results]
    median_round = sorted(results, key=lambda r: r[2])[len(results) // 2]
    return {
        "model": {"path": str(model_dir), "hidden": spec.hidden_size, "blocks": spec.num_blocks, "servers": ANCHOR_SPANS},
        "swarm_tokens_per_s": round(median_round[0], 2),
        "transformers_tokens_per_s": round(median_round[1], 2),
        "vs_transformers": round(statistics.median(ratios), 3),
        "vs_transformers_per_round": [round(r, 3) for r in ratios],
        "timeline_ms": _timeline(**median_round[3]),
    }


def _timeline(calls: list[float], trips: list[list], heads: list[float]) -> dict:
    """Medians (ms) of each part of a generate() call; see the module docstring."""
    whole = [trip[-1][2] for trip in trips]
    client = [c - w for c, w in zip(calls, whole)]
    parts: dict[str, list[float]] = {
        "generate_call": calls,
        "client_head": heads,
        "client_other": [c - h for c, h in zip(client, heads)],
    }
    for i in range(len(trips[0])):
        parts[f"server_{i + 1}_blocks"] = [trip[i][1].iterations_s for trip in trips]
        parts[f"server_{i + 1}_other"] = [trip[i][1].compute_s - trip[i][1].iterations_s for trip in trips]
    parts["crossings"] = [w - sum(reply.compute_s for _, reply, _ in trip) for w, trip in zip(whole, trips)]
    return {name: round(1000 * statistics.median(values), 2) for name, values in parts.items()}

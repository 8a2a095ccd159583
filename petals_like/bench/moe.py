"""(r) a mixture-of-experts model on the bench swarm: batching by expert and experts on demand.

The model: Mixtral-shaped (8 experts, top 2) on the bench preset (hidden 1024, 16 blocks, 16 / 4
heads), each expert of intermediate size 1408 (half the dense bench MLP's, so the checkpoint stays at
2.2 GB in float32); servers 0:8 and 8:16. Two swarms: every expert resident, and
`--offload_experts 0.25` (a quarter of each server's experts resident, the rest read from the
checkpoint on demand, models/expert_store.py). For each:
- one session (16-token prompt, 64 new tokens greedy) and 16 sessions at once (32 tokens each):
  tokens/s;
- from the servers' rpc_info (models/moe.span_expert_stats): expert products per server iteration
  in the 16-session run, grouped by expert as the servers run them and token by token (the tokens x
  top-k products that routing each token alone would run);
- resident expert bytes per server and the servers' resident memory; with offloading, the store's
  hit rate and how often the next block's guess was right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from petals_like.bench.harness import BENCH_DIR, BenchSwarm, prompt, server_footprint, server_infos, sessions_at_once
from petals_like.models.expert_store import rates_between

SETUPS = {"all_resident": [], "quarter_resident": ["--offload_experts", "0.25"]}
EXPERT_INTERMEDIATE = {"bench": 1408}  # the tiny preset keeps its own


def moe_model(preset: str) -> Path:
    from petals_like.models.tiny import make_tiny_model

    overrides = {"intermediate_size": EXPERT_INTERMEDIATE[preset]} if preset in EXPERT_INTERMEDIATE else {}
    return make_tiny_model(BENCH_DIR / f"{preset}-mixtral", family="mixtral", preset=preset, **overrides)


def _expert_counters(model) -> dict[str, dict]:
    return {peer: dict(info.experts, iterations=info.iterations) for peer, info in server_infos(model).items()}


def moe_servers(preset: str, server_args: list[str], new_tokens: int = 64, model_dir: Optional[Path] = None) -> dict:
    """(r); model_dir: another MoE checkpoint than the preset's Mixtral-shaped one."""
    model_dir = model_dir or moe_model(preset)
    results: dict = {"model": str(model_dir)}
    for setup, args in SETUPS.items():
        with BenchSwarm(model_dir, server_args + args) as swarm:
            model = swarm.model
            model.generate(prompt(8, 99), max_new_tokens=4, eos_token_id=[])  # warm-up: routes, streams
            first = _expert_counters(model)
            one = swarm.one_session(prompt(16, 7), new_tokens)
            before = _expert_counters(model)
            many = sessions_at_once(model, 16, new_tokens=32)
            after = _expert_counters(model)
            grouped, token_by_token, iterations = 0, 0, 0
            for peer, end in after.items():
                begin = before.get(peer, {})
                grouped += end["expert_products"] - begin.get("expert_products", 0)
                token_by_token += end["routed_tokens"] - begin.get("routed_tokens", 0)
                iterations += end["iterations"] - begin.get("iterations", 0)
            entry = {
                "one_session_tokens_per_s": one["tokens_per_s"],
                "one_session_p50_ms": one["p50_ms"],
                "sessions_16_tokens_per_s": many["aggregate_tokens_per_s"],
                "sessions_16_vs_one": round(many["aggregate_tokens_per_s"] / one["tokens_per_s"], 2),
                "tokens_per_server_iteration": many["tokens_per_server_iteration"],
                "expert_products_per_server_iteration": round(grouped / max(iterations, 1), 1),
                "expert_products_per_server_iteration_token_by_token": round(token_by_token / max(iterations, 1), 1),
                "resident_expert_bytes_per_server": [end["resident_expert_bytes"] for end in after.values()],
                "server_rss_mib": [server_footprint(server.pid)["rss_mib"] for server in swarm.servers],
            }
            if any("store" in end for end in after.values()):  # per server: the one-session run, then the 16 sessions
                entry["expert_store_one_session"] = [
                    rates_between(first[peer]["store"], before[peer]["store"]) for peer in after if peer in first
                ]
                entry["expert_store_16_sessions"] = [
                    rates_between(before[peer]["store"], after[peer]["store"]) for peer in after if peer in before
                ]
            results[setup] = entry
    full, offloaded = results["all_resident"], results["quarter_resident"]
    results["offload_vs_all_resident"] = {
        "resident_expert_bytes": round(
            sum(offloaded["resident_expert_bytes_per_server"]) / sum(full["resident_expert_bytes_per_server"]), 3
        ),
        "one_session_tokens_per_s": round(offloaded["one_session_tokens_per_s"] / full["one_session_tokens_per_s"], 3),
        "sessions_16_tokens_per_s": round(offloaded["sessions_16_tokens_per_s"] / full["sessions_16_tokens_per_s"], 3),
    }
    return results

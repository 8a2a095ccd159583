"""The benchmark's routing, quantization and mixture-of-experts workloads run end to end on tiny models. Speeds are
not checked here (`python -m petals_like.cli.bench` reports them); what is checked is what the
numbers must satisfy whatever the machine: the report's layout, the bytes each wire format puts on
the wire, lower bounds set by injected link delays, and errors that exist exactly where a format
loses precision. They drive the client through patched streams and real subprocess swarms, so a
changed signature or span layout breaks them unless something runs them."""

from __future__ import annotations

from pathlib import Path

from petals_like.bench import overhead as bench_overhead
from petals_like.bench import routing as bench_routing
from petals_like.bench.engine import multiplexed_sessions
from petals_like.bench.harness import BenchSwarm
from petals_like.models.spec import ModelSpec


def test_push_latency_and_failover_workloads_run_on_the_tiny_model(tiny_model: Path):
    push = bench_routing.push_latency(tiny_model, [], new_tokens=8, rounds=1)
    assert set(push) == {"loopback", "client_rtt_20ms"}
    for link in push.values():
        assert set(link) == {"push", "client_relays", "p50_ratio_push_vs_relay"}
        for mode in ("push", "client_relays"):
            assert set(link[mode]) == {"p50_ms", "p90_ms"}
            assert link[mode]["p50_ms"] <= link[mode]["p90_ms"]
        assert link["p50_ratio_push_vs_relay"] == round(link["push"]["p50_ms"] / link["client_relays"]["p50_ms"], 3)
    # 10 ms are added to every message the client sends and to every one it reads: with the client
    # relaying, each token crosses the client's link twice per server of the 3-server chain
    delayed = push["client_rtt_20ms"]
    assert delayed["client_relays"]["p50_ms"] >= 3 * 20
    assert delayed["push"]["p50_ms"] >= 20  # in at the first server, out of the last

    failover = bench_routing.failover_recovery(tiny_model, [], new_tokens=24, kill_after=8)
    assert set(failover) == {"failovers", "failover_step_ms", "normal_step_ms", "recovery_s", "tokens_replayed"}
    assert failover["failovers"] == 1  # the middle server was killed mid-generation and replaced once
    # the replacement rebuilt its cache from everything its span had seen: the 16-token prompt and at
    # least the kill_after steps before the kill, at most every step but the last
    assert 16 + 8 <= failover["tokens_replayed"] <= 16 + 24 - 1


def test_quantization_workloads_run_on_the_tiny_model(tiny_model: Path):
    """(k) and (l) end to end: every setup and wire format reports, float32 is the exact reference,
    each wire format sends the bytes its width implies, the lossy ones (and only they) move the
    results, and the byte and weight ratios come out of the formats' sizes. int4 cannot take the
    tiny model's 172-wide down projection: the bench reports the refusal instead of numbers."""
    from petals_like.bench import quant as bench_quant

    hidden = ModelSpec.from_pretrained(tiny_model).hidden_size
    prefill = 64
    wire = bench_quant.wire_formats(tiny_model, [], prefill_len=prefill)
    assert set(wire) == {"float32", "float16", "bfloat16", "int8", "bound_for_1pct_logits"}
    # bytes per value of each format; int8 adds a float16 scale per row (token)
    row_bytes = {"float32": 4 * hidden, "float16": 2 * hidden, "bfloat16": 2 * hidden, "int8": hidden + 2}
    for name, size in row_bytes.items():
        assert wire[name]["bytes_per_decode_step"] == size, name
        assert wire[name]["bytes_per_prefill"] == prefill * size, name
        assert wire[name]["step_bytes_vs_float32"] == round(size / row_bytes["float32"], 3)
        assert wire[name]["hops"] == 3  # client -> 2 spans -> client
    assert wire["float32"]["logits_rel_error"] == 0 and wire["float32"]["one_hop_hidden_rel_error"] == 0
    for name in ("float16", "bfloat16", "int8"):
        assert wire[name]["one_hop_hidden_rel_error"] > 0 and wire[name]["logits_rel_error"] > 0, name
    # fewer mantissa bits, more error: float16 (11) < bfloat16 (8) < int8 (7 and a sign, one scale per row)
    errors = [wire[name]["one_hop_hidden_rel_error"] for name in ("float16", "bfloat16", "int8")]
    assert errors == sorted(errors)
    bound = wire["bound_for_1pct_logits"]
    assert bound["amplification"] == wire["float16"]["amplification"]
    # a lower bound: no format keeps the logits within 1% with fewer bits per value than it says
    for name, size in row_bytes.items():
        if wire[name]["logits_rel_error"] <= 0.01:
            assert 8 * size / hidden >= bound["min_bits_per_value"], name

    servers = bench_quant.quantized_servers(tiny_model, [], new_tokens=4)
    assert set(servers) == {"float32", "bfloat16", "int8", "int4", "nf4"}
    assert set(servers.pop("int4")) == {"refused"}
    keys = {
        "weight_bytes_per_block",
        "one_session_tokens_per_s",
        "one_session_p50_ms",
        "sessions_16_tokens_per_s",
        "sessions_16_p50_ms",
        "prefill_512_s",
        "hidden_rel_error",
        "logits_rel_error",
        "server_rss_mib",
        "weight_bytes_vs_bfloat16",
        "one_session_vs_bfloat16",
    }
    for setup, entry in servers.items():
        assert set(entry) == keys, setup
        assert len(entry["server_rss_mib"]) == 2, setup  # one per server of the swarm
    assert servers["float32"]["hidden_rel_error"] == servers["float32"]["logits_rel_error"] == 0
    for setup in ("bfloat16", "int8", "nf4"):  # the servers really run the setup: their outputs move
        assert servers[setup]["hidden_rel_error"] > 0 and servers[setup]["logits_rel_error"] > 0, setup
    bf16 = servers["bfloat16"]["weight_bytes_per_block"]
    assert servers["float32"]["weight_bytes_per_block"] == 2 * bf16
    assert servers["bfloat16"]["weight_bytes_vs_bfloat16"] == servers["bfloat16"]["one_session_vs_bfloat16"] == 1
    assert servers["nf4"]["weight_bytes_per_block"] <= 0.3 * bf16 and servers["int8"]["weight_bytes_per_block"] <= 0.55 * bf16


def test_mixture_of_experts_workload_runs_on_a_tiny_mixtral(make_model):
    """(r) end to end: both setups report, grouping by expert runs fewer expert products than routing
    token by token (at most the experts of every block per iteration), and a quarter of the experts
    resident is a quarter of the bytes, with the store's rates in [0, 1]."""
    from petals_like.bench import moe as bench_moe
    from tests.conftest import TINY_SHARD_SIZE

    path = make_model(family="mixtral", max_shard_size=TINY_SHARD_SIZE)
    spec = ModelSpec.from_pretrained(path)
    report = bench_moe.moe_servers("tiny", [], new_tokens=8, model_dir=path)
    full, quarter = report["all_resident"], report["quarter_resident"]
    blocks_per_server = spec.num_blocks // 2
    for entry in (full, quarter):
        grouped, token_by_token = (
            entry["expert_products_per_server_iteration"],
            entry["expert_products_per_server_iteration_token_by_token"],
        )
        assert 0 < grouped <= blocks_per_server * spec.num_experts and grouped < token_by_token
    assert report["offload_vs_all_resident"]["resident_expert_bytes"] == 0.25
    for run in quarter["expert_store_one_session"] + quarter["expert_store_16_sessions"]:
        assert run["expert_uses"] > 0 and all(0 <= run[k] <= 1 for k in ("hit_rate", "miss_rate", "prefetch_precision"))


def test_multiplexed_sessions_workload_counts_the_clients_messages(tiny_model: Path):
    """(p): with its own streams, a client sends each server one message per session per round (the
    first server only: it pushes to the second); with the mux, one message for all of them, plus each
    session's first step, which goes on its own stream."""
    with BenchSwarm(tiny_model, []) as swarm:
        report = multiplexed_sessions(swarm, count=4, new_tokens=8)
    assert set(report) == {"own_streams", "multiplexed"}
    assert report["own_streams"]["client_messages_per_server_per_round"] == 4
    assert report["multiplexed"]["client_messages_per_server_per_round"] <= 2 * 7 / 8 + 4 / 8
    for client in report.values():
        assert client["4_vs_one_session"] == client["vs_one_session_per_round"][0]


def test_per_token_overhead_workload_splits_each_call(tiny_model: Path):
    """(t) on the tiny model: one ratio per round, and a timeline with both servers' parts."""
    report = bench_overhead.per_token_overhead([], new_tokens=6, rounds=1, model_dir=tiny_model)
    assert len(report["vs_transformers_per_round"]) == 1
    timeline = report["timeline_ms"]
    servers = [f"server_{i}_{part}" for i in (1, 2) for part in ("blocks", "other")]
    assert set(timeline) == {"generate_call", "client_head", "client_other", *servers, "crossings"}
    assert all(timeline[part] > 0 for part in ("generate_call", "client_head", "server_1_blocks", "server_2_blocks"))
    assert timeline["client_head"] + timeline["server_1_blocks"] + timeline["server_2_blocks"] < timeline["generate_call"]

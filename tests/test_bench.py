"""The benchmark's routing and quantization workloads run end to end on the tiny model (numbers
are not checked here: speed is what `python -m petals_like.cli.bench` reports). They drive the
client through patched streams and real subprocess swarms, so a changed signature or span layout
breaks them silently unless something runs them."""

from __future__ import annotations

from pathlib import Path

from petals_like.cli import bench_routing


def test_push_latency_and_failover_workloads_run_on_the_tiny_model(tiny_model: Path):
    push = bench_routing.push_latency(tiny_model, [], new_tokens=8, rounds=1)
    assert set(push) == {"loopback", "client_rtt_20ms"}
    for link in push.values():
        assert link["push"]["p50_ms"] > 0 and link["client_relays"]["p50_ms"] > 0
    failover = bench_routing.failover_recovery(tiny_model, [], new_tokens=24, kill_after=8)
    assert failover["failovers"] == 1 and failover["tokens_replayed"] > 0


def test_quantization_workloads_run_on_the_tiny_model(tiny_model: Path):
    """(k) and (l) end to end: every setup and wire format reports, float32 is the exact reference,
    and the byte and weight ratios come out of the formats' sizes (the tiny model's matrices are
    too small for the 4-bit kernel, so its nf4 servers hold int8)."""
    from petals_like.cli import bench_quant

    wire = bench_quant.wire_formats(tiny_model, [], prefill_len=64)
    assert wire["float32"]["logits_rel_error"] == 0 and wire["float32"]["hops"] == 3
    assert wire["float16"]["step_bytes_vs_float32"] == wire["bfloat16"]["step_bytes_vs_float32"] == 0.5
    assert wire["int8"]["step_bytes_vs_float32"] < 0.3  # 64 values: 64 bytes and a float16 scale
    for name in ("float16", "bfloat16", "int8"):
        assert 0 < wire[name]["one_hop_hidden_rel_error"] and wire[name]["amplification"] > 0
    assert wire["bound_for_1pct_logits"]["min_bits_per_value"] > 0

    servers = bench_quant.quantized_servers(tiny_model, [], new_tokens=4)
    assert set(servers) == {"float32", "bfloat16", "int8", "nf4"}
    assert servers["float32"]["logits_rel_error"] == 0 and servers["bfloat16"]["weight_bytes_vs_bfloat16"] == 1
    assert servers["int8"]["weight_bytes_vs_bfloat16"] <= 0.55
    for entry in servers.values():
        assert entry["one_session_tokens_per_s"] > 0 and entry["sessions_16_p50_ms"] > 0
        assert entry["prefill_512_s"] > 0 and len(entry["server_rss_mib"]) == 2

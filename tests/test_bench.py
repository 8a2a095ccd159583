"""The benchmark's routing workloads run end to end on the tiny model (numbers are not checked here:
speed is what `python -m petals_like.cli.bench` reports). They drive the client through patched
streams and real subprocess swarms, so a changed signature or span layout breaks them silently
unless something runs them."""

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

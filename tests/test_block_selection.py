"""Block selection and the move criterion on hand-made swarm states (no network)."""

from __future__ import annotations

import pytest

from petals_like.data_structures import ServerInfo, ServerState
from petals_like.server.block_selection import block_throughputs, choose_best_start, should_move, swarm_bottleneck


def test_join_covers_uncovered_blocks_first():
    assert choose_best_start([5, 5, 0, 0, 5, 5], 2, 1.0) == 2
    # a gap too wide to close: cover as much of it as possible
    assert choose_best_start([5, 0, 0, 0, 0, 5], 2, 1.0) in (1, 2, 3)
    after = [5, 0, 0, 0, 0, 5]
    start = choose_best_start(after, 3, 1.0)
    assert start in (1, 2) and sum(1 for i in range(6) if after[i] == 0 and not start <= i < start + 3) == 1


def test_join_raises_the_bottleneck_most():
    # blocks 0..3 at 10, 4..7 at 2: a 4-block server belongs on 4..7
    assert choose_best_start([10, 10, 10, 10, 2, 2, 2, 2], 4, 3.0) == 4
    # ties (an empty swarm): the lowest start, so servers starting together fill it in order
    assert choose_best_start([0] * 8, 4, 1.0) == 0
    assert choose_best_start([1, 1, 1, 1, 0, 0, 0, 0], 4, 1.0) == 4


def test_block_throughputs_sum_each_blocks_servers():
    """What joins and moves start from: the announced throughputs per block, JOINING servers counted
    (they will serve soon), OFFLINE ones and the deciding server itself not."""
    a, b = ServerInfo(ServerState.ONLINE, 0, 4, throughput=2.0), ServerInfo(ServerState.ONLINE, 2, 6, throughput=3.0)
    joining = ServerInfo(ServerState.JOINING, 4, 8, throughput=5.0)
    offline = ServerInfo(ServerState.OFFLINE, 0, 8, throughput=7.0)
    blocks = (
        [{"a": a, "x": offline}] * 2 + [{"a": a, "b": b}] * 2 + [{"b": b, "j": joining}] * 2 + [{"j": joining, "x": offline}] * 2
    )
    assert block_throughputs(blocks) == [2, 2, 5, 5, 8, 8, 5, 5]
    assert block_throughputs(blocks, exclude="b") == [2, 2, 2, 2, 5, 5, 5, 5]
    # records of a swarm that serves only 0:4: a joining 4-block server takes 4:8
    assert choose_best_start(block_throughputs([{"a": a}] * 4 + [{}] * 4), 4) == 4


def test_join_validates_the_span_length():
    with pytest.raises(ValueError):
        choose_best_start([1, 1], 3)


def test_move_fills_a_hole_left_by_others():
    # two servers on 0:4 (5 each), nobody on 4:8: one of them should move to 4
    assert should_move([10, 10, 10, 10, 0, 0, 0, 0], 0, 4, 5.0) == 4


def test_never_move_away_from_blocks_only_we_serve():
    # we are alone on 0:4; 4:8 is uncovered, but leaving would open a gap at 0:4
    assert should_move([5, 5, 5, 5, 0, 0, 0, 0], 0, 4, 5.0) is None


def test_small_gains_do_not_justify_a_move():
    # bottleneck 8 now; moving would give min(9 - 1, ...) = 8.5 at best: below the 0.75 threshold
    state = [9, 9, 9, 9, 8, 8, 8, 8]
    assert should_move(state, 0, 4, 1.0, balance_quality=0.75) is None
    assert should_move([12, 12, 12, 12, 4, 4, 4, 4], 0, 4, 4.0, balance_quality=0.75) == 4  # 4 -> 8
    with pytest.raises(ValueError):
        should_move(state, 0, 4, 1.0, balance_quality=0.0)


def test_staying_put_when_already_best():
    assert should_move([4, 4, 4, 4, 4, 4, 4, 4], 0, 4, 2.0) is None  # moving only shifts the bottleneck
    assert swarm_bottleneck([3, 1, 2]) == 1 and swarm_bottleneck([]) == 0


def test_simulator_runs_the_real_selection_code_and_rebalancing_helps():
    """A small simulated day: re-balancing keeps the bottleneck near the upper bound, never below join-only."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "simulate_swarm.py"
    out = subprocess.run(
        [sys.executable, str(script), "--servers", "120", "--hours", "6", "--balance_period", "120", "--timeline_points", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(out.stdout)
    on, off = report["rebalancing"], report["join_only"]
    assert on["moves"] > 0 and off["moves"] == 0
    assert on["bottleneck_vs_upper_bound"]["mean"] >= 0.9
    assert on["bottleneck_vs_upper_bound"]["mean"] >= off["bottleneck_vs_upper_bound"]["mean"]
    assert on["uncovered_seconds_after_settling"] == 0
    assert len(on["timeline"]) >= 4

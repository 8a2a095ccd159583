"""The soak test, short (scripts/soak.py runs the long one): a local swarm of 2 server processes,
8 sessions over 2 client processes for 20 s, clients SIGKILLed and sessions dropped mid-step.
Nothing wrong, nothing lost, nothing left behind on the servers or in the process table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from harness.soak import SoakConfig, run_soak
from petals_like.testing.processes import live_descendants
from tests.swarm import kill_new_descendants


@pytest.fixture
def reap_new_children() -> Iterator[None]:
    """run_soak stops what it starts; should it fail to, the processes still go, by PID, and the test fails."""
    before = {p.pid for p in live_descendants()}
    yield
    left = kill_new_descendants(before)
    assert not left, f"the soak run left processes running: {left}"


def test_short_soak_loses_nothing_and_leaves_nothing(tiny_model: Path, reap_new_children) -> None:
    config = SoakConfig(
        duration=20,
        sessions=8,
        clients=2,
        kill_every=6,
        abandon=0.25,
        warmup=5,
        max_rss_growth=None,
        model=tiny_model,
        progress=False,
    )
    report = run_soak(config)
    print(json.dumps(report, indent=2))  # RSS and the rest, for `pytest -s`; RSS is too noisy to assert here
    sessions = report["sessions"]
    assert sessions["outputs_wrong"] == 0, report["examples"]
    assert sessions["outputs_lost"] == 0, report["examples"]
    assert sessions["checked"] >= config.sessions
    assert report["clients"]["killed"] >= 1 and sessions["dropped_with_killed_client"] >= 1
    assert sessions["abandoned_mid_step"] >= 1
    for span, server in report["servers"].items():
        kv, tasks, files = server["kv_tokens"], server["asyncio_tasks"], server["open_files"]
        assert server["open_sessions"]["end"] == 0, span
        assert kv["in_use_end"] == 0 and kv["free_end"] + kv["prefix_cached_end"] == kv["total"], (span, kv)
        assert tasks["end"] <= tasks["baseline"] + config.idle_slack, (span, tasks)
        assert files["end"] <= files["baseline"] + config.idle_slack, (span, files)
    processes = report["processes"]
    assert processes["end"] == processes["baseline"]
    assert processes["left_by_clients"] == 0 and processes["left_after_shutdown"] == 0
    assert report["passed"], report["failures"]

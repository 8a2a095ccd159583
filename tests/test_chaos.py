"""scripts/chaos.py in short: servers SIGKILLed and restarted under generation and LoRA training;
every output equals the local oracle, nothing is lost or hangs, and no process is left behind."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest

from petals_like.testing.processes import live_descendants
from tests.swarm import kill_new_descendants, p2pd_children

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "chaos.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scripts_chaos", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def new_children() -> Iterator[set[int]]:
    """Yields the PIDs of processes under this one before the test; any started since is killed (by PID) after it."""
    before = {p.pid for p in live_descendants()}
    yield before
    kill_new_descendants(before)


@pytest.mark.timeout(180)
def test_short_chaos_run_is_all_right(tmp_path: Path, capsys: pytest.CaptureFixture, new_children: set[int]) -> None:
    p2pd_before = {p.pid for p in p2pd_children()}
    report = load_script().main(
        [
            "--model_dir",
            str(tmp_path / "tiny-llama"),
            "--servers",
            "3",
            "--duration",
            "10",
            "--max_faults",
            "3",
            "--kill_interval",
            "1",
            "2.5",
            "--down_time",
            "0.5",
            "1.5",
            "--generators",
            "2",
            "--prompts",
            "4",
            "--max_new_tokens",
            "12",
            "--op_timeout",
            "45",
            "--seed",
            "3",
            "--no_progress",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed == report.to_dict()
    assert report.kills >= 1, report
    assert report.generations > 0 and report.training_steps > 0, report
    assert (report.generations_wrong, report.generations_lost, report.generations_hung) == (0, 0, 0), report.errors
    assert (report.training_steps_wrong, report.training_steps_lost, report.training_steps_hung) == (0, 0, 0), report.errors
    assert report.restarts_failed == 0, report.errors
    # every process it started is gone: the run tracked each one (servers' p2pd daemons included, which
    # a killed server leaves to init) and found none left; and nothing is left under this process
    assert report.leaked_processes == [], report.errors
    left = [p.pid for p in live_descendants() if p.pid not in new_children]
    assert not left, left
    assert {p.pid for p in p2pd_children()} <= p2pd_before
    assert report.ok and printed["ok"]

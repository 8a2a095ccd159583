"""The README's first command: `python -m petals_like.cli.demo` runs a whole local swarm, generates
what local transformers generates, and leaves no process behind, also when interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_like.testing.processes import live_in_groups, reap

DEMO_TIMEOUT = 240  # seconds; the demo takes ~20 s here


class Demo:
    """The demo as a subprocess in its own session: its output, and every process seen below it
    while it ran (with their process groups: each server and the DHT lead their own)."""

    def __init__(self, model_dir: Path, interrupt_after: Optional[str] = None):
        self.model_dir, self.result_file = model_dir, model_dir.parent / "result.json"
        cmd = [sys.executable, "-m", "petals_like.cli.demo", "--model_dir", str(model_dir), "--max_new_tokens", "8"]
        cmd += ["--json", str(self.result_file)]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}
        self.groups: set[int] = {self.process.pid}
        self.lines: list[str] = []
        self._interrupt_after = interrupt_after
        # read on a thread: a leaked grandchild would hold the pipe open, and a read in the test's
        # own thread would then wait for it forever
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if self._interrupt_after is not None and self._interrupt_after in line:
                self._interrupt_after = None
                self.process.send_signal(signal.SIGINT)  # Ctrl-C: children have their own sessions

    def run(self, timeout: float = DEMO_TIMEOUT) -> int:
        """Wait for the demo to end (interrupted, then killed, after `timeout`); its exit code."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self._record()
            time.sleep(0.1)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._reader.join(5)
        return self.process.wait()

    def _record(self) -> None:
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            if child.pid not in self.seen:
                self.seen[child.pid] = child
                try:
                    self.groups.add(os.getpgid(child.pid))
                except ProcessLookupError:
                    pass

    def leftovers(self) -> list[int]:
        """PIDs of processes the demo started that still run 10 s after it ended (killed now):
        those seen below it, and any other in their process groups (daemons re-parented away)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        leaked = reap(list(self.seen.values()), timeout=10)
        stragglers = [pid for pid in live_in_groups(sorted(self.groups)) if pid not in leaked]
        for pid in stragglers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leaked + stragglers


@pytest.fixture
def run_demo(tmp_path: Path) -> Iterator[Callable[..., Demo]]:
    """run_demo(interrupt_after=None) -> the ended Demo; whatever it left is killed afterwards,
    whether or not the test passed."""
    demos: list[Demo] = []

    def run(interrupt_after: Optional[str] = None) -> Demo:
        demo = Demo(tmp_path / f"demo{len(demos)}" / "tiny-llama", interrupt_after)
        demos.append(demo)
        demo.run()
        return demo

    yield run
    for demo in demos:
        demo.leftovers()


def test_demo_generates_what_transformers_generates_and_stops_its_swarm(run_demo):
    demo = run_demo()
    assert demo.process.returncode == 0, demo.output
    result = json.loads(demo.result_file.read_text())
    # the oracle, run here: transformers on the checkpoint the demo wrote and served
    local = AutoModelForCausalLM.from_pretrained(demo.model_dir, dtype=torch.float32)
    prompt = torch.tensor([result["prompt_ids"]])
    expected = local.generate(prompt, max_new_tokens=8, do_sample=False)
    assert result["output_ids"] == expected[0].tolist()[: len(result["output_ids"])], result
    assert len(result["output_ids"]) > prompt.shape[1] and result["tokens_per_s"] > 0
    assert "[4/4] Stopping the swarm" in demo.output
    assert len(demo.seen) >= 6, demo.seen  # a DHT, two servers and their p2p daemons, at least
    assert demo.leftovers() == []


@pytest.mark.parametrize("moment", ["SERVER READY", "[3/4]"])
def test_interrupted_demo_stops_every_process_it_started(run_demo, moment: str):
    """Ctrl-C once the first server is ready, or as the client starts: the DHT, the servers and
    their daemons all go, and the demo exits normally."""
    demo = run_demo(interrupt_after=moment)
    assert demo.process.returncode == 0, demo.output
    assert "Interrupted" in demo.output and "[4/4] Stopping the swarm" in demo.output, demo.output
    assert "tokens/s" not in demo.output and not demo.result_file.exists()
    assert len(demo.seen) >= 4, demo.seen  # the DHT and a server, each with its daemon
    assert demo.leftovers() == []

"""Processes of a local swarm or test bed: Child (one subprocess, stopped by PID and process group) and
helpers that find and reap what a run left behind.

Each Child leads a process group of its own, with its p2p daemon in it: SIGKILL to the group is its
machine vanishing, and what is still in the group after it stopped is what it left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import psutil

KEPT_OUTPUT_LINES = 1000  # of each child's output, for wait_for_line and for reports if it dies
TAIL_LINES = 30  # of its output, in the error when it dies or does not print a line in time


class Child:
    """A subprocess (a DHT, a server or a client of a local swarm), stopped by PID together with its own
    children (the p2pd daemon). It shares this machine's cores with the other children
    (utils.threads.shared_cores_env).

    Its output (stdout and stderr) is read on a thread as it comes, so that a full pipe never blocks it.
    A line for which on_line(line) returns True is consumed there (soak clients' events); every other
    line is kept in `output` (the last KEPT_OUTPUT_LINES, without line ends).
    """

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        cwd: Optional[str | Path] = None,
        on_line: Optional[Callable[[str], bool]] = None,
    ):
        from petals_like.utils.threads import shared_cores_env

        self.name = name
        self.process = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=shared_cores_env(),
            cwd=cwd,
        )
        self.output: list[str] = []
        self._on_line = on_line
        self._changed = threading.Condition()
        self._ended = False  # its output is closed: it exited (or closed stdout)
        self.reader = threading.Thread(target=self._read, name=f"read {name}", daemon=True)
        self.reader.start()

    @property
    def pid(self) -> int:  # also its process group
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.output[-lines:])

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """The first kept output line that starts with `prefix` (leading and trailing blanks stripped).
        Raises with the output's tail if the child ends its output or `timeout` s pass without one."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.output:
                    if line.strip().startswith(prefix):
                        return line.strip()
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    break
                self._changed.wait(min(left, 1.0))  # Ctrl-C gets through at least once a second
        reason = (
            f"did not print {prefix!r} in {timeout:.0f} s" if left <= 0 else f"ended its output (exit code {self.process.poll()})"
        )
        raise RuntimeError(f"{self.name} {reason}; its output:\n{self.tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, and SIGKILL to its group if it has not exited in `timeout` s; then anything left in its
        process group (its p2pd) is killed too."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._kill_group()

    def kill(self) -> None:
        """SIGKILL it with its whole process group, as a crash: it announces nothing."""
        self._kill_group()
        self.process.wait()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _read(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip("\n")
            if self._on_line is not None and self._on_line(line):
                continue
            with self._changed:
                self.output.append(line)
                if len(self.output) > 2 * KEPT_OUTPUT_LINES:
                    del self.output[:-KEPT_OUTPUT_LINES]
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()


# ---- what a run left behind


def live_descendants(pid: int | None = None) -> list[psutil.Process]:
    """Every process below `pid` (default: this one) that is still running (zombies do not count)."""
    return [c for c in _descendants(pid) if _alive(c)]


def p2pd_children(pid: int | None = None) -> list[psutil.Process]:
    """The p2p daemons below `pid` (default: this one)."""
    return [c for c in _descendants(pid) if process_name(c) == "p2pd"]


def live_in_groups(pgids: Sequence[int]) -> list[int]:
    """PIDs of running processes in these process groups: what a stopped or killed child left behind,
    including daemons that its death re-parented away from this process."""
    wanted = set(pgids)
    found = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) in wanted and _alive(process):
                found.append(process.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def reap(processes: Sequence[psutil.Process], timeout: float = 10.0, grace: Optional[float] = None) -> list[int]:
    """Wait `grace` seconds (default: timeout) for these processes to exit; kill (by PID) those still
    running and return their PIDs."""
    _, alive = psutil.wait_procs(processes, timeout=timeout if grace is None else grace)
    leaked = []
    for process in alive:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            process.kill()
            leaked.append(process.pid)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return leaked


def count_by_name(processes: Sequence[psutil.Process]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for process in processes:
        counts[process_name(process)] = counts.get(process_name(process), 0) + 1
    return dict(sorted(counts.items()))


def process_name(process: psutil.Process) -> str:
    """Its name, or "" once it is gone."""
    try:
        return process.name()
    except psutil.Error:
        return ""


def _descendants(pid: int | None) -> list[psutil.Process]:
    try:
        return psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

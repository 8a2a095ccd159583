"""Chaos run: generation and LoRA training through a local swarm while servers are killed and restarted.

    report = run_chaos(model_dir, ChaosConfig(duration=60, max_faults=5))
    print(json.dumps(report.to_dict()))   # report.ok: nothing wrong, lost or hung, no process left

A LocalSwarm of redundant servers (every block served at least twice) runs on 127.0.0.1. Several
threads generate at once through one client (testing/oracle.GenerationCheck), one thread trains a
LoRA through another client (testing/oracle.TrainingCheck), and a FaultInjector (harness/faults.py)
SIGKILLs servers and restarts them, never leaving a block without a live server. So the client
never has to wait for coverage to return: whatever it loses, it has to route around, and a lost
operation is a fail-over bug, not an outage.

Each operation is either right (equal to the local oracle), wrong, lost (it raised) or hung (it
passed op_timeout seconds; the run then stops, since a hung thread cannot be taken back). Every
process the run started is checked to be gone at the end; any left is killed and reported.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import psutil

from petals_like.testing.processes import reap

logger = logging.getLogger(__name__)

MAX_ERRORS = 20  # messages kept in the report
SHUTDOWN_TIMEOUT = 30.0  # seconds for one client to leave the swarm


@dataclass
class ChaosConfig:
    duration: float = 180.0  # seconds of load under faults, counted once the swarm is up
    max_faults: int = 20  # servers killed at most
    seed: int = 0  # the fault schedule, prompts, training batches and initial LoRA weights
    servers: int = 5  # with spans=None: the whole model, then halves in turn (FaultInjector.default_spans)
    spans: Optional[Sequence[str]] = None  # one "A:B" per server instead
    kill_interval: tuple[float, float] = (4.0, 12.0)  # seconds between kills, drawn uniformly
    down_time: tuple[float, float] = (1.0, 6.0)  # seconds a killed server stays down before its restart
    generators: int = 3  # threads generating at once through one client
    prompts: int = 8  # distinct prompts, with their reference outputs
    max_new_tokens: int = 32  # per generation (each draws between half this and this)
    train: bool = True  # a thread training a LoRA through a second client
    batch_size: int = 2
    seq_len: int = 16
    lora_rank: int = 4
    lr: float = 1e-2
    tolerance: float = 1e-4  # relative error of the loss and of every LoRA gradient (oracle.TrainingCheck)
    op_timeout: float = 120.0  # seconds one generation or training step may take
    request_timeout: float = 30.0  # the clients' ClientConfig.request_timeout (one step on one server)
    restart_timeout: float = 120.0  # seconds a restarted server may take to serve
    same_identity: bool = False  # restarted servers keep the killed one's peer id (else each gets a new one)
    server_args: Sequence[str] = ("--num_threads", "1", "--throughput", "1")  # extra run_server arguments


@dataclass
class ChaosReport:
    kills: int = 0
    restarts: int = 0
    restarts_failed: int = 0
    generations: int = 0  # started
    generations_wrong: int = 0
    generations_lost: int = 0
    generations_hung: int = 0
    training_steps: int = 0  # started
    training_steps_wrong: int = 0
    training_steps_lost: int = 0
    training_steps_hung: int = 0
    worst_gradient_error: float = 0.0  # of any LoRA gradient, over what TrainingCheck allows (<= 1: right)
    leaked_processes: list[int] = field(default_factory=list)
    seconds: float = 0.0  # the whole run, swarm start and stop included
    load_seconds: float = 0.0  # under load and faults
    errors: list[str] = field(default_factory=list)  # the first MAX_ERRORS problems

    @property
    def ok(self) -> bool:
        bad = (
            self.generations_wrong
            + self.generations_lost
            + self.generations_hung
            + self.training_steps_wrong
            + self.training_steps_lost
            + self.training_steps_hung
            + self.restarts_failed
        )
        return bad == 0 and not self.leaked_processes

    def to_dict(self) -> dict[str, Any]:
        return dict(
            asdict(self),
            seconds=round(self.seconds, 1),
            load_seconds=round(self.load_seconds, 1),
            worst_gradient_error=round(self.worst_gradient_error, 4),
            ok=self.ok,
        )

    def error(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)


class _Worker(threading.Thread):
    """Runs check(0), check(1), ... until stopped, tallying each as right, wrong, lost or hung."""

    def __init__(
        self,
        name: str,
        kind: str,
        check: Callable[[int], Optional[str]],
        report: ChaosReport,
        lock: threading.Lock,
        stop: threading.Event,
    ):
        super().__init__(name=name, daemon=True)  # a hung one must not keep the process alive
        self.kind, self.check, self.report, self.lock, self.stop = kind, check, report, lock, stop
        self.busy_since: Optional[float] = None
        self.hung = False

    def _add(self, outcome: str, amount: int = 1) -> None:
        key = self.kind if outcome == "" else f"{self.kind}_{outcome}"
        setattr(self.report, key, getattr(self.report, key) + amount)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            with self.lock:
                self._add("")
                self.busy_since = time.monotonic()
            try:
                wrong = self.check(i)
            except Exception as e:
                outcome, message = "lost", f"{self.name}, operation {i} raised {e!r}"
            else:
                outcome, message = ("wrong", wrong) if wrong is not None else ("", None)
            with self.lock:
                if self.hung:
                    return  # already counted; the run has stopped
                self.busy_since = None
                if outcome:
                    self._add(outcome)
                    self.report.error(message)
                    logger.error(message)
            i += 1

    def check_deadline(self, timeout: float) -> bool:
        """Mark the worker hung if its operation has run past `timeout`; returns whether it is hung."""
        with self.lock:
            if not self.hung and self.busy_since is not None and time.monotonic() - self.busy_since > timeout:
                self.hung = True
                self._add("hung")
                self.report.error(f"{self.name}: an operation passed its {timeout:.0f} s deadline")
            return self.hung


def run_chaos(model_path: str | Path, config: ChaosConfig, *, progress: bool = False) -> ChaosReport:
    """The whole run: swarm up, load under faults for config.duration seconds, everything stopped."""
    from harness.faults import FaultInjector
    from petals_like import AutoDistributedModelForCausalLM
    from petals_like.models.checkpoint import resolve_checkpoint
    from petals_like.models.spec import ModelSpec
    from petals_like.testing.local_swarm import LocalSwarm
    from petals_like.testing.oracle import GenerationCheck, TrainingCheck

    started = time.monotonic()
    report = ChaosReport()
    num_blocks = ModelSpec.from_pretrained(resolve_checkpoint(model_path)).num_blocks
    spans = list(config.spans or FaultInjector.default_spans(num_blocks, config.servers))
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    tracked: dict[int, psutil.Process] = {}

    def track(root: psutil.Process = me) -> None:
        """Remember a process and its descendants (p2pd daemons): all must be gone at the end."""
        try:
            for process in [root, *root.children(recursive=True)]:
                if process.pid != me.pid and process.pid not in before:
                    tracked.setdefault(process.pid, process)
        except psutil.NoSuchProcess:
            pass

    stop, lock = threading.Event(), threading.Lock()
    clients: list[Any] = []
    try:
        with LocalSwarm(model_path, spans, server_args=list(config.server_args), start_timeout=config.restart_timeout) as swarm:
            injector = None
            track()
            try:
                for _ in range(2 if config.train else 1):
                    clients.append(
                        AutoDistributedModelForCausalLM.from_pretrained(
                            model_path, initial_peers=swarm.peers, torch_dtype="float32", request_timeout=config.request_timeout
                        )
                    )
                generation = GenerationCheck(
                    clients[0],
                    model_path,
                    cases=config.prompts,
                    seed=config.seed,
                    max_new_tokens=config.max_new_tokens,
                    workers=config.generators,
                )
                checks = [(f"generator {w}", "generations", generation.for_worker(w)) for w in range(config.generators)]
                if config.train:
                    training = TrainingCheck(
                        clients[1],
                        model_path,
                        rank=config.lora_rank,
                        lr=config.lr,
                        batch_size=config.batch_size,
                        seq_len=config.seq_len,
                        seed=config.seed,
                        tolerance=config.tolerance,
                    )
                    checks.append(("trainer", "training_steps", training))
                track()
                workers = [_Worker(name, kind, check, report, lock, stop) for name, kind, check in checks]
                injector = FaultInjector(
                    swarm,
                    num_blocks,
                    seed=config.seed,
                    max_kills=config.max_faults,
                    kill_interval=config.kill_interval,
                    down_time=config.down_time,
                    restart_timeout=config.restart_timeout,
                    same_identity=config.same_identity,
                    on_started=lambda child: track(psutil.Process(child.process.pid)),
                )
                load_started = time.monotonic()
                injector.start()
                for worker in workers:
                    worker.start()
                _watch(workers, injector, config, report, progress)
                stop.set()
                for worker in workers:  # let each finish its operation, within its deadline
                    while worker.is_alive() and not worker.check_deadline(config.op_timeout):
                        worker.join(0.5)
                report.load_seconds = time.monotonic() - load_started
                report.worst_gradient_error = training.worst if config.train else 0.0
            finally:
                stop.set()
                if injector is not None:
                    injector.stop()
                    report.kills, report.restarts = injector.kills, injector.restarts
                    report.restarts_failed = len(injector.failed_restarts)
                    for message in injector.failed_restarts:
                        report.error(message)
                track()
                for client in clients:
                    _bounded(client.shutdown, SHUTDOWN_TIMEOUT)
    finally:
        report.leaked_processes = reap(list(tracked.values()))
        for pid in report.leaked_processes:
            report.error(f"process {pid} was still running after the swarm stopped")
        report.seconds = time.monotonic() - started
    return report


def _watch(workers: list[_Worker], injector: Any, config: ChaosConfig, report: ChaosReport, progress: bool) -> None:
    """Until config.duration passes or an operation hangs: check deadlines, draw the progress bar."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    with tqdm(
        total=round(config.duration),
        desc="chaos",
        unit="s",
        file=sys.stderr,
        disable=not progress,
        bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s{postfix}",
    ) as bar:
        while True:
            hung = [worker.check_deadline(config.op_timeout) for worker in workers]
            elapsed = time.monotonic() - started
            bar.n = min(elapsed, config.duration)
            bad = (
                report.generations_wrong
                + report.generations_lost
                + report.training_steps_wrong
                + report.training_steps_lost
                + sum(hung)
            )
            bar.set_postfix_str(
                f"kills {injector.kills} restarts {injector.restarts} generations {report.generations} "
                f"steps {report.training_steps} bad {bad}"
            )
            if any(hung) or elapsed >= config.duration:
                return
            time.sleep(0.5)


def _bounded(fn: Callable[[], Any], timeout: float) -> bool:
    """Run fn on a helper thread and wait at most `timeout` seconds; returns whether it finished."""
    thread = threading.Thread(target=fn, name=getattr(fn, "__name__", "bounded"), daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        logger.error(f"{thread.name} did not finish in {timeout:.0f} s")
    return not thread.is_alive()

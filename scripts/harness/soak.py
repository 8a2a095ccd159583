"""Soak test: inference sessions through a local swarm for minutes while clients vanish at random,
then the servers checked for anything left behind.

    report = run_soak(SoakConfig(duration=300, sessions=30))   # what scripts/soak.py runs

A tiny random Llama (or the given checkpoint) is served by a LocalSwarm (a DHT and one server
process per span). Client processes (soak_worker.py, managed by soak_clients.py) run the
sessions, `sessions / clients` each. Every `kill_every` s on average one client is SIGKILLed
together with its p2p daemon (its process group: the client's machine is gone) and a new one
takes its place; within each client a share of sessions is dropped in the middle of a step. Every
other session is checked token by token against local transformers: each generated token must be
the reference's greedy choice given the tokens before it (one teacher-forced forward pass per
session).

The report counts sessions run, dropped on purpose (mid-step, or with a killed client), outputs
wrong and outputs lost (a session that failed although nobody dropped it), and compares each
server's health (soak_health.py) before the run, after the warm-up and once the servers have
settled. It passes when no output is wrong or lost; at the end no session is open, every KV page
is back in the pool (free or in the prefix cache) and each server's asyncio tasks and open files
are back at their level before the run; this process has the same child processes as before the
clients started and no client left any behind; and (unless max_rss_growth is None) no server's
RSS grew by more than max_rss_growth % after the warm-up.
"""

from __future__ import annotations

import contextlib
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from harness.soak_clients import ClientPool, Tally
from harness.soak_health import HealthMonitor, ServerHealth, is_idle
from petals_like.testing.local_swarm import LocalSwarm
from petals_like.testing.processes import Child, count_by_name, live_descendants, live_in_groups

GREEDY_TOLERANCE = 1e-3  # a generated token whose reference logit is this close to the top one is a tie, not wrong
CLIENT_START_TIMEOUT = 180.0  # seconds for the first client processes to join the swarm


@dataclass
class SoakConfig:
    duration: float = 300.0  # seconds of load
    sessions: int = 30  # sessions running at once, over all client processes
    clients: int = 3  # client processes
    seed: int = 0
    kill_every: float = 30.0  # mean seconds between SIGKILLs of a client process; 0 = never
    abandon: float = 0.15  # share of sessions dropped in the middle of a step
    warmup: float = 60.0  # seconds of load before the reference RSS is read (at most a third of the run)
    max_length: int = 256  # of every session
    kv_cache_tokens: int = 8192  # per server: every session at max_length fits; the prefix cache gets the rest
    spans: Sequence[str] = ("0:4", "4:8")
    sample_every: float = 5.0  # seconds between health readings (peaks in the report)
    settle_timeout: float = 30.0  # seconds for the servers to become idle once the clients have stopped
    max_rss_growth: Optional[float] = 5.0  # percent over the RSS after the warm-up; None = reported only
    idle_slack: int = 2  # asyncio tasks / open files above their level before the run still counted as idle
    model: Optional[Path] = None  # a checkpoint to serve; None = a tiny random Llama made in a temp dir
    progress: bool = True  # a tqdm bar on stderr

    def __post_init__(self) -> None:
        if self.duration <= 0 or self.clients < 1 or self.sessions < self.clients:
            raise ValueError("need duration > 0 and sessions >= clients >= 1")
        if not 0 <= self.abandon <= 1 or self.kill_every < 0 or self.max_length < 128:
            raise ValueError("need 0 <= abandon <= 1, kill_every >= 0 and max_length >= 128")


def run_soak(config: SoakConfig) -> dict:
    """Run the soak test; returns the report (report["passed"], report["failures"]). Every process
    it starts is stopped by PID before it returns, also on an exception or Ctrl-C."""
    from transformers import AutoModelForCausalLM

    from petals_like.models.tiny import make_tiny_model

    with contextlib.ExitStack() as stack:
        # one thread for the reference checks: on cores the swarm keeps busy, a second one mostly waits
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(1)
        model = config.model
        if model is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="petals_like_soak_"))
            model = make_tiny_model(Path(tmp) / "tiny-llama", family="llama", preset="tiny")
        reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        server_args = ["--kv_cache_tokens", str(config.kv_cache_tokens), "--num_threads", "1", "--throughput", "1"]
        mark = time.monotonic()
        swarm = stack.enter_context(LocalSwarm(model, config.spans, server_args=server_args))
        seconds = {"swarm_start": time.monotonic() - mark}
        swarm_groups = [child.pid for child in swarm.children]  # each child leads its own group
        servers = dict(zip(config.spans, swarm.servers))
        monitor = HealthMonitor(
            swarm.peers,
            {span: (peer_id, child.pid) for (span, child), peer_id in zip(servers.items(), swarm.server_peer_ids)},
        )
        stack.callback(monitor.shutdown)
        baseline = monitor.read()
        processes_before = live_descendants()
        soak = _Soak(config, Path(model), swarm.peers, servers, reference, monitor, seconds)
        finished = False
        try:
            soak.run()
            finished = True
        finally:
            soak.stop_clients(graceful=finished)
        mark = time.monotonic()
        end = monitor.settle(baseline, config.settle_timeout, config.idle_slack)
        seconds["settle"] = time.monotonic() - mark
        processes_after = live_descendants()
        report = soak.report(baseline, end, processes_before, processes_after)
    left = live_in_groups(swarm_groups)
    report["processes"]["left_after_shutdown"] = len(left)
    if left:
        report["failures"].append(f"processes of the swarm still running after it stopped: {left}")
    report["passed"] = not report["failures"]
    return report


def check_greedy(reference: torch.nn.Module, tokens: list[int], generated: list[int]) -> tuple[int, int]:
    """(wrong, near ties) among the generated positions of `tokens`, teacher-forced through the reference."""
    if not generated:
        return 0, 0
    with torch.inference_mode():
        logits = reference(torch.tensor([tokens])).logits[0].float()
    wrong = ties = 0
    for position in generated:
        row, token = logits[position - 1], tokens[position]
        if int(row.argmax()) == token:
            continue
        if row[token] >= row.max() - GREEDY_TOLERANCE:
            ties += 1
        else:
            wrong += 1
    return wrong, ties


class _Soak:
    """The run itself: the client pool, kills, health readings, output checks; then the report."""

    def __init__(
        self,
        config: SoakConfig,
        model: Path,
        peers: list[str],
        servers: dict[str, Child],
        reference: torch.nn.Module,
        monitor: HealthMonitor,
        seconds: dict[str, float],
    ):
        self.config = config
        self.servers = servers
        self.reference = reference
        self.monitor = monitor
        self.rng = random.Random(config.seed)
        self.tally = Tally()
        worker_cmd = [
            sys.executable,
            str(Path(__file__).with_name("soak_worker.py")),
            str(model),
            "--initial_peers",
            *peers,
            "--seed",
            str(config.seed),
            "--max_length",
            str(config.max_length),
            "--abandon",
            str(config.abandon),
        ]
        self.clients = ClientPool(worker_cmd, self.tally, self._on_end)
        self.warm: Optional[dict[str, ServerHealth]] = None
        self.peaks: dict[str, Counter] = {span: Counter() for span in monitor.servers}
        self.seconds = seconds  # how long each phase took

    def run(self) -> None:
        from tqdm import tqdm

        config, counts = self.config, self.tally.counts
        for i in range(config.clients):
            self.clients.start(config.sessions // config.clients + (i < config.sessions % config.clients))
        mark = time.monotonic()
        self.clients.wait_until_ready(CLIENT_START_TIMEOUT)
        started = time.monotonic()  # the clock starts once every client serves its sessions
        self.seconds["clients_start"] = started - mark
        next_kill = started + self._kill_interval()
        next_sample, warm_at = started, started + min(config.warmup, config.duration / 3)
        with tqdm(
            total=int(config.duration), unit="s", desc="soak", disable=not config.progress, file=sys.stderr, mininterval=1.0
        ) as bar:
            while (now := time.monotonic()) < started + config.duration:
                self.clients.handle_events(timeout=0.2)
                if not self.clients.replace_crashed():
                    break
                self._check_servers()
                if config.kill_every and now >= next_kill and self.clients.kill_one(self.rng):
                    next_kill = now + self._kill_interval()
                if now >= next_sample:
                    self._sample(self.monitor.read())
                    next_sample = now + config.sample_every
                if self.warm is None and now >= warm_at:
                    self.warm = self.monitor.read()
                    self._sample(self.warm)
                bar.update(min(int(now - started), bar.total) - bar.n)
                bar.set_postfix_str(
                    f"sessions {counts['run']} wrong {counts['wrong']} lost {counts['lost']} "
                    f"dropped {counts['abandoned'] + counts['dropped_with_client']} "
                    f"kills {counts['kills']}",
                    refresh=False,
                )
        self.seconds["load"] = time.monotonic() - started
        if self.warm is None:
            self.warm = self.monitor.read()

    def stop_clients(self, graceful: bool) -> None:
        mark = time.monotonic()
        self.clients.stop(graceful)
        self.seconds["clients_stop"] = time.monotonic() - mark

    def _check_servers(self) -> None:
        for span, child in self.servers.items():
            if child.process.poll() is not None:
                raise RuntimeError(f"server {span} exited with code {child.process.returncode} during the run")

    def _kill_interval(self) -> float:
        return self.config.kill_every * self.rng.uniform(0.5, 1.5)

    def _on_end(self, event: dict) -> None:
        """A session ended: count how, and check every token it generated."""
        counts = self.tally.counts
        outcome = event["outcome"]  # completed, stopped, abandoned or lost
        counts[outcome] += 1
        if outcome == "lost":
            self.tally.example(f"session {event['sid']} lost: {event['error']}")
        generated = event["generated"]
        counts["tokens_generated"] += len(generated)
        if generated:
            wrong, ties = check_greedy(self.reference, event["tokens"], generated)
            counts["checked"] += 1
            counts["near_ties"] += ties
            if wrong:
                counts["wrong"] += 1
                self.tally.example(f"session {event['sid']}: {wrong} of {len(generated)} tokens differ from the reference")

    def _sample(self, health: dict[str, ServerHealth]) -> None:
        for span, h in health.items():
            peak = self.peaks[span]
            for name, value in (
                ("rss_mib", h.rss_mib),
                ("tokens_in_use", h.tokens_in_use),
                ("open_sessions", h.open_sessions),
                ("asyncio_tasks", h.asyncio_tasks),
            ):
                peak[name] = max(peak[name], value)

    def report(
        self, baseline: dict[str, ServerHealth], end: dict[str, ServerHealth], processes_before: list, processes_after: list
    ) -> dict:
        c, config = self.tally.counts, self.config
        failures = list(self.tally.failures)
        sessions = {
            "run": c["run"],
            "completed": c["completed"],
            "stopped_at_end": c["stopped"],
            "checked": c["checked"],
            "tokens_generated": c["tokens_generated"],
            "dropped_on_purpose": c["abandoned"] + c["dropped_with_client"],
            "abandoned_mid_step": c["abandoned"],
            "dropped_with_killed_client": c["dropped_with_client"],
            "outputs_wrong": c["wrong"],
            "outputs_lost": c["lost"],
            "near_ties": c["near_ties"],
        }
        if c["wrong"]:
            failures.append(f"{c['wrong']} sessions generated tokens that differ from the reference")
        if c["lost"]:
            failures.append(f"{c['lost']} sessions failed without being dropped")
        if not c["checked"]:
            failures.append("no session was checked: the swarm served nothing")
        servers = {}
        for span in end:
            base, warm, last, peak = baseline[span], self.warm[span], end[span], self.peaks[span]
            growth = 100.0 * (last.rss_mib - warm.rss_mib) / warm.rss_mib
            servers[span] = {
                "rss_mib": {
                    "after_warmup": warm.rss_mib,
                    "end": last.rss_mib,
                    "peak": peak["rss_mib"],
                    "growth_pct": round(growth, 2),
                },
                "p2pd_rss_mib": {"after_warmup": warm.p2pd_rss_mib, "end": last.p2pd_rss_mib},
                "kv_tokens": {
                    "total": last.cache_tokens_total,
                    "in_use_peak": peak["tokens_in_use"],
                    "in_use_end": last.tokens_in_use,
                    "free_end": last.cache_tokens_left,
                    "prefix_cached_end": last.prefix_cache_tokens,
                },
                "open_sessions": {"baseline": base.open_sessions, "peak": peak["open_sessions"], "end": last.open_sessions},
                "asyncio_tasks": {"baseline": base.asyncio_tasks, "peak": peak["asyncio_tasks"], "end": last.asyncio_tasks},
                "threads": {"baseline": base.threads, "after_warmup": warm.threads, "end": last.threads},
                "open_files": {"baseline": base.open_files, "after_warmup": warm.open_files, "end": last.open_files},
            }
            if not is_idle(last, base, config.idle_slack):
                failures.append(
                    f"server {span} not idle {config.settle_timeout:.0f} s after the clients stopped: "
                    f"{last.open_sessions} sessions open, {last.tokens_in_use} KV tokens in use, "
                    f"{last.asyncio_tasks} asyncio tasks (baseline {base.asyncio_tasks}), "
                    f"{last.open_files} open files (baseline {base.open_files})"
                )
            if config.max_rss_growth is not None and growth > config.max_rss_growth:
                failures.append(f"server {span} RSS grew {growth:.1f}% after the warm-up (limit {config.max_rss_growth}%)")
        before, after = {p.pid for p in processes_before}, {p.pid for p in processes_after}
        if before != after:
            failures.append(
                f"child processes differ from before the run: new {sorted(after - before)}, gone {sorted(before - after)}"
            )
        return {
            "passed": not failures,
            "failures": failures,
            "config": {k: v for k, v in asdict(config).items() if k not in ("model", "progress")},
            "seconds": {phase: round(value, 1) for phase, value in self.seconds.items()},
            "sessions": sessions,
            "clients": {
                "started": c["clients_started"],
                "killed": c["kills"],
                "crashed": c["clients_crashed"],
                "hung_at_stop": c["clients_hung"],
            },
            "servers": servers,
            "processes": {
                "baseline": count_by_name(processes_before),
                "end": count_by_name(processes_after),
                "left_by_clients": c["processes_left_by_clients"],
            },
            "examples": self.tally.examples,
        }

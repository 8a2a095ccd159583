"""Simulate a swarm of volunteer servers joining, leaving and re-balancing; print JSON.

    python scripts/simulate_swarm.py --servers 1000 --hours 24
    python scripts/simulate_swarm.py --servers 200 --hours 6 --balance_period 120 --seed 3

Block choice and moves are petals_like.server.block_selection's own choose_best_start() and
should_move(), the code real servers run; only the network is replaced by shared arrays.

Model (all times simulated):
  - num_blocks blocks (80: a Llama-2-70B); servers drawn from a device mix (blocks they hold,
    throughput per block in block-steps/s; see DEVICES), join in the first `--ramp` minutes, then
    alternate online / offline periods drawn from exponential distributions (mean
    `--online_hours` / `--offline_hours`);
  - a joining or moving server announces its new span at once (JOINING counts in everyone's
    choices, as in the DHT) and serves it after loading (`--load_seconds_per_block` per block);
  - every online server checks for a move every balance_period x U(0.5, 1.5) seconds, unless the
    run is join-only;
  - every `--sample_seconds`: the swarm's bottleneck (the least total throughput over blocks,
    counting only loaded servers), the upper bound sum(throughput_s x span_s) / num_blocks over
    the same servers, and whether some block is unserved while the online servers' spans could
    cover every block.

The two runs (re-balancing on, join-only) replay the same joins and departures.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from petals_like.server.block_selection import choose_best_start, should_move  # noqa: E402

# (name, share of volunteers, blocks held, block-steps/s per block): a rough volunteer mix
DEVICES = [
    ("A100-80GB", 0.05, 40, 400.0),
    ("RTX 4090", 0.20, 16, 250.0),
    ("RTX 3090", 0.30, 14, 160.0),
    ("T4", 0.25, 8, 60.0),
    ("CPU server", 0.20, 6, 6.0),
]


@dataclass
class SimServer:
    device: str
    num_blocks: int
    throughput: float
    start: int = -1  # -1: offline
    loaded: bool = False
    epoch: int = 0  # bumps on every join / leave / move, so that stale events are ignored


def draw_servers(count: int, num_blocks: int, rng: random.Random) -> list[SimServer]:
    weights = [d[1] for d in DEVICES]
    servers = []
    for _ in range(count):
        name, _, blocks, throughput = rng.choices(DEVICES, weights=weights)[0]
        servers.append(SimServer(name, min(blocks, num_blocks), throughput * rng.uniform(0.8, 1.2)))
    return servers


def churn_schedule(count: int, args, rng: random.Random) -> list[tuple[float, str, int]]:
    """(time, 'join' | 'leave', server) for the whole run, shared by both modes."""
    horizon = args.hours * 3600
    events = []
    for index in range(count):
        t = rng.uniform(0, args.ramp * 60)
        while t < horizon:
            events.append((t, "join", index))
            t += rng.expovariate(1 / (args.online_hours * 3600))
            if t >= horizon:
                break
            events.append((t, "leave", index))
            t += rng.expovariate(1 / (args.offline_hours * 3600))
    return sorted(events)


def simulate(args, rebalance: bool) -> dict:
    rng = random.Random(args.seed)
    servers = draw_servers(args.servers, args.num_blocks, rng)
    schedule = churn_schedule(len(servers), args, rng)
    check_rng = random.Random(args.seed + 1)
    announced = np.zeros(args.num_blocks)  # JOINING + ONLINE: what choices see
    serving = np.zeros(args.num_blocks)  # loaded servers only: what clients get
    heap: list = []
    counter = 0

    def push(t: float, kind: str, index: int, epoch: int = 0) -> None:
        nonlocal counter
        heapq.heappush(heap, (t, counter, kind, index, epoch))
        counter += 1

    for t, kind, index in schedule:
        push(t, kind, index)
    horizon = args.hours * 3600
    t_sample = 0.0
    while t_sample <= horizon:
        push(t_sample, "sample", -1)
        t_sample += args.sample_seconds

    def occupy(index: int, start: int, t: float) -> None:
        server = servers[index]
        server.start, server.loaded = start, False
        server.epoch += 1
        announced[start : start + server.num_blocks] += server.throughput
        push(t + args.load_seconds_per_block * server.num_blocks, "loaded", index, server.epoch)

    def vacate(server: SimServer) -> None:
        span = slice(server.start, server.start + server.num_blocks)
        announced[span] -= server.throughput
        if server.loaded:
            serving[span] -= server.throughput
        server.start, server.loaded = -1, False
        server.epoch += 1

    moves = 0
    samples = []
    while heap:
        t, _, kind, index, epoch = heapq.heappop(heap)
        if t > horizon:
            break
        if kind == "sample":
            online = [s for s in servers if s.start >= 0 and s.loaded]
            bound = sum(s.throughput * s.num_blocks for s in online) / args.num_blocks
            capacity = sum(s.num_blocks for s in servers if s.start >= 0) >= args.num_blocks
            samples.append((t, float(serving.min()), bound, int(np.count_nonzero(serving <= 1e-9)), capacity, len(online)))
            continue
        server = servers[index]
        if kind == "join":
            start = choose_best_start(announced, server.num_blocks, server.throughput)
            occupy(index, start, t)
            if rebalance:
                push(t + args.balance_period * check_rng.uniform(0.5, 1.5), "check", index, server.epoch)
        elif kind == "leave":
            if server.start >= 0:
                vacate(server)
        elif kind == "loaded":
            if epoch == server.epoch and server.start >= 0:
                server.loaded = True
                serving[server.start : server.start + server.num_blocks] += server.throughput
        elif kind == "check":
            if server.start < 0 or epoch != server.epoch:
                continue  # left (or moved) since this check was scheduled
            if server.loaded:
                target = should_move(
                    announced, server.start, server.start + server.num_blocks, server.throughput, args.balance_quality
                )
                if target is not None:
                    vacate(server)
                    occupy(index, target, t)
                    moves += 1
            push(t + args.balance_period * check_rng.uniform(0.5, 1.5), "check", index, server.epoch)

    settled = [s for s in samples if s[0] >= args.settle_hours * 3600 and s[2] > 0]
    ratios = [s[1] / s[2] for s in settled]
    uncovered_s = sum(args.sample_seconds for s in samples if s[3] > 0 and s[4])
    uncovered_settled_s = sum(args.sample_seconds for s in settled if s[3] > 0 and s[4])
    return {
        "moves": moves,
        "bottleneck_vs_upper_bound": {
            "mean": round(statistics.mean(ratios), 4) if ratios else None,
            "p10": round(float(np.percentile(ratios, 10)), 4) if ratios else None,
            "min": round(min(ratios), 4) if ratios else None,
        },
        "uncovered_seconds_while_capacity_allows": uncovered_s,  # includes the first joins loading
        "uncovered_seconds_after_settling": uncovered_settled_s,
        "timeline": [
            {
                "hour": round(s[0] / 3600, 2),
                "bottleneck": round(s[1], 1),
                "upper_bound": round(s[2], 1),
                "uncovered_blocks": s[3],
                "online_servers": s[5],
            }
            for s in samples[:: max(1, len(samples) // args.timeline_points)]
        ],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", type=int, default=1000)
    p.add_argument("--num_blocks", type=int, default=80)
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--ramp", type=float, default=30.0, help="minutes over which the first joins spread")
    p.add_argument("--online_hours", type=float, default=6.0, help="mean time a server stays online")
    p.add_argument("--offline_hours", type=float, default=3.0, help="mean time a server stays away")
    p.add_argument("--balance_period", type=float, default=300.0, help="mean seconds between move checks")
    p.add_argument("--balance_quality", type=float, default=0.75)
    p.add_argument("--load_seconds_per_block", type=float, default=5.0)
    p.add_argument("--sample_seconds", type=float, default=60.0)
    p.add_argument("--settle_hours", type=float, default=1.0, help="samples before this are not scored")
    p.add_argument("--timeline_points", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    report: dict = {"config": vars(args), "devices": [dict(zip(("name", "share", "blocks", "throughput"), d)) for d in DEVICES]}
    for name, rebalance in (("rebalancing", True), ("join_only", False)):
        started = time.perf_counter()
        result = simulate(args, rebalance)
        result["wall_seconds"] = round(time.perf_counter() - started, 2)
        report[name] = result
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

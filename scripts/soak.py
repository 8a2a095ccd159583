"""Soak test: many inference sessions through a local swarm for minutes, with clients vanishing at
random, then a check that the servers kept nothing behind.

    python scripts/soak.py                                   # 30 sessions for 5 minutes, tiny random Llama
    python scripts/soak.py --duration 600 --sessions 40 --clients 4 --kill_every 20 --seed 3

A DHT and one server process per span (--spans, default 0:4 4:8) serve the model; --clients
processes run --sessions sessions at once between them, each session greedy generation in steps
of random lengths, sometimes with new input in between. About every --kill_every seconds one
client process is SIGKILLed with its p2p daemon and a new one takes its place; a share of sessions
(--abandon) is dropped in the middle of a step. Every other session is checked token by token
against local transformers.

Prints one JSON report: sessions run, dropped on purpose, outputs wrong, outputs lost; per server
the RSS after the warm-up and at the end (MiB, growth %), KV tokens in use, open sessions, asyncio
tasks, threads and open files; child processes before and after. Exits with 1 if a check failed
(report["failures"] says which), 130 on Ctrl-C. Every process it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing
sys.path.insert(1, str(Path(__file__).resolve().parent))  # harness/ beside this file, also when it is loaded by path (tests)

from harness.soak import SoakConfig, run_soak  # noqa: E402
from petals_like.utils.cli import add_config_flags, config_values  # noqa: E402

FLAGS = [  # SoakConfig fields given as flags: (field, help)
    ("duration", "seconds of load"),
    ("sessions", "sessions running at once, over all clients"),
    ("clients", "client processes sharing the sessions"),
    ("seed", "makes the sessions' plans and the kill times repeatable"),
    ("kill_every", "mean seconds between SIGKILLs of a client process (0: never)"),
    ("abandon", "share of sessions dropped in the middle of a step"),
    ("warmup", "seconds of load before the reference RSS is read (at most a third of --duration)"),
    ("max_length", "max_length of every session (>= 128)"),
    ("kv_cache_tokens", "KV pool of each server, in tokens"),
    ("settle_timeout", "seconds for the servers to become idle after the clients stop"),
]


def main(argv: Optional[list[str]] = None) -> int:
    d = SoakConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, d, FLAGS)
    p.add_argument(
        "--max_rss_growth",
        type=float,
        default=d.max_rss_growth,
        help="largest allowed RSS growth of a server after the warm-up, in percent (negative: not checked)",
    )
    p.add_argument("--spans", nargs="+", default=list(d.spans), help="one server per span, e.g. 0:4 4:8")
    p.add_argument(
        "--model", type=Path, default=None, help="checkpoint to serve (default: a tiny random Llama made in a temporary folder)"
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    try:
        config = SoakConfig(
            **config_values(args, FLAGS),
            spans=tuple(args.spans),
            model=args.model,
            max_rss_growth=args.max_rss_growth if args.max_rss_growth >= 0 else None,
            progress=not args.no_progress,
        )
    except ValueError as e:
        p.error(str(e))

    from petals_like.utils.cli import setup_logging

    setup_logging("WARNING")
    try:
        report = run_soak(config)
    except KeyboardInterrupt:
        print("Interrupted; every process started was stopped", file=sys.stderr)
        return 130
    except Exception as e:  # e.g. a server crashed: still one JSON report, and a failing exit status
        traceback.print_exc()
        report = {"passed": False, "failures": [f"the soak run stopped: {e!r}"]}
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

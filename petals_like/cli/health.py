"""python -m petals_like.cli.health --initial_peers ...: the swarm's health as tables in the terminal.

The same view as the dashboard (verdict, coverage and servers per model), read once, or again
every --watch seconds until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from petals_like.cli.dashboard import add_swarm_args, make_reader
from petals_like.utils.cli import setup_logging


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a --watch loop like Ctrl-C, through the clean shutdown below


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_swarm_args(parser)
    parser.add_argument(
        "--watch",
        type=float,
        default=None,
        metavar="SECONDS",
        help="read the swarm again every SECONDS seconds and redraw (until Ctrl-C)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the view as JSON (as the dashboard's /api/v1/state; one line per read with --watch)",
    )
    args = parser.parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        parser.error("--watch must be positive")
    setup_logging(args.log_level)

    from rich.console import Console
    from rich.live import Live

    from petals_like.dashboard.terminal import render_state

    console = Console(width=None if sys.stdout.isatty() else 200)  # piped: do not cut the table to 80 columns
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        node, reader = make_reader(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        if args.watch is None:
            state = reader.read()
            if args.json:
                print(json.dumps(state, indent=2), flush=True)
            else:
                console.print(render_state(state))
        elif args.json:
            while True:
                print(json.dumps(reader.read()), flush=True)
                time.sleep(args.watch)
        else:
            with Live(render_state(reader.read()), console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(args.watch)
                    live.update(render_state(reader.read()), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        node.shutdown()


if __name__ == "__main__":
    main()

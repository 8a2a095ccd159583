"""python -m petals_like.cli.bench_network: the client of benchmark (n), started by `python -m
petals_like.cli.bench --workloads n` inside the network test bed (petals_like/bench/network.py); prints one
line "RESULT {json}"."""

from __future__ import annotations

import argparse
import json
from typing import Optional

from petals_like.bench import network


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="(n)'s client: " + network.__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--initial_peers", nargs="+", required=True)
    p.add_argument("--servers", nargs="+", required=True, help="peer ids: the chain's servers, in order")
    p.add_argument("--prefill_len", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)

    from petals_like.utils.cli import setup_logging

    setup_logging("WARNING")
    result = network.run_client(
        a.model, a.initial_peers, a.servers, prefill_len=a.prefill_len, new_tokens=a.new_tokens, rounds=a.rounds
    )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

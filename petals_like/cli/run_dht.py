"""python -m petals_like.cli.run_dht: a bootstrap peer that servers and clients join."""

from __future__ import annotations

import argparse

from petals_like.utils.cli import setup_logging, wait_for_stop_signal


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--initial_peers", nargs="*", default=[], help="multiaddrs of an existing swarm to join")
    parser.add_argument("--host_maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/31337"],
                        help="where to listen, e.g. /ip4/127.0.0.1/tcp/0 (port 0 = any free port)")
    parser.add_argument("--announce_maddrs", nargs="*", default=[], help="public addresses to advertise")
    parser.add_argument("--identity_path", default=None, help="private key file for a stable peer id")
    parser.add_argument("--log_level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)

    from petals_like.dht.node import SwarmNode

    node = SwarmNode(args.initial_peers, host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs,
                     identity_path=args.identity_path, name="dht")  # fmt: skip
    try:
        maddrs = node.visible_maddrs()
        print("DHT is running. To join, pass:", flush=True)
        print("  --initial_peers " + " ".join(maddrs), flush=True)
        wait_for_stop_signal()
    finally:
        node.shutdown()


if __name__ == "__main__":
    main()

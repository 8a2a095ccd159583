"""python -m petals_like.cli.run_dht: a bootstrap peer that servers and clients join."""

from __future__ import annotations

import argparse

from petals_like.utils.cli import add_network_flags, network_values, setup_logging, wait_for_stop_signal


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--initial_peers", nargs="*", default=[], help="multiaddrs of an existing swarm to join")
    add_network_flags(parser, default_port=31337)  # a bootstrap peer is worth a stable address
    parser.add_argument("--identity_path", default=None, help="private key file for a stable peer id")
    parser.add_argument("--log_level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)

    from petals_like.dht.node import SwarmNode

    # a DHT node serves no calls: behind NAT it takes no relay slot (it is only useful to others when public)
    node = SwarmNode(
        args.initial_peers, **{**network_values(args), "max_relays": 0}, identity_path=args.identity_path, name="dht"
    )
    try:
        maddrs = [m for m in node.visible_maddrs() if "/quic" not in m]
        if node.using_relay:
            print("This node is behind NAT: other hosts cannot join through it (see docs/network.md)", flush=True)
        print("DHT is running. To join, pass:", flush=True)
        print("  --initial_peers " + " ".join(maddrs), flush=True)
        wait_for_stop_signal()
    finally:
        node.shutdown()


if __name__ == "__main__":
    main()

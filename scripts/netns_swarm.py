"""A swarm across hosts made of network namespaces, by hand (root): see docs/network.md.

    sudo .venv/bin/python scripts/netns_swarm.py --hosts pub nat:nat --model ./tiny-llama --delay_ms 5

Starts a public bootstrap DHT host, one server per --hosts entry (NAME, or NAME:nat for one behind
its own NAT router), splitting the model's blocks evenly among them, and a client host behind NAT that
generates once through the swarm. Then it prints how to run more commands inside the hosts
(`ip netns exec NAMESPACE ...`) and waits for Ctrl-C; every process and namespace goes on exit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from petals_like.testing.netbed import NetBed, available  # noqa: E402
from petals_like.utils.cli import wait_for_stop_signal  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", nargs="+", default=["pub", "nat:nat"], help="server hosts: NAME or NAME:nat")
    p.add_argument("--model", help="checkpoint folder (default: a tiny random Llama made here)")
    p.add_argument("--delay_ms", type=float, default=0.0, help="delay on each direction of every host's link")
    p.add_argument("--uplink_mbit", type=float, default=None, help="uplink of the hosts behind NAT")
    p.add_argument("--no_wait", action="store_true", help="exit after the client's generation")
    a = p.parse_args()
    ok, why = available()
    if not ok:
        sys.exit(f"netns_swarm: {why}")
    with tempfile.TemporaryDirectory(prefix="petals_like_netns_") as tmp:
        model = a.model
        if model is None:
            from petals_like.models.tiny import make_tiny_model

            model = str(make_tiny_model(Path(tmp) / "tiny-llama", family="llama", preset="tiny"))
        num_blocks = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
        with NetBed() as bed:
            boot = bed.add_host("boot", delay_ms=a.delay_ms)
            peers = (
                boot.start("dht", ["petals_like.cli.run_dht", "--port", "31337"]).wait_for_line("--initial_peers", 60).split()[1:]
            )
            servers = []
            for i, spec in enumerate(a.hosts):
                name, _, kind = spec.partition(":")
                host = bed.add_host(
                    name, nat=kind == "nat", delay_ms=a.delay_ms, uplink_mbit=a.uplink_mbit if kind == "nat" else None
                )
                span = f"{num_blocks * i // len(a.hosts)}:{num_blocks * (i + 1) // len(a.hosts)}"
                servers.append(
                    host.start(
                        "server",
                        [
                            "petals_like.cli.run_server",
                            model,
                            "--block_indices",
                            span,
                            "--initial_peers",
                            *peers,
                            "--no_progress",
                        ],
                    )
                )
            for server in servers:
                print(server.name, server.wait_for_line("SERVER READY", 300), flush=True)
            home = bed.add_host("home", nat=True, delay_ms=a.delay_ms, uplink_mbit=a.uplink_mbit)
            client = home.start("client", ["petals_like.testing.netbed_worker", "generate", model, "--initial_peers", *peers])
            print("client:", client.wait_for_line("RESULT", 300), flush=True)
            print("\nhosts (run commands in one with `ip netns exec NAMESPACE ...`):")
            for host in bed.hosts.values():
                print(
                    f"  {host.name:8} {host.netns:24} {host.ip:14} {'behind NAT at ' + host.public_ip if host.nat else 'public'}"
                )
            print("  --initial_peers " + " ".join(peers), flush=True)
            if not a.no_wait:
                print("Ctrl-C stops everything", flush=True)
                wait_for_stop_signal()


if __name__ == "__main__":
    main()

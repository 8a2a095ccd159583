"""What every command-line tool shares: logging set-up, flags for config fields, waiting for Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import threading
from typing import Any, Iterable


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # hivemind logs every connection hiccup at INFO/WARNING; keep its noise out unless asked
    hivemind_level = os.environ.get("PETALS_LIKE_HIVEMIND_LOG_LEVEL", "ERROR")
    logging.getLogger("hivemind").setLevel(hivemind_level)
    os.environ.setdefault("HIVEMIND_LOGLEVEL", hivemind_level)


def wait_for_stop_signal() -> int:
    """Block until SIGINT or SIGTERM; returns the signal number."""
    stop = threading.Event()
    received: list[int] = []

    def handler(signum, _frame) -> None:
        received.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    while not stop.wait(1.0):
        pass
    return received[0]


def add_config_flags(group: Any, defaults: Any, flags: Iterable[tuple[str, str]], prefix: str = "") -> None:
    """One `--{prefix}NAME` per (NAME, help) for a field of a config dataclass: its type and default are
    the field's value in `defaults` (an int, float or str; a two-number tuple takes LOW HIGH)."""
    for name, help_text in flags:
        default = getattr(defaults, name)
        extra: dict[str, Any] = {}
        if isinstance(default, tuple):
            extra = dict(nargs=len(default), metavar=("LOW", "HIGH")[: len(default)])
            kind = type(default[0])
        else:
            kind = type(default)
        group.add_argument(f"--{prefix}{name}", type=kind, default=default, help=f"{help_text} (default: %(default)s)", **extra)


def config_values(args: argparse.Namespace, flags: Iterable[tuple[str, str]], prefix: str = "") -> dict[str, Any]:
    """The parsed values of add_config_flags' flags, by field name (lists back to tuples)."""
    values = {name: getattr(args, prefix + name) for name, _ in flags}
    return {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}


GROUPS = {  # help sections of flags declared with config.flag(group=...)
    "limits": "limits (a request or client over one gets a clear error; others are served)",
    "balancing": "choosing blocks and moving",
    "adapters": "LoRA adapters",
}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """`--NAME` for every field of a config dataclass declared with config.flag(): default and help from
    the field; type from the default (or the flag's `type`); tuples take nargs; bools are switches."""
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        options = {k: v for k, v in f.metadata.items() if k not in ("help", "group")}
        group = f.metadata.get("group")
        if group is not None and group not in sections:
            sections[group] = (
                parser.add_mutually_exclusive_group() if group == "span" else parser.add_argument_group(GROUPS[group])
            )
        target = parser if group is None else sections[group]
        if isinstance(f.default, bool):
            target.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
            continue
        kind = options.pop("type", None) or (
            type(f.default) if f.default is not None and not isinstance(f.default, tuple) else str
        )
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else "%(default)s"
        help_text = f.metadata["help"] + ("" if f.default in (None, (), "") else f" (default: {shown})")
        target.add_argument(f"--{f.name}", type=_argparse_type(kind), default=f.default, help=help_text, **options)


def dataclass_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """add_dataclass_flags' values by field name (lists back to tuples)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if "help" in f.metadata}
    return {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}


def _argparse_type(kind: Any) -> Any:
    """A parser whose ValueError becomes argparse's clear message (argparse shows only "invalid value" else)."""
    if kind in (int, float, str):
        return kind

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


RELAY_LIMITS = [  # RelayLimits fields given as --relay_NAME flags
    ("max_reservations", "servers behind NAT this node relays for"),
    ("max_circuits", "relayed streams open at once, all callers together"),
    ("max_circuits_per_peer", "relayed streams one caller may hold open"),
    ("max_circuit_bytes", "bytes one relayed stream may carry"),
    ("max_circuit_seconds", "seconds one relayed stream may stay open"),
]


def add_network_flags(parser: argparse.ArgumentParser, default_port: int = 0) -> None:
    """Where a server or DHT node listens, what it announces, reachability and relaying (dht/reach.py)."""
    from petals_like.dht.relay import RelayLimits

    g = parser.add_argument_group("network (see docs/network.md)")
    g.add_argument(
        "--host_maddrs",
        nargs="+",
        default=None,
        help="multiaddrs to listen on (default: every interface, IPv4 and IPv6, TCP and QUIC, on --port)",
    )
    g.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"TCP and UDP port to listen on (default: {f'{default_port}; 0: a free one' if default_port else 'a free one'})",
    )
    parser.set_defaults(default_port=default_port)
    g.add_argument("--public_ip", help="announce this address, e.g. a router's that forwards --port here")
    g.add_argument("--announce_maddrs", nargs="*", default=[], help="multiaddrs to announce instead")
    g.add_argument(
        "--force_reachability",
        choices=["public", "private"],
        help="skip the dial-back check: public (reachable directly) or private (serve through relays)",
    )
    g.add_argument("--no_relay", action="store_true", help="do not relay for servers behind NAT")
    g.add_argument("--max_relays", type=int, default=2, help="relays to hold slots on when behind NAT (default: %(default)s)")
    add_config_flags(g, RelayLimits(), RELAY_LIMITS, prefix="relay_")


def network_values(args: argparse.Namespace) -> dict[str, Any]:
    """add_network_flags' values as SwarmNode / ServerConfig keyword arguments."""
    from petals_like.dht.relay import RelayLimits

    relay_limits = None if args.no_relay else RelayLimits(**config_values(args, RELAY_LIMITS, prefix="relay_"))
    port = args.port if args.port is not None else (args.default_port if args.host_maddrs is None else 0)
    return dict(
        host_maddrs=args.host_maddrs,
        announce_maddrs=tuple(args.announce_maddrs),
        port=port,
        public_ip=args.public_ip,
        force_reachability=args.force_reachability,
        relay_limits=relay_limits,
        max_relays=args.max_relays,
    )

"""What every command-line tool shares: logging set-up, flags for config fields, waiting for Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
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


def add_config_flags(group: Any, defaults: Any, flags: Iterable[tuple[str, str]]) -> None:
    """One `--NAME` per (NAME, help) for a field of a config dataclass: its type and default are the
    field's value in `defaults` (an int, float or str; a two-number tuple takes LOW HIGH)."""
    for name, help_text in flags:
        default = getattr(defaults, name)
        extra: dict[str, Any] = {}
        if isinstance(default, tuple):
            extra = dict(nargs=len(default), metavar=("LOW", "HIGH")[: len(default)])
            kind = type(default[0])
        else:
            kind = type(default)
        group.add_argument(f"--{name}", type=kind, default=default, help=f"{help_text} (default: %(default)s)", **extra)


def config_values(args: argparse.Namespace, flags: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The parsed values of add_config_flags' flags, by field name (lists back to tuples)."""
    values = {name: getattr(args, name) for name, _ in flags}
    return {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}


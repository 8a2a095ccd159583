"""What every command-line tool shares: logging set-up and waiting for Ctrl-C / SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import threading


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

"""Reads the swarm every refresh period on a background thread and keeps the latest view and its history.

HTTP handler threads only ever read snapshot(): a dict that is replaced, never changed in place,
so a page is always built from one complete read.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

from petals_like.dashboard.history import History
from petals_like.dashboard.metrics import render_metrics
from petals_like.dashboard.state import build_state

logger = logging.getLogger(__name__)


class DashboardService:
    def __init__(self, read: Callable[[], dict[str, Any]], *, refresh_period: float = 10.0, history: Optional[History] = None):
        if refresh_period <= 0:
            raise ValueError(f"refresh_period must be positive, got {refresh_period}")
        self.read = read  # one read of the swarm -> build_state()'s dict (SwarmReader.read)
        self.refresh_period = refresh_period
        self.history = history if history is not None else History()
        self.reads = {"total": 0, "failures": 0, "last_success": None, "last_seconds": None}
        self._state: Optional[dict[str, Any]] = None
        self._history_json = self.history.to_json()  # rebuilt once per read, not per request
        self._last_error = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> DashboardService:
        self._thread = threading.Thread(target=self._refresh_forever, name="dashboard-refresh", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _refresh_forever(self) -> None:
        """Read now, then one read per refresh period (measured from start to start, never overlapping)."""
        while not self._stop.is_set():
            started = time.monotonic()
            self.refresh()
            self._stop.wait(max(0.0, self.refresh_period - (time.monotonic() - started)))

    def refresh(self) -> None:
        """One read; a failed read keeps the previous view and is reported in its errors."""
        try:
            state = self.read()
        except Exception as e:  # the DHT may be unreachable for a while: keep serving the last view
            logger.warning(f"Reading the swarm failed: {e!r}")
            with self._lock:
                self.reads["total"] += 1
                self.reads["failures"] += 1
                self._last_error = f"the last read of the swarm failed: {e!r}"
            return
        self.history.add(state)
        history_json = self.history.to_json()
        with self._lock:
            self._history_json = history_json
            self.reads["total"] += 1
            self.reads["last_success"] = state["generated_at"]
            self.reads["last_seconds"] = state["read_seconds"]
            self._last_error = ""
            self._state = state

    def snapshot(self, *, history: bool = True) -> dict[str, Any]:
        """The latest view plus the service's own fields: ready, refresh_period and the history columns."""
        with self._lock:
            state, last_error, history_json = self._state, self._last_error, self._history_json
        if state is None:  # nothing read yet: the view of an empty swarm, generated at no time
            state = build_state({}, {}, {}, now=None, read_seconds=None)
        errors = [*state["errors"], last_error] if last_error else state["errors"]
        snapshot = {**state, "errors": errors, "ready": state["generated_at"] is not None, "refresh_period": self.refresh_period}
        if history:
            snapshot["history"] = history_json
        return snapshot

    def metrics(self) -> str:
        with self._lock:
            reads = dict(self.reads)
        return render_metrics(self.snapshot(history=False), reads)

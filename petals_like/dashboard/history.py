"""A ring buffer of past reads, for the chart of bottleneck throughput and online servers over time."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Optional


class History:
    """The last `max_points` reads, each reduced to (time, {dht_prefix: (bottleneck throughput, online servers)}).

    Thread-safe: the refresh thread adds while HTTP threads read.
    """

    def __init__(self, max_points: int = 2880, max_models: int = 64):
        if max_points < 1:
            raise ValueError(f"max_points must be positive, got {max_points}")
        self.max_models = max_models  # models kept per point: the page draws one line per model
        self._points: deque[tuple[float, dict[str, tuple[float, int]]]] = deque(maxlen=max_points)
        self._lock = threading.Lock()

    def add(self, state: dict[str, Any]) -> None:
        models = {m["dht_prefix"]: (m["bottleneck_throughput"], m["online_servers"]) for m in state["models"][: self.max_models]}
        with self._lock:
            self._points.append((state["generated_at"], models))

    def __len__(self) -> int:
        return len(self._points)

    def to_json(self, since: Optional[float] = None) -> dict[str, Any]:
        """Columns: {"time": [t...], "models": {prefix: {"bottleneck_throughput": [...], "online_servers": [...]}}}.

        A model absent from a read has null there, so every column is as long as "time". At most
        max_models models are returned, the most recently seen ones, however many came and went.
        """
        with self._lock:
            points = [p for p in self._points if since is None or p[0] > since]
        prefixes: dict[str, None] = {}
        for _, models in reversed(points):
            for prefix in models:
                if len(prefixes) < self.max_models:
                    prefixes.setdefault(prefix)
        columns = {}
        for prefix in prefixes:
            values = [models.get(prefix) for _, models in points]
            columns[prefix] = {
                "bottleneck_throughput": [None if v is None else v[0] for v in values],
                "online_servers": [None if v is None else v[1] for v in values],
            }
        return {"time": [t for t, _ in points], "models": columns}

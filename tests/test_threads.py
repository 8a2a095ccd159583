"""utils/threads.py: heavy one-off work runs on a short-lived thread with its own torch thread count."""

from __future__ import annotations

import threading

import pytest
import torch

from petals_like.utils.threads import DEFAULT_THREADS, in_compute_thread


def test_in_compute_thread_returns_raises_and_leaves_no_thread():
    seen: list = []

    def work(x: int) -> int:
        seen.append((threading.current_thread() is not threading.main_thread(), torch.get_num_threads()))
        return x * 2

    before = threading.active_count()
    assert in_compute_thread(work, 21, num_threads=1) == 42
    assert seen == [(True, 1)]
    assert in_compute_thread(work, 1) == 2 and seen[-1] == (True, DEFAULT_THREADS)

    def boom() -> None:
        raise ValueError("bad block")

    with pytest.raises(ValueError, match="bad block"):
        in_compute_thread(boom)
    assert threading.active_count() == before

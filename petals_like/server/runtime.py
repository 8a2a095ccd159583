"""Priorities of the work a server's scheduler runs: inference steps before forward/backward."""

from __future__ import annotations

from enum import IntEnum


class Priority(IntEnum):
    INFERENCE = 0  # someone is waiting for each token
    FORWARD = 1
    BACKWARD = 2

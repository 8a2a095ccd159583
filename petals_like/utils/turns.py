"""Gathering what one event-loop wake-up produces before sending it as one message."""

from __future__ import annotations

import asyncio
from typing import Callable

GATHER_TURNS = 8  # event-loop turns to wait at most (a turn takes microseconds)


async def settle(size: Callable[[], int], turns: int = GATHER_TURNS) -> None:
    """Yield event-loop turns until one adds nothing to size(), at most `turns` of them.

    The steps of one scheduler iteration (or the sessions of one client round) resume in the same
    loop turn and reach a queue within a few turns: waiting for a turn that adds nothing collects
    them all without a timer."""
    seen = -1
    for _ in range(turns):
        if size() == seen:
            return
        seen = size()
        await asyncio.sleep(0)

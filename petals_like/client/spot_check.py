"""Spot checks: re-run a random fraction of a server's work on another server of the same blocks.

A server that returns wrong hidden states (a bug, broken memory, or a lie) would quietly corrupt
every output that passes through it. With ClientConfig.spot_check = p > 0 the client draws, for
each forward call and each inference step it gets back, with probability p, a second server that
hosts the same blocks and asks it for the same computation (inference steps: a forward call over
the span's whole input history, compared at the step's positions). The two answers may differ by
the rounding of each server's announced dtype and quantization (tolerance()); beyond that, up to
two more servers are asked, and whichever of the two disagrees with a third server that agrees
with the other is the culprit. With no server to settle it, the checked server is blamed: its
answer is the one the client was about to use. The culprit is banned for spot_check_ban seconds,
the event is logged and appended to SpotChecker.reports, and the client goes on with the answer
the check trusts (an inference session replaces the span, replaying its history elsewhere).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Awaitable, Callable, Optional

import torch

from petals_like.config import ClientConfig
from petals_like.data_structures import RemoteSpanInfo, ServerInfo
from petals_like.routing.manager import RouteManager

logger = logging.getLogger(__name__)

# relative error (||a - b|| / ||b|| of a span's output) of a server vs. exact float32 math, per
# square root of the span's blocks (rounding errors of successive blocks add up like random ones),
# by what the server announces. float32 differs only by summation order (batch composition,
# kernels); the others are about twice what random-weight test models showed (they amplify
# rounding more than trained models): int8 2.4% for 1 block, 9.6% for 8; int4 30% / 74%; bfloat16 4.7% for 8;
# nf4 as int4 (its error per matmul is a little lower)
BLOCK_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3.5e-2, "int8": 7e-2, "int4": 0.5, "nf4": 0.5}
# what a session's wire format adds to a step's output on its way back
WIRE_TOLERANCE = {None: 0.0, "float32": 0.0, "float16": 1e-3, "bfloat16": 8e-3, "int8": 2e-2}
MAX_TIEBREAKERS = 2

RunOn = Callable[[RemoteSpanInfo], Awaitable[torch.Tensor]]  # the checked computation, on another server


class SpotCheckFailed(RuntimeError):
    """The checked server's answer was wrong; it is banned."""


def block_tolerance(info: ServerInfo) -> float:
    if info.quant_type in BLOCK_TOLERANCE:
        return BLOCK_TOLERANCE[info.quant_type]
    return BLOCK_TOLERANCE.get(info.torch_dtype, BLOCK_TOLERANCE["bfloat16"])


def tolerance(a: ServerInfo, b: ServerInfo, num_blocks: int, wire: Optional[str] = None) -> float:
    """How far two honest servers' outputs of the same num_blocks blocks may be apart."""
    return num_blocks**0.5 * (block_tolerance(a) + block_tolerance(b)) + 2 * WIRE_TOLERANCE.get(wire, 2e-2) + 1e-5


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


class SpotChecker:
    def __init__(self, routes: RouteManager, config: ClientConfig, rng: Optional[random.Random] = None):
        self.routes = routes
        self.config = config
        self.rng = rng or random.Random()
        self.checks = 0  # answers compared with another server's
        self.unverifiable = 0  # drawn for a check, but no other server could answer
        self.reports: list[dict] = []  # one per culprit found

    def draw(self) -> bool:
        """Whether to check the answer just received (probability config.spot_check)."""
        return self.config.spot_check > 0 and self.rng.random() < self.config.spot_check

    def _verifiers(self, span: RemoteSpanInfo, exclude: set[str]) -> list[RemoteSpanInfo]:
        """Other servers hosting all of span's blocks, as spans of exactly those blocks, in random order."""
        banned = self.routes.banned()
        found = [
            dataclasses.replace(other, start=span.start, end=span.end)
            for peer, other in self.routes.spans.items()
            if peer not in exclude and peer not in banned and other.start <= span.start and span.end <= other.end
        ]
        self.rng.shuffle(found)
        return found

    async def verify(self, span: RemoteSpanInfo, answer: torch.Tensor, run_on: RunOn, *, wire: Optional[str] = None) -> None:
        """Compare `answer` (span's output) with other servers'; SpotCheckFailed if span is the culprit.

        The caller treats that like any failure of the server: it is banned, and the work is redone
        elsewhere. A verifier found wrong is banned here and the answer stands."""
        opinions: list[tuple[RemoteSpanInfo, torch.Tensor]] = [(span, answer)]
        for verifier in self._verifiers(span, {span.peer_id})[: 1 + MAX_TIEBREAKERS]:
            try:
                opinions.append((verifier, (await run_on(verifier)).to(answer.dtype)))
            except Exception as e:  # a verifier that fails is no opinion; ordinary routing deals with it
                logger.debug(f"Spot check on {verifier.peer_id[-6:]} failed: {e!r}")
                continue
            if len(opinions) == 2:
                self.checks += 1
                if self._agree(opinions[0], opinions[1], wire):
                    return
                continue
            checked_ok, first_ok = (self._agree(opinion, opinions[-1], wire) for opinion in opinions[:2])
            if checked_ok:  # the newest opinion settles it, unless it agrees with neither
                if not first_ok:
                    self._blame(opinions[1], opinions[0], wire)
                return
            if first_ok:
                raise SpotCheckFailed(self._blame(opinions[0], opinions[-1], wire))
        if len(opinions) < 2:
            self.unverifiable += 1
            return
        # nobody settled it: the checked answer is the one not to use
        raise SpotCheckFailed(self._blame(opinions[0], opinions[1], wire))

    def _agree(self, a: tuple[RemoteSpanInfo, torch.Tensor], b: tuple[RemoteSpanInfo, torch.Tensor], wire: Optional[str]) -> bool:
        limit = tolerance(a[0].server_info, b[0].server_info, a[0].end - a[0].start, wire)
        return relative_error(a[1], b[1]) <= limit

    def _blame(
        self, culprit: tuple[RemoteSpanInfo, torch.Tensor], witness: tuple[RemoteSpanInfo, torch.Tensor], wire: Optional[str]
    ) -> str:
        """Ban and report the culprit; returns the reason."""
        span, info = culprit[0], culprit[0].server_info
        error = relative_error(culprit[1], witness[1])
        limit = tolerance(info, witness[0].server_info, span.end - span.start, wire)
        self.reports.append(
            {
                "peer_id": span.peer_id,
                "blocks": [span.start, span.end],
                "relative_error": error,
                "tolerance": limit,
                "witness": witness[0].peer_id,
                "torch_dtype": info.torch_dtype,
                "quant_type": info.quant_type,
                "time": time.time(),
            }
        )
        reason = (
            f"spot check: its output of blocks {span.start}:{span.end} is {error:.3g} away from "
            f"{witness[0].peer_id[-6:]}'s (tolerance {limit:.3g})"
        )
        self.routes.ban(span.peer_id, reason, duration=self.config.spot_check_ban)
        return reason

"""PrefixTracker: the names of a session's full pages, so that servers can reuse cached prefixes."""

from __future__ import annotations

from typing import Optional

import torch

from petals_like.protocol import PREFIX_PAGE_TOKENS, prefix_page_hashes


class PrefixTracker:
    """Chained hashes of a batch-1 session's full pages of tokens (protocol.prefix_page_hashes).

    The salt must cover everything besides the tokens that the keys depend on (model, adapters,
    client-side prompts). Once a step's tokens are unknown (no token ids, padding, a batch of
    several), later pages cannot be named and tracking stops for the session's life.
    """

    def __init__(self, salt: Optional[str]):
        self.salt = salt
        self.token_ids: Optional[list[int]] = [] if salt is not None else None  # None: hashing is off
        self.hashes: list[str] = []  # of the tokens so far
        self.sent = 0  # hashes every link of the chain has received

    @property
    def active(self) -> bool:
        return self.token_ids is not None

    def track(self, token_ids: Optional[torch.Tensor], hidden: torch.Tensor, pad_lens: Optional[list[int]]) -> None:
        """A step's token ids [batch, seq] (those behind `hidden`), before it is sent."""
        if self.token_ids is None:
            return
        if token_ids is None or hidden.shape[0] != 1 or any(pad_lens or []) or tuple(token_ids.shape) != tuple(hidden.shape[:2]):
            self.token_ids = None
            return
        self.token_ids.extend(int(t) for t in token_ids[0])
        parent = self.hashes[-1] if self.hashes else ""
        self.hashes.extend(prefix_page_hashes(self.token_ids, self.salt, start_page=len(self.hashes), parent=parent))

    def truncate(self, num_tokens: int) -> None:
        """The session was rolled back to its first num_tokens tokens: forget the pages past them."""
        if self.token_ids is None:
            return
        del self.token_ids[num_tokens:]
        del self.hashes[num_tokens // PREFIX_PAGE_TOKENS :]
        self.sent = min(self.sent, len(self.hashes))

    def unsent(self, start: int) -> tuple[list[str], int]:
        """(hashes from page `start` on, start) while tracking, else no hashes."""
        return (self.hashes[start:] if self.active else []), start

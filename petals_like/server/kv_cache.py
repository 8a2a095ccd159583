"""The server's paged key/value memory: one pool of fixed-size pages shared by every session.

A sequence holds pages only for the tokens it has (`SequencePages`), so memory follows what
sessions actually use, not the max_length they asked for. Full pages can be shared between
sequences through `PrefixIndex` (same prompt prefix, same scope) thanks to reference counts.

Threading: the bookkeeping here (allocate / retain / release, page tables, the prefix index) is
single-threaded and runs on the server's event loop. The compute thread only reads and writes
the tensors of pages that were allocated before it was handed a step, and never frees anything.

Invariant that keeps sharing safe: a page that more than one holder references is full and
nobody writes into it. Sequences only append at their `length`; attached prefix pages and
indexed pages are full pages below it, so new tokens always land in a page of their own
(`batched_span` checks that every page it writes has exactly one holder).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from typing import Callable, Iterable, Optional, Protocol, Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


class CacheExhausted(RuntimeError):
    """No free pages (retriable: the client may wait or go elsewhere)."""


class _Evictor(Protocol):
    def evict(self, n: int) -> int: ...


class KVPool:
    """Keys/values of every block of a span, for all sessions, in fixed-size pages.

    Layout: keys and values each in one tensor `[layers, kv_heads, num_pages + 1, page_size, head_dim]`;
    `layer(i)` gives the views [kv_heads, num_pages + 1, page_size, head_dim]. Why heads first: attention
    wants each head's keys contiguous ([kv_heads, tokens, head_dim]), and
    with this layout gathering a sequence's pages is one `index_select` by page id (a handful of
    indices, each a contiguous page_size x head_dim block) whose result already has that shape for
    SDPA, as a view: no permute-and-copy per block. Token i of a page table lives at slot
    `page * page_size + offset` of the view [kv_heads, slots, head_dim], so writing the new tokens
    of a whole batch is one `index_copy_` over slots.

    Masked-out keys must be finite (a stale inf/NaN from a page's previous owner would turn a 0
    attention weight into NaN), because batched attention gathers whole pages: hence the extra page
    (index `num_pages`, the null page) that is never allocated and stays zero, used to pad page
    tables, and `zero_slots`, with which a step clears the unwritten tail of each page it starts.
    All layers live in one tensor so that clearing costs one op per step, not one per block.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if min(num_layers, num_kv_heads, head_dim, num_pages, page_size) <= 0:
            raise ValueError(f"bad pool shape: {num_layers=}, {num_kv_heads=}, {head_dim=}, {num_pages=}, {page_size=}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.null_page = num_pages  # the zero page after the allocatable ones (see the class docstring)
        shape = (num_layers, num_kv_heads, num_pages + 1, page_size, head_dim)
        # empty, not zeros: memory is committed by the OS only when first written, so a pool sized for
        # the worst case costs what sessions use; the null page is zeroed here and every other page's
        # unwritten tail when a step starts it (zero_slots), so no read ever sees uninitialized memory
        self._keys = torch.empty(shape, dtype=dtype, device=self.device)
        self._values = torch.empty(shape, dtype=dtype, device=self.device)
        self._keys[:, :, num_pages].zero_()
        self._values[:, :, num_pages].zero_()
        self._refcounts = [0] * num_pages
        # a stack: recently freed pages are reused first, their memory is more likely to be in cache
        self._free = list(range(num_pages - 1, -1, -1))
        self.evictor: Optional[_Evictor] = None  # the prefix index, once one is attached

    @property
    def num_free(self) -> int:
        return len(self._free)

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """Key and value storage of one layer: [kv_heads, num_pages + 1, page_size, head_dim] each."""
        return self._keys[layer], self._values[layer]

    def zero_slots(self, slots: Tensor) -> None:
        """Zero slots [n] (page * page_size + offset) of keys and values in every layer (compute thread)."""
        for store in (self._keys, self._values):
            store.view(self.num_layers, self.num_kv_heads, -1, self.head_dim).index_fill_(2, slots, 0)

    def refcount(self, page: int) -> int:
        return self._refcounts[page]

    def copy_page(self, src: int, dst: int) -> None:
        """Copy every layer's keys and values of page src into page dst (both allocated)."""
        self._check_held(src)
        self._check_held(dst)
        for store in (self._keys, self._values):
            store[:, :, dst].copy_(store[:, :, src])

    def allocate(self, n: int) -> list[int]:
        """n free pages, each with one reference; all or nothing.

        If fewer than n are free, the prefix index (if any) first evicts cached pages that no
        sequence holds, least recently used first.
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        evicted = 0
        if n > len(self._free) and self.evictor is not None:
            evicted = self.evictor.evict(n - len(self._free))
        if n > len(self._free):
            raise CacheExhausted(
                f"KV cache is full: need {n} pages of {self.page_size} tokens, {len(self._free)} of "
                f"{self.num_pages} free (after evicting {evicted} cached prefix pages)"
            )
        pages = [self._free.pop() for _ in range(n)]
        for page in pages:
            self._refcounts[page] = 1
        return pages

    def retain(self, pages: Iterable[int]) -> None:
        """One more reference to each of these allocated pages."""
        pages = list(pages)
        for page in pages:
            self._check_held(page)
        for page in pages:
            self._refcounts[page] += 1

    def release(self, pages: Iterable[int]) -> None:
        """Drop one reference to each page; a page with no references left goes back to the free list."""
        pages = list(pages)
        for page, times in Counter(pages).items():
            self._check_held(page, times)
        for page in pages:
            self._refcounts[page] -= 1
            if self._refcounts[page] == 0:
                self._free.append(page)

    def _check_held(self, page: int, times: int = 1) -> None:
        # pages come from our own bookkeeping, never from peers: a failure here is a server bug,
        # caught before any count changes so the pool stays consistent
        if not 0 <= page < self.num_pages or self._refcounts[page] < times:
            raise ValueError(f"page {page} is not allocated ({times} references to drop)")


class SequencePages:
    """Page table of one sequence: its pages in order and how many tokens it holds.

    Token i lives at slot `pages[i // page_size] * page_size + i % page_size` of every layer.
    `length` counts committed tokens; pages may hold room for more (reserved, not yet written).
    """

    def __init__(self) -> None:
        self.pages: list[int] = []
        self.length = 0

    def capacity(self, pool: KVPool) -> int:
        return len(self.pages) * pool.page_size

    def reserve(self, pool: KVPool, new_tokens: int) -> None:
        """Allocate pages so that length + new_tokens fit; all-or-nothing (raises CacheExhausted)."""
        if new_tokens < 0:
            raise ValueError(f"new_tokens={new_tokens} must be non-negative")
        needed = -(-(self.length + new_tokens) // pool.page_size) - len(self.pages)
        if needed > 0:
            self.pages.extend(pool.allocate(needed))

    def truncate(self, pool: KVPool, length: int) -> None:
        """Forget the tokens from `length` on: the pages past it go back (shared ones keep their other
        holders). The next token then writes into the page that holds position `length`; if another
        holder shares that page (the prefix index, another sequence), it is copied first, so that
        nobody else ever sees the new tokens."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate {self.length} tokens to {length}")
        keep = -(-length // pool.page_size)
        if length % pool.page_size:
            self._own_page(pool, keep - 1)  # first: a full pool raises CacheExhausted with nothing changed
        dropped, self.pages = self.pages[keep:], self.pages[:keep]
        self.length = length
        pool.release(dropped)

    def share(self, pool: KVPool) -> SequencePages:
        """A second page table holding this one's tokens in the same pages (one more reference each);
        call own_last_page() on each holder before it writes (beam search's row reordering)."""
        other = SequencePages()
        other.pages = self.pages[: -(-self.length // pool.page_size)]
        pool.retain(other.pages)
        other.length = self.length
        return other

    def own_last_page(self, pool: KVPool) -> None:
        """Copy the partly filled last page if another holder shares it (raises CacheExhausted with
        nothing changed when no page is free)."""
        if self.length % pool.page_size:
            self._own_page(pool, self.length // pool.page_size)

    def _own_page(self, pool: KVPool, index: int) -> None:
        page = self.pages[index]
        if pool.refcount(page) > 1:
            (own,) = pool.allocate(1)
            pool.copy_page(page, own)
            pool.release([page])
            self.pages[index] = own

    def free(self, pool: KVPool) -> None:
        """Release every page (shared prefix pages too: they are refcounted) and forget the tokens."""
        pages, self.pages, self.length = self.pages, [], 0
        pool.release(pages)

    def attach_prefix(self, pool: KVPool, pages: Sequence[int]) -> None:
        """Start this (empty) sequence with shared full pages; length becomes len(pages) * page_size.

        Only an empty sequence may attach: then the shared pages are exactly its first pages, they
        are full, and its next token starts a fresh page, so nothing ever writes into them.
        """
        if self.pages or self.length:
            raise ValueError("attach_prefix needs an empty sequence (attach before reserving anything)")
        pool.retain(pages)
        self.pages = list(pages)
        self.length = len(self.pages) * pool.page_size

    def full_pages(self, pool: KVPool) -> list[int]:
        """Pages filled with committed tokens: those a prefix index may cache."""
        return self.pages[: self.length // pool.page_size]


class PrefixIndex:
    """Full pages by (scope, chained page hash); a page is reusable only within its scope.

    The scope names everything besides the tokens that the keys/values depend on (model, blocks
    [first, last) of the span, dtype, ...): another scope never hits. The index holds one reference
    to every page it lists, and each page is listed at most once, so a page is held by sequences
    exactly when its reference count is above 1; only pages at 1 are ever evicted.

    LRU order: within one chain, deeper pages rank older (lookup and insert touch a chain from its
    end to its start), so eviction trims chains from the end and leaves the shared beginning of a
    prompt (a system prompt) reachable longest. Lookup stops at the first missing page anyway.
    """

    def __init__(self, pool: KVPool, max_pages: Optional[int] = None) -> None:
        if max_pages is not None and max_pages < 0:
            raise ValueError(f"max_pages={max_pages} must be non-negative")
        self.pool = pool
        self.max_pages = max_pages
        self._entries: OrderedDict[tuple[str, bytes | str], int] = OrderedDict()  # least recent first
        self._indexed: set[int] = set()  # pages listed, to keep each page listed once
        self.hits = 0  # pages found by lookup()
        self.misses = 0  # pages asked for by lookup() and not found (past the longest hit)
        self.evictions = 0  # pages dropped from the index
        pool.evictor = self

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, scope: str, hashes: Sequence[bytes | str]) -> list[int]:
        """Pages of the longest prefix of `hashes` present in `scope` (not retained: attach_prefix does that)."""
        found: list[int] = []
        for h in hashes:
            page = self._entries.get((scope, h))
            if page is None:
                break
            found.append(page)
        for h in reversed(hashes[: len(found)]):
            self._entries.move_to_end((scope, h))
        self.hits += len(found)
        self.misses += len(hashes) - len(found)
        return found

    def insert(self, scope: str, hashes: Sequence[bytes | str], pages: Sequence[int]) -> None:
        """Cache full pages of a sequence under their chained hashes (retains them).

        Hashes already present keep their page (an equal copy); a page already listed stays under
        its first key. With max_pages, unheld pages are evicted to make room; if none can be, the
        remaining pages are not cached.
        """
        if len(hashes) != len(pages):
            raise ValueError(f"{len(hashes)} hashes for {len(pages)} pages")
        keys = []
        for h, page in zip(hashes, pages):  # shallow pages first: they are worth more when room runs out
            key = (scope, h)
            keys.append(key)
            if key in self._entries or page in self._indexed:
                continue
            if self.max_pages is not None and len(self._entries) >= self.max_pages and self.evict(1) == 0:
                break
            self.pool.retain([page])
            self._entries[key] = page
            self._indexed.add(page)
        for key in reversed(keys):  # page 0 ends most recent: deeper pages are evicted first
            if key in self._entries:
                self._entries.move_to_end(key)

    def evict(self, n: int) -> int:
        """Free up to n pages referenced only by the index, least recently used first; returns how many."""
        victims = []
        for key, page in self._entries.items():
            if len(victims) >= n:
                break
            if self.pool.refcount(page) == 1:  # held by no sequence
                victims.append(key)
        for key in victims:
            page = self._entries.pop(key)
            self._indexed.discard(page)
            self.pool.release([page])
        self.evictions += len(victims)
        if victims:
            logger.debug(f"Evicted {len(victims)} cached prefix pages, {len(self._entries)} remain")
        return len(victims)


def reserve_rows(
    pool: KVPool, sequences: list[SequencePages], new_tokens: int, check: Optional[Callable[[], None]] = None
) -> None:
    """Reserve for every row or for none: a batch never holds half of what one step needs.

    check runs once everything is reserved; if it raises CacheExhausted, the reservation is undone."""
    reserved: list[tuple[SequencePages, int]] = []  # (row, its page count before this call)
    try:
        for pages in sequences:
            before = len(pages.pages)
            pages.reserve(pool, new_tokens)
            reserved.append((pages, before))
        if check is not None and any(len(pages.pages) > before for pages, before in reserved):
            check()
    except CacheExhausted:
        for pages, before in reserved:
            extra = pages.pages[before:]
            del pages.pages[before:]
            pool.release(extra)
        raise

"""Paged KV pool, page tables and the prefix index: pure bookkeeping, no model and no network."""

from __future__ import annotations

import random

import pytest
import torch

from petals_like.server.kv_cache import CacheExhausted, KVPool, PrefixIndex, SequencePages

PAGE = 4


def make_pool(num_pages: int = 16) -> KVPool:
    return KVPool(
        num_layers=2, num_kv_heads=2, head_dim=8, num_pages=num_pages, page_size=PAGE, dtype=torch.float32, device="cpu"
    )


def sequence(pool: KVPool, tokens: int) -> SequencePages:
    """A sequence holding `tokens` committed tokens."""
    seq = SequencePages()
    seq.reserve(pool, tokens)
    seq.length = tokens
    return seq


def test_pool_shape_and_zero_page() -> None:
    pool = make_pool(5)
    keys, values = pool.layer(1)
    assert keys.shape == values.shape == (2, 6, PAGE, 8)  # one extra (null) page
    assert pool.null_page == 5 and not keys[:, pool.null_page].any() and not values[:, pool.null_page].any()
    assert pool.num_free == 5 and pool.page_size == PAGE and pool.num_pages == 5


def test_allocate_retain_release_refcounts() -> None:
    pool = make_pool(4)
    pages = pool.allocate(3)
    assert len(set(pages)) == 3 and pool.num_free == 1
    assert all(pool.refcount(p) == 1 for p in pages)
    pool.retain(pages[:1])
    pool.release(pages)
    assert pool.refcount(pages[0]) == 1 and pool.num_free == 3  # still held once
    pool.release(pages[:1])
    assert pool.num_free == 4 and pool.refcount(pages[0]) == 0
    with pytest.raises(ValueError, match="not allocated"):
        pool.release(pages[:1])  # double free is a bug, never silently accepted
    with pytest.raises(ValueError, match="not allocated"):
        pool.retain([pages[0]])
    with pytest.raises(ValueError, match="not allocated"):
        pool.release([pages[1], pages[1]])  # held once, dropped twice: refused as a whole
    assert pool.refcount(pages[1]) == 0 and pool.num_free == 4
    assert pool.allocate(0) == []


def test_allocate_is_all_or_nothing_with_a_clear_message() -> None:
    pool = make_pool(4)
    held = pool.allocate(3)
    with pytest.raises(CacheExhausted, match=r"need 2 pages of 4 tokens, 1 of 4 free"):
        pool.allocate(2)
    assert pool.num_free == 1  # nothing taken by the failed call
    seq = sequence(pool, 3)  # uses the last page
    with pytest.raises(CacheExhausted):
        seq.reserve(pool, 10)
    assert seq.pages and len(seq.pages) == 1 and seq.length == 3  # unchanged
    seq.reserve(pool, 1)  # still fits in its page: needs no allocation
    pool.release(held)
    seq.reserve(pool, 10)  # 3 + 10 tokens -> 4 pages
    assert len(seq.pages) == 4 and seq.capacity(pool) == 16


def test_every_page_comes_back_after_freeing_many_sequences() -> None:
    rng = random.Random(0)
    pool = make_pool(64)
    index = PrefixIndex(pool)
    seqs: list[SequencePages] = []
    for i in range(40):
        seq = SequencePages()
        if seqs and rng.random() < 0.3:  # share a prefix with an earlier sequence
            donor = rng.choice(seqs)
            shared = donor.full_pages(pool)[: rng.randint(0, 2)]
            seq.attach_prefix(pool, shared)
        new_tokens = rng.randint(1, 9)
        try:
            seq.reserve(pool, new_tokens)
        except CacheExhausted:
            seq.free(pool)
            continue
        seq.length += new_tokens  # what the scheduler commits after a step
        if rng.random() < 0.3:
            full = seq.full_pages(pool)
            index.insert("scope", [f"{i}-{j}" for j in range(len(full))], full)
        seqs.append(seq)
        if rng.random() < 0.2:  # free some on the way, in random order
            seqs.pop(rng.randrange(len(seqs))).free(pool)
    _check_no_writable_page_shared(pool, seqs)
    rng.shuffle(seqs)
    for seq in seqs:
        seq.free(pool)
        assert seq.pages == [] and seq.length == 0
    index.evict(len(index))
    assert len(index) == 0
    assert pool.num_free == pool.num_pages
    assert all(pool.refcount(p) == 0 for p in range(pool.num_pages))


def _check_no_writable_page_shared(pool: KVPool, seqs: list[SequencePages]) -> None:
    """A page two holders reference is full and below every holder's length: nobody writes into it."""
    owners: dict[int, list[SequencePages]] = {}
    for seq in seqs:
        for page in seq.pages:
            owners.setdefault(page, []).append(seq)
    for seq in seqs:
        writable = seq.pages[seq.length // PAGE :]  # pages at or after the next token
        for page in writable:
            assert owners[page] == [seq] and pool.refcount(page) == 1
    for page, holders in owners.items():
        assert pool.refcount(page) >= len(holders)


def test_attach_prefix_starts_a_fresh_page() -> None:
    pool = make_pool(8)
    donor = sequence(pool, 2 * PAGE + 1)
    seq = SequencePages()
    seq.attach_prefix(pool, donor.full_pages(pool))
    assert seq.length == 2 * PAGE and seq.pages == donor.pages[:2]
    assert [pool.refcount(p) for p in donor.pages] == [2, 2, 1]
    seq.reserve(pool, 1)
    assert len(seq.pages) == 3 and seq.pages[2] not in donor.pages  # the next token goes to its own page
    with pytest.raises(ValueError, match="empty sequence"):
        seq.attach_prefix(pool, donor.full_pages(pool))
    donor.free(pool)
    assert [pool.refcount(p) for p in seq.pages] == [1, 1, 1]
    seq.free(pool)
    assert pool.num_free == 8


def test_prefix_lookup_longest_prefix_and_scopes() -> None:
    pool = make_pool(8)
    index = PrefixIndex(pool)
    seq = sequence(pool, 3 * PAGE)
    index.insert("model-a", [b"h0", b"h1", b"h2"], seq.pages)
    assert [pool.refcount(p) for p in seq.pages] == [2, 2, 2]
    assert index.lookup("model-a", [b"h0", b"h1", b"zz", b"h2"]) == seq.pages[:2]
    assert (index.hits, index.misses) == (2, 2)
    assert index.lookup("model-b", [b"h0"]) == []  # another scope never hits
    assert index.lookup("model-a", [b"h9", b"h0"]) == []  # a prefix, not any subset
    assert (index.hits, index.misses) == (2, 5)
    index.insert("model-a", [b"h0"], seq.pages[:1])  # already present: not retained twice
    assert pool.refcount(seq.pages[0]) == 2
    with pytest.raises(ValueError):
        index.insert("model-a", [b"h0"], [])


def test_eviction_spares_pages_that_sequences_hold() -> None:
    pool = make_pool(8)
    index = PrefixIndex(pool)
    kept, dropped = sequence(pool, 2 * PAGE), sequence(pool, 2 * PAGE)
    index.insert("s", [b"k0", b"k1"], kept.pages)
    index.insert("s", [b"d0", b"d1"], dropped.pages)
    dropped_pages = list(dropped.pages)
    dropped.free(pool)  # now only the index holds them
    assert pool.num_free == 4
    assert index.evict(10) == 2 and index.evictions == 2
    assert pool.num_free == 6 and all(pool.refcount(p) == 0 for p in dropped_pages)
    assert index.lookup("s", [b"k0", b"k1"]) == kept.pages  # held pages stay cached
    assert index.lookup("s", [b"d0"]) == []


def test_eviction_is_lru_and_trims_chains_from_the_end() -> None:
    pool = make_pool(8)
    index = PrefixIndex(pool)
    old, new = sequence(pool, 2 * PAGE), sequence(pool, 2 * PAGE)
    index.insert("s", [b"o0", b"o1"], old.pages)
    index.insert("s", [b"n0", b"n1"], new.pages)
    old_pages, new_pages = list(old.pages), list(new.pages)
    old.free(pool)  # only the index holds them now
    new.free(pool)
    index.lookup("s", [b"o0", b"o1"])  # touch: the "n" chain is now least recently used
    assert index.evict(1) == 1
    assert index.lookup("s", [b"n0", b"n1"]) == new_pages[:1]  # its deepest page went first
    # that lookup touched n0: now the "o" chain is the older one, again trimmed from its end
    assert index.evict(1) == 1
    assert index.lookup("s", [b"o0", b"o1"]) == old_pages[:1]
    assert index.evict(5) == 2 and len(index) == 0 and pool.num_free == 8


def test_allocate_evicts_cached_pages_under_pressure() -> None:
    pool = make_pool(6)
    index = PrefixIndex(pool)
    held = sequence(pool, 2 * PAGE)
    cached = sequence(pool, 3 * PAGE)
    index.insert("s", [b"h0", b"h1"], held.pages)
    index.insert("s", [b"c0", b"c1", b"c2"], cached.pages)
    cached_pages = list(cached.pages)
    cached.free(pool)
    assert pool.num_free == 1
    pages = pool.allocate(3)  # 1 free + 2 evicted (deepest of the cached chain first)
    assert len(pages) == 3 and index.evictions == 2
    assert index.lookup("s", [b"c0", b"c1", b"c2"]) == cached_pages[:1]
    with pytest.raises(CacheExhausted, match=r"after evicting 1 cached prefix pages"):
        pool.allocate(2)  # c0 can go, held pages cannot: still one short
    assert pool.num_free == 1 and index.lookup("s", [b"h0", b"h1"]) == held.pages


def test_max_pages_caps_the_index() -> None:
    pool = make_pool(8)
    index = PrefixIndex(pool, max_pages=2)
    seq = sequence(pool, 3 * PAGE)
    index.insert("s", [b"a", b"b", b"c"], seq.pages)
    assert len(index) == 2  # every listed page is held by seq: nothing to evict, the deepest is not cached
    assert index.lookup("s", [b"a", b"b", b"c"]) == seq.pages[:2]
    seq.free(pool)
    other = sequence(pool, PAGE)
    index.insert("s", [b"x"], other.pages)  # room made by evicting an unheld page
    assert len(index) == 2 and index.evictions == 1


def test_truncate_returns_pages_and_copies_a_shared_partial_page() -> None:
    pool = make_pool(8)
    owner = sequence(pool, 3 * PAGE)  # 3 full pages, also held by a second sequence (a cached prefix)
    for layer in range(pool.num_layers):
        keys, values = pool.layer(layer)
        for i, page in enumerate(owner.pages):
            keys[:, page].fill_(10 * layer + i + 1)
            values[:, page].fill_(-(10 * layer + i + 1))
    reuser = SequencePages()
    reuser.attach_prefix(pool, owner.pages)
    free = pool.num_free

    reuser.truncate(pool, PAGE + 1)  # keeps page 0 whole and one token of page 1
    assert reuser.length == PAGE + 1 and len(reuser.pages) == 2
    assert reuser.pages[0] == owner.pages[0]  # a full page stays shared: nothing writes into it
    assert reuser.pages[1] != owner.pages[1]  # the partial one is the reuser's own copy now
    assert pool.refcount(owner.pages[1]) == 1 and pool.refcount(owner.pages[2]) == 1 and pool.refcount(reuser.pages[1]) == 1
    assert pool.num_free == free - 1
    for layer in range(pool.num_layers):
        keys, values = pool.layer(layer)
        assert torch.equal(keys[:, reuser.pages[1]], keys[:, owner.pages[1]])
        assert torch.equal(values[:, reuser.pages[1]], values[:, owner.pages[1]])

    owner.truncate(pool, PAGE)  # at a page boundary: no copy, the pages past it go back
    assert owner.pages == reuser.pages[:1] and pool.num_free == free + 1
    owner.truncate(pool, PAGE)  # to its own length: nothing changes
    assert owner.length == PAGE and pool.num_free == free + 1
    with pytest.raises(ValueError):
        owner.truncate(pool, PAGE + 1)  # cannot grow
    for seq in (owner, reuser):
        seq.free(pool)
    assert pool.num_free == pool.num_pages


def test_truncate_needs_a_free_page_only_to_copy_and_changes_nothing_without_one() -> None:
    pool = make_pool(2)
    owner = sequence(pool, 2 * PAGE)
    reuser = SequencePages()
    reuser.attach_prefix(pool, owner.pages)
    with pytest.raises(CacheExhausted):
        reuser.truncate(pool, 1)
    assert reuser.length == 2 * PAGE and reuser.pages == owner.pages and pool.refcount(owner.pages[0]) == 2

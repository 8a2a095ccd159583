"""run_batched over the paged pool against BlockSpan.forward (no cache) on each sequence alone.

Tolerance: linear layers over a batch of rows round differently from the same layers over one
row (the BLAS kernel depends on the row count), and the tiny models' hidden states reach ~50, so
float32 results agree to ~1e-6 relative, not 1e-5 absolute. float32 cases therefore compare at
1e-5 of the output's magnitude, and one float64 case checks the strict 1e-5 absolute bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from torch import Tensor

from petals_like.models.span import BlockSpan
from petals_like.models.spec import ModelSpec
from petals_like.protocol import prefix_page_hashes
from petals_like.server.batched_span import PagedRunner, Segment, run_batched
from petals_like.server.kv_cache import KVPool, PrefixIndex, SequencePages
from petals_like.server.loading import load_span

PAGE = 4  # small, so sequences cross many page boundaries


@dataclass
class Seq:
    """One simulated session: its inputs and how many tokens it sends in each iteration (0 = absent)."""

    hidden: Tensor  # [tokens, hidden]
    chunks: list[int]
    pad_len: int = 0
    pages: SequencePages = field(default_factory=SequencePages)
    done: int = 0  # tokens already run
    next_chunk: int = 0  # index into chunks
    outputs: list[Tensor] = field(default_factory=list)

    def output(self) -> Tensor:
        return torch.cat(self.outputs)


def load(path: Path, dtype: torch.dtype = torch.float32) -> BlockSpan:
    spec = ModelSpec.from_pretrained(path)
    return load_span(path, spec, 0, spec.num_blocks, dtype, torch.device("cpu"), progress=False)


def new_pool(span: BlockSpan, num_layers: Optional[int] = None, num_pages: int = 256, poison: bool = False) -> KVPool:
    """poison: fill every allocatable page with NaN, as stale data from a page's previous owner could be;
    a sequence must never read a slot it has not written, not even under a mask."""
    spec = span.spec
    dtype = span.blocks[0].input_layernorm.weight.dtype
    pool = KVPool(
        num_layers=num_layers or len(span.blocks),
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        num_pages=num_pages,
        page_size=PAGE,
        dtype=dtype,
        device="cpu",
    )
    if poison:
        for layer in range(pool.num_layers):
            for store in pool.layer(layer):
                store[:, : pool.num_pages] = float("nan")
    return pool


def make_seq(span: BlockSpan, chunks: list[int], pad_len: int = 0, seed: int = 0) -> Seq:
    gen = torch.Generator().manual_seed(seed)
    dtype = span.blocks[0].input_layernorm.weight.dtype
    return Seq(torch.randn(sum(chunks), span.spec.hidden_size, generator=gen).to(dtype), chunks, pad_len)


def run_iterations(span: BlockSpan, pool: KVPool, seqs: list[Seq], first: int = 0, last: Optional[int] = None) -> None:
    """What the scheduler does: reserve, run every present sequence's chunk in one call, then commit."""
    while any(s.next_chunk < len(s.chunks) for s in seqs):
        present, counts = [], []
        for s in seqs:
            if s.next_chunk < len(s.chunks):
                s.next_chunk += 1
                if s.chunks[s.next_chunk - 1] > 0:
                    present.append(s)
                    counts.append(s.chunks[s.next_chunk - 1])
        if not present:
            continue
        segments = []
        for s, n in zip(present, counts):
            s.pages.reserve(pool, n)
            segments.append(Segment(s.pages, s.pages.length, n, s.pad_len))
        hidden = torch.cat([s.hidden[s.done : s.done + n] for s, n in zip(present, counts)])
        with torch.inference_mode():
            out = run_batched(span, pool, segments, hidden, first=first, last=last)
        assert out.shape == hidden.shape
        offset = 0
        for s, seg in zip(present, segments):
            assert s.pages.length == seg.past_len  # run_batched does not commit
            s.outputs.append(out[offset : offset + seg.num_tokens])
            offset += seg.num_tokens
            s.pages.length += seg.num_tokens
            s.done += seg.num_tokens


def reference(span: BlockSpan, seq: Seq, first: int = 0, last: Optional[int] = None) -> Tensor:
    """The tokens of all its chunks at once through BlockSpan.forward (no cache), this sequence alone."""
    pad_lens = torch.tensor([seq.pad_len]) if seq.pad_len else None
    tokens = sum(seq.chunks)
    with torch.inference_mode():
        return span(seq.hidden[None, :tokens], pad_lens=pad_lens, first=first, last=last)[0]


def assert_matches(got: Tensor, ref: Tensor) -> None:
    scale = 1.0 if got.dtype == torch.float64 else max(1.0, ref.abs().max().item())
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-5 * scale, f"max abs diff {diff:.3g} (allowed {1e-5 * scale:.3g})"


@pytest.fixture(scope="module")
def llama(make_model: Callable[..., Path]) -> BlockSpan:
    return load(make_model(family="llama", preset="tiny"))


def mixed_seqs(span: BlockSpan) -> list[Seq]:
    return [
        make_seq(span, [11, 1, 1, 1, 1], seed=1),  # prompt in one go, then decodes
        make_seq(span, [5, 6, 1, 1, 1], pad_len=2, seed=2),  # left-padded prompt in two chunks
        make_seq(span, [1, 1, 1, 1, 1], seed=3),  # decodes from the first token
        make_seq(span, [3, 1, 2, 1, 1], pad_len=3, seed=4),  # only pads at first, then a 2-token step
        make_seq(span, [0, 0, 9, 1, 1], seed=5),  # arrives later
        make_seq(span, [0, 1, 1, 0, 1], pad_len=1, seed=6),  # skips an iteration
    ]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mixed_iterations_match_each_sequence_alone(make_model: Callable[..., Path], family: str) -> None:
    span = load(make_model(family=family, preset="tiny"))
    pool = new_pool(span, poison=True)
    seqs = mixed_seqs(span)
    run_iterations(span, pool, seqs)
    for seq in seqs:
        assert_matches(seq.output(), reference(span, seq))


def test_float64_matches_within_1e5_absolute(make_model: Callable[..., Path]) -> None:
    span = load(make_model(family="llama", preset="tiny"), torch.float64)
    pool = new_pool(span)
    seqs = mixed_seqs(span)
    run_iterations(span, pool, seqs)
    for seq in seqs:
        assert_matches(seq.output(), reference(span, seq))


@pytest.mark.parametrize("case", ["equal", "equal_padded", "unequal"])
def test_all_decode_batches(llama: BlockSpan, case: str) -> None:
    """Every segment one token: the single-call path, and its no-mask case for equal lengths without pads."""
    pool = new_pool(llama, poison=True)
    prompt = {"equal": lambda i: 6, "equal_padded": lambda i: 6, "unequal": lambda i: 2 + i}[case]
    pad = (lambda i: i % 3) if case == "equal_padded" else (lambda i: 0)
    seqs = [make_seq(llama, [prompt(i)] + [1] * 4, pad_len=pad(i), seed=i) for i in range(8)]
    seqs += [make_seq(llama, [1] * 5, seed=9)] if case == "unequal" else []
    run_iterations(llama, pool, seqs)
    for seq in seqs:
        assert_matches(seq.output(), reference(llama, seq))


@pytest.mark.parametrize("pad_len", [0, 3])
def test_sliding_window(make_model: Callable[..., Path], pad_len: int) -> None:
    span = load(make_model(family="mistral", preset="tiny", sliding_window=6))
    assert span.spec.sliding_window == 6
    pool = new_pool(span, poison=True)
    seqs = [
        make_seq(span, [9, 7, 1, 1, 1, 5, 1, 1], pad_len=pad_len, seed=1),  # chunks longer than the window
        make_seq(span, [2, 1, 1, 1, 1, 1, 1, 1], pad_len=min(pad_len, 1), seed=2),
        make_seq(span, [4, 4, 1, 1, 1, 1, 1, 1], seed=3),
        make_seq(span, [1, 1, 1, 1, 1, 1, 1, 1], pad_len=pad_len, seed=4),
    ]
    run_iterations(span, pool, seqs)
    for seq in seqs:
        assert_matches(seq.output(), reference(span, seq))


def test_chunked_prefill_equals_one_unchunked_forward(llama: BlockSpan) -> None:
    pool = new_pool(llama)
    prompt = make_seq(llama, [8, 9, 6], seed=1)  # chunks end mid-page and on a page boundary
    neighbour = make_seq(llama, [5, 1, 1], seed=2)  # decodes alongside
    run_iterations(llama, pool, [prompt, neighbour])
    with torch.inference_mode():
        whole = llama(prompt.hidden[None])[0]  # no cache, one call
    assert_matches(prompt.output(), whole)
    assert_matches(neighbour.output(), reference(llama, neighbour))


def test_shared_prefix_pages_give_the_same_outputs(llama: BlockSpan) -> None:
    pool = new_pool(llama, num_pages=32)
    index = PrefixIndex(pool)
    scope = "tiny-llama:0-8:float32:pad=0"
    first = make_seq(llama, [14, 1, 1], seed=1)
    run_iterations(llama, pool, [first])
    full = first.pages.full_pages(pool)
    assert len(full) == 4  # 16 tokens -> 4 full pages
    first_tokens = list(range(16))  # stand-ins for the tokens behind first.hidden
    index.insert(scope, prefix_page_hashes(first_tokens, "salt", page_tokens=PAGE), full)

    gen = torch.Generator().manual_seed(7)
    tail = torch.randn(5, llama.spec.hidden_size, generator=gen)
    second_hidden = torch.cat([first.hidden[:10], tail])  # the same first 10 tokens: 2 shared pages
    second_tokens = first_tokens[:10] + [100, 101, 102, 103, 104]
    pages = index.lookup(scope, prefix_page_hashes(second_tokens, "salt", page_tokens=PAGE))
    assert pages == full[:2] and index.hits == 2
    second = Seq(second_hidden, [0, 5, 1, 1])
    second.pages.attach_prefix(pool, pages)
    second.done = second.pages.length  # the shared tokens are not recomputed
    first.chunks += [0, 1, 1]
    first.hidden = torch.cat([first.hidden, torch.randn(3, llama.spec.hidden_size, generator=gen)])
    before = [t.clone() for layer in range(pool.num_layers) for t in pool.layer(layer)]
    run_iterations(llama, pool, [first, second])  # both write next to the shared pages, in one batch

    recomputed = Seq(second_hidden, [15])
    assert_matches(second.output(), reference(llama, recomputed)[8:])
    assert_matches(first.output(), reference(llama, first))  # the donor was not disturbed
    shared = torch.tensor(full[:2])
    for old, store in zip(before, (t for layer in range(pool.num_layers) for t in pool.layer(layer))):
        assert torch.equal(old[:, shared], store[:, shared])


def test_shared_pages_are_never_written(llama: BlockSpan) -> None:
    pool = new_pool(llama, num_pages=8)
    donor = make_seq(llama, [8], seed=1)
    run_iterations(llama, pool, [donor])
    seq = SequencePages()
    seq.attach_prefix(pool, donor.pages.full_pages(pool))
    seq.length -= 1  # a (buggy) rollback into a shared page
    with pytest.raises(ValueError, match="shared"):
        run_batched(llama, pool, [Segment(seq, seq.length, 1)], torch.zeros(1, llama.spec.hidden_size))


def test_sub_range_of_blocks(llama: BlockSpan) -> None:
    pool = new_pool(llama, num_layers=3)  # pool layer i holds block first + i
    seqs = [make_seq(llama, [7, 1, 1], seed=1), make_seq(llama, [1, 3, 1], pad_len=1, seed=2)]
    run_iterations(llama, pool, seqs, first=2, last=5)
    for seq in seqs:
        assert_matches(seq.output(), reference(llama, seq, first=2, last=5))


def test_dynamic_rope_uses_each_sequences_own_length(make_model: Callable[..., Path]) -> None:
    span = load(
        make_model(family="llama", preset="tiny", rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=8)
    )
    pool = new_pool(span)
    seqs = [make_seq(span, [12, 1, 1], seed=1), make_seq(span, [3, 1, 1], seed=2)]  # one past the limit, one not
    run_iterations(span, pool, seqs)
    for seq in seqs:
        # dynamic scaling depends on the length so far, so a stepwise run differs from one whole
        # forward (in transformers too): the reference is the same steps, this sequence alone
        alone = PagedRunner(span, 1, sum(seq.chunks))
        steps, done = [], 0
        for n in (n for n in seq.chunks if n > 0):
            steps.append(alone.step(seq.hidden[None, done : done + n])[0])
            done += n
        assert_matches(seq.output(), torch.cat(steps))


def test_bad_segments_are_refused_before_any_write(llama: BlockSpan) -> None:
    pool = new_pool(llama, num_pages=8)
    for storage in pool.layer(0):
        storage.zero_()  # the pool starts uninitialized; zeros make "nothing was written" checkable
    seq = SequencePages()
    seq.reserve(pool, 3)
    hidden = torch.zeros(3, llama.spec.hidden_size)
    with pytest.raises(ValueError, match="hidden has 3 rows"):
        run_batched(llama, pool, [Segment(seq, 0, 2)], hidden)
    with pytest.raises(ValueError, match="reserve first"):
        run_batched(llama, pool, [Segment(seq, 0, 5)], torch.zeros(5, llama.spec.hidden_size))
    with pytest.raises(ValueError, match="past_len=1"):
        run_batched(llama, pool, [Segment(seq, 1, 2)], hidden[:2])
    with pytest.raises(ValueError, match="pool has 2 layers"):
        run_batched(llama, new_pool(llama, num_layers=2), [Segment(seq, 0, 3)], hidden, first=0, last=3)
    with pytest.raises(ValueError, match="float64"):
        run_batched(llama, pool, [Segment(seq, 0, 3)], hidden.double())
    with pytest.raises(ValueError, match="at least one segment"):
        run_batched(llama, pool, [], hidden[:0])
    assert seq.length == 0 and not any(t.any() for t in pool.layer(0))
    out = run_batched(llama, pool, [Segment(seq, 0, 3)], hidden)  # outside inference_mode too
    assert out.shape == hidden.shape and seq.length == 0

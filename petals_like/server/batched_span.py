"""One continuous-batching iteration over a span: the new tokens of many sequences, paged KV.

The tokens of all sequences are concatenated ([tokens, hidden]), so every linear layer, norm and
rotary runs once over the whole batch. Only attention is per sequence, and even that is batched
for the common case: every one-token segment (decode) attends in one padded SDPA call; longer
segments (prompts, prompt chunks) attend one by one.

Everything that depends only on the page tables (where to write, what to gather, masks, rotary
tables) is computed once per iteration in `_plan`, before the first block; per block only the
tensor ops remain. Masks follow make_attention_context's rule on absolute token indices: key j
is visible to query i iff j <= i, (j >= pad_len or j == i), and i - j < sliding_window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from petals_like.models.attention import sdpa
from petals_like.models.span import BlockSpan
from petals_like.server.kv_cache import KVPool, SequencePages


@dataclass
class Segment:
    """The new tokens of one sequence in this iteration."""

    pages: SequencePages  # already reserved for past + new tokens (the scheduler reserves before calling)
    past_len: int  # tokens already in the cache for this sequence (== pages.length before this step)
    num_tokens: int  # new tokens of this sequence in this iteration
    pad_len: int = 0  # left padding: absolute indices < pad_len are pads (a pad query sees only itself)


@dataclass
class _DecodeGroup:
    """All one-token segments, attended as one padded batch [rows, heads, 1, head_dim] x [rows, kv_heads, keys, ...]."""

    rows: Optional[Tensor]  # [n] their token rows in the batch; None when they are all the rows, in order
    key_slots: Tensor  # [n * keys] pool slots to gather; padding points at the pool's zero page
    num_keys: int
    mask: Optional[Tensor]  # [n, 1, 1, keys] bool, True = may attend; None when every row sees all its keys


@dataclass
class _Chunk:
    """A multi-token segment, attended alone: queries are rows [start, end) of the batch."""

    start: int
    end: int
    key_slots: Optional[Tensor]  # [keys] pool slots; None = no past, attend to this step's own k/v
    mask: Optional[Tensor]  # [1, 1, queries, keys] bool
    is_causal: bool  # no mask and keys == queries: SDPA's own causal mask is right


@dataclass
class _Plan:
    write_slots: Tensor  # [tokens] where each new token's k/v goes
    cos: Tensor  # [tokens, head_dim]
    sin: Tensor  # [tokens, head_dim]
    decode: Optional[_DecodeGroup]
    chunks: list[_Chunk]


def run_batched(span: BlockSpan, pool: KVPool, segments: Sequence[Segment], hidden: Tensor, *,
                first: int = 0, last: Optional[int] = None) -> Tensor:  # fmt: skip
    """hidden [tokens, hidden] = the segments' new tokens concatenated in order -> [tokens, hidden]
    through span.blocks[first:last]; block `first + i` uses layer i of the pool.

    Writes each segment's keys/values at [past_len, past_len + num_tokens) of its pages but does not
    advance `pages.length`: the caller commits after the whole span ran, so a failure midway leaves
    nothing counted (the half-written slots are simply overwritten by the retry).
    """
    spec = span.spec
    last = len(span.blocks) if last is None else last
    if not 0 <= first < last <= len(span.blocks):
        raise ValueError(f"blocks [{first}, {last}) are not inside this span's [0, {len(span.blocks)})")
    if hidden.dim() != 2 or hidden.shape[1] != spec.hidden_size:
        raise ValueError(f"hidden must be [tokens, {spec.hidden_size}], got {list(hidden.shape)}")
    if pool.num_layers < last - first:
        raise ValueError(f"the pool has {pool.num_layers} layers, blocks [{first}, {last}) need {last - first}")
    if (pool.num_kv_heads, pool.head_dim) != (spec.num_kv_heads, spec.head_dim):
        raise ValueError(f"pool pages hold {pool.num_kv_heads}x{pool.head_dim} keys, the model needs "
                         f"{spec.num_kv_heads}x{spec.head_dim}")  # fmt: skip
    with torch.inference_mode():
        plan = _plan(span, pool, segments, hidden)
        heads, head_dim = spec.num_heads, spec.head_dim
        for layer, block in enumerate(span.blocks[first:last]):
            q, k, v = block.attention_input(hidden, plan.cos, plan.sin)  # [tokens, (kv_)heads, head_dim]
            keys, values = pool.layer(layer)  # [slots, kv_heads, head_dim]
            keys.index_copy_(0, plan.write_slots, k)
            values.index_copy_(0, plan.write_slots, v)
            attended = _attend(plan, q, k, v, keys, values, heads * head_dim)  # [tokens, heads * head_dim]
            hidden = block.mlp_residual(block.attention_output(hidden, attended))
    return hidden


def _attend(plan: _Plan, q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor, width: int) -> Tensor:
    """Attention of every segment over its pages (new k/v already written) -> [tokens, width]."""
    group = plan.decode
    if group is not None and not plan.chunks:
        return _attend_decode(group, q, keys, values, width)  # all decode: no scatter needed
    out = q.new_empty(q.shape[0], width)
    if group is not None:
        out.index_copy_(0, group.rows, _attend_decode(group, q.index_select(0, group.rows), keys, values, width))
    for chunk in plan.chunks:
        cq = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, heads, queries, head_dim]
        if chunk.key_slots is None:
            ck, cv = k[chunk.start : chunk.end], v[chunk.start : chunk.end]  # [keys, kv_heads, head_dim]
        else:
            ck, cv = keys.index_select(0, chunk.key_slots), values.index_select(0, chunk.key_slots)
        ck, cv = ck.transpose(0, 1).unsqueeze(0), cv.transpose(0, 1).unsqueeze(0)  # [1, kv_heads, keys, head_dim]
        res = sdpa(cq, ck, cv, mask=chunk.mask, is_causal=chunk.is_causal)  # [1, heads, queries, head_dim]
        out[chunk.start : chunk.end] = res[0].transpose(0, 1).reshape(chunk.end - chunk.start, width)
    return out


def _attend_decode(group: _DecodeGroup, q: Tensor, keys: Tensor, values: Tensor, width: int) -> Tensor:
    """q [n, heads, head_dim] -> [n, width]: one padded SDPA call for all one-token segments."""
    n = q.shape[0]
    shape = (n, group.num_keys, keys.shape[1], keys.shape[2])
    gk = keys.index_select(0, group.key_slots).view(shape).transpose(1, 2)  # [n, kv_heads, keys, head_dim]
    gv = values.index_select(0, group.key_slots).view(shape).transpose(1, 2)
    res = sdpa(q.unsqueeze(2), gk, gv, mask=group.mask, is_causal=False)  # [n, heads, 1, head_dim]
    return res.reshape(n, width)


def _plan(span: BlockSpan, pool: KVPool, segments: Sequence[Segment], hidden: Tensor) -> _Plan:
    """Validate the segments and precompute slots, masks and rotary tables for the whole iteration."""
    page_size, device = pool.page_size, hidden.device
    window = span.spec.sliding_window
    write_slots: list[int] = []
    positions: list[int] = []  # rotary position of every token
    decode_ids: list[int] = []
    offsets: list[int] = []  # first token row of each segment
    offset = 0
    for index, seg in enumerate(segments):
        _check_segment(pool, seg)
        past, n, pages = seg.past_len, seg.num_tokens, seg.pages.pages
        offsets.append(offset)
        if n == 1:
            decode_ids.append(index)
        pos = past
        while pos < past + n:  # contiguous slots within each page
            page, in_page = divmod(pos, page_size)
            take = min(page_size - in_page, past + n - pos)
            base = pages[page] * page_size + in_page
            write_slots.extend(range(base, base + take))
            pos += take
        if seg.pad_len <= past:
            positions.extend(range(past - seg.pad_len, past + n - seg.pad_len))
        else:
            positions.extend(max(i - seg.pad_len, 0) for i in range(past, past + n))
        offset += n
    if offset != hidden.shape[0]:
        raise ValueError(f"segments hold {offset} new tokens, hidden has {hidden.shape[0]} rows")

    cos, sin = _rotary(span, positions, [s.num_tokens for s in segments], hidden)
    decode = _decode_group(pool, [segments[i] for i in decode_ids], window, device) if decode_ids else None
    if decode is not None and len(decode_ids) < len(segments):
        decode.rows = torch.tensor([offsets[i] for i in decode_ids], dtype=torch.int64, device=device)
    chunks = [_chunk(pool, seg, offsets[i], window, device) for i, seg in enumerate(segments) if seg.num_tokens > 1]
    return _Plan(torch.tensor(write_slots, dtype=torch.int64, device=device), cos, sin, decode, chunks)


def _check_segment(pool: KVPool, seg: Segment) -> None:
    """Segments come from our own scheduler, but a wrong one would corrupt other sessions' pages: check cheaply."""
    past, n = seg.past_len, seg.num_tokens
    if n <= 0 or past < 0 or seg.pad_len < 0:
        raise ValueError(f"bad segment: past_len={past}, num_tokens={n}, pad_len={seg.pad_len}")
    if past != seg.pages.length:
        raise ValueError(f"past_len={past} but the sequence holds {seg.pages.length} tokens")
    if past + n > seg.pages.capacity(pool):
        raise ValueError(f"{past} + {n} tokens do not fit the {seg.pages.capacity(pool)} reserved (reserve first)")
    for page in seg.pages.pages[past // pool.page_size : -(-(past + n) // pool.page_size)]:
        if pool.refcount(page) != 1:
            # shared pages are full and below `length`; writing one would change other sequences' keys
            raise ValueError(f"page {page} is shared ({pool.refcount(page)} holders) and must not be written")


def _rotary(span: BlockSpan, positions: list[int], counts: list[int], hidden: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin [tokens, head_dim] for all tokens at once."""
    pos = torch.tensor(positions, dtype=torch.int64, device=hidden.device)
    rotary = span.rotary
    if rotary.rope_type != "dynamic":
        cos, sin = rotary.cos_sin(pos[None], hidden.dtype)  # [1, tokens, head_dim]
        return cos[0], sin[0]
    # dynamic NTK picks its frequencies from the furthest position of a call: one call per sequence
    # gives each the frequencies it would get alone
    tables = [rotary.cos_sin(p[None], hidden.dtype) for p in pos.split(counts)]
    return torch.cat([c[0] for c, _ in tables]), torch.cat([s[0] for _, s in tables])


def _decode_group(pool: KVPool, segs: list[Segment], window: Optional[int], device: torch.device) -> _DecodeGroup:
    """Key slots [n, keys] of every one-token segment, padded to the longest with the zero page."""
    page_size = pool.page_size
    lengths = [s.past_len + 1 for s in segs]  # keys up to and including the new token
    starts = [max(0, length - window) if window is not None else 0 for length in lengths]
    widths = [length - start for length, start in zip(lengths, starts)]
    num_keys = max(widths)
    max_pages = max(len(s.pages.pages) for s in segs)
    table = torch.tensor([s.pages.pages + [pool.null_page] * (max_pages - len(s.pages.pages)) for s in segs],
                         dtype=torch.int64, device=device)  # [n, max_pages]  # fmt: skip
    start_t = torch.tensor(starts, dtype=torch.int64, device=device)
    pos = start_t[:, None] + torch.arange(num_keys, device=device)  # [n, keys] absolute key indices
    if min(widths) == num_keys and all(s.pad_len <= start for s, start in zip(segs, starts)):
        # every row sees all num_keys keys (equal lengths or windows, no pads): no padding, no mask
        slots = table.gather(1, pos // page_size) * page_size + pos % page_size
        return _DecodeGroup(None, slots.view(-1), num_keys, None)
    length_t = torch.tensor(lengths, dtype=torch.int64, device=device)[:, None]
    valid = pos < length_t
    page_idx = torch.where(valid, pos // page_size, 0)  # stay inside the table past a row's end
    slots = torch.where(valid, table.gather(1, page_idx) * page_size + pos % page_size, pool.null_slot)
    pads = torch.tensor([s.pad_len for s in segs], dtype=torch.int64, device=device)[:, None]
    visible = valid & ((pos >= pads) | (pos == length_t - 1))  # a pad query still sees itself
    return _DecodeGroup(None, slots.view(-1), num_keys, visible.view(len(segs), 1, 1, num_keys))


def _chunk(pool: KVPool, seg: Segment, start: int, window: Optional[int], device: torch.device) -> _Chunk:
    """Keys, mask and causality of one multi-token segment, as make_attention_context would set them."""
    past, n, pad, page_size = seg.past_len, seg.num_tokens, seg.pad_len, pool.page_size
    total = past + n
    key_start = max(0, past - window + 1) if window is not None else 0  # older keys are out of every query's window
    key_slots = None
    if past > 0:
        pos = torch.arange(key_start, total, device=device)
        table = torch.tensor(seg.pages.pages, dtype=torch.int64, device=device)
        key_slots = table[pos // page_size] * page_size + pos % page_size
    window_binds = window is not None and (total - 1) - key_start >= window
    if pad <= key_start and not window_binds:
        if past == 0:
            return _Chunk(start, start + n, key_slots, None, True)
        mask = _mask(past, total, key_start, None, 0, device)
    else:
        mask = _mask(past, total, key_start, window, pad, device)
    return _Chunk(start, start + n, key_slots, mask.view(1, 1, n, total - key_start), False)


def _mask(past: int, total: int, key_start: int, window: Optional[int], pad: int, device: torch.device) -> Tensor:
    """Bool [queries, keys], True where query i (absolute, in [past, total)) may see key j (in [key_start, total))."""
    q = torch.arange(past, total, device=device)[:, None]
    k = torch.arange(key_start, total, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    if pad > key_start:
        allowed &= (k >= pad) | (k == q)
    return allowed

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

from petals_like.models.attention import Scoring, alibi_bias, sdpa
from petals_like.models.lora import BlockLora, LoraRows
from petals_like.models.span import BlockSpan
from petals_like.server.kv_cache import KVPool, SequencePages, reserve_rows


@dataclass
class Segment:
    """The new tokens of one sequence in this iteration."""

    pages: SequencePages  # already reserved for past + new tokens (the scheduler reserves before calling)
    past_len: int  # tokens already in the cache for this sequence (== pages.length before this step)
    num_tokens: int  # new tokens of this sequence in this iteration
    pad_len: int = 0  # left padding: absolute indices < pad_len are pads (a pad query sees only itself)


@dataclass
class _DecodeGroup:
    """All one-token segments, attended in one SDPA call over their gathered pages.

    Row r gathers `pages[r * pages_per_row : (r + 1) * pages_per_row]` (padded with the pool's
    zero page), i.e. keys [n, kv_heads, pages_per_row * page_size, head_dim], and attends over
    the columns `lo:hi` of it, under `mask` where rows differ.
    """

    rows: Optional[Tensor]  # [n] their token rows in the batch; None when they are all the rows, in order
    pages: Tensor  # [n * pages_per_row] page ids to gather
    pages_per_row: int
    lo: int
    hi: int
    mask: Optional[Tensor]  # [n, 1, 1, hi - lo] additive (0 / -inf) in the compute dtype; None = all visible


@dataclass
class _Chunk:
    """A multi-token segment, attended alone: queries are rows [start, end) of the batch."""

    start: int
    end: int
    pages: Optional[Tensor]  # [p] pages holding its visible keys; None = no past, attend to this step's own k/v
    lo: int  # its keys are columns lo:hi of the gathered pages
    hi: int
    mask: Optional[Tensor]  # [1, 1, queries, hi - lo] additive (0 / -inf)
    is_causal: bool  # no mask and keys == queries: SDPA's own causal mask is right


@dataclass
class _Masks:
    """Which keys each segment's queries see, for blocks with one sliding window."""

    decode: Optional[_DecodeGroup]
    chunks: list[_Chunk]


@dataclass
class _Plan:
    write_slots: Tensor  # [tokens] slot (page * page_size + offset) of each new token's k/v
    zero_slots: Optional[Tensor]  # unwritten tails of pages this step starts (see KVPool); None = none
    cos: Tensor  # [tokens, head_dim]
    sin: Tensor  # [tokens, head_dim]
    masks: dict[Optional[int], _Masks]  # by sliding window (None: none); Gemma 2 alternates two


def run_batched(
    span: BlockSpan,
    pool: KVPool,
    segments: Sequence[Segment],
    hidden: Tensor,
    *,
    first: int = 0,
    last: Optional[int] = None,
    lora: Optional[Sequence[LoraRows]] = None,
    prompts: Optional[tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """hidden [tokens, hidden] = the segments' new tokens concatenated in order -> [tokens, hidden]
    through span.blocks[first:last]; block `first + i` uses layer i of the pool and the adapters
    lora[i] (rows of `hidden` -> LoRA; None = no adapters). prompts = (rows [n], values [blocks, n, hidden]):
    deep prompts added to those rows before each block.

    Writes each segment's keys/values at [past_len, past_len + num_tokens) of its pages but does not
    advance `pages.length`: the caller commits after the whole span ran, so a failure midway leaves
    nothing counted (the half-written slots are simply overwritten by the retry).
    """
    spec = span.spec
    last = len(span.blocks) if last is None else last
    if not 0 <= first < last <= len(span.blocks):
        raise ValueError(f"blocks [{first}, {last}) are not inside this span's [0, {len(span.blocks)})")
    if not segments:
        raise ValueError("run_batched needs at least one segment")
    if hidden.dim() != 2 or hidden.shape[1] != spec.hidden_size:
        raise ValueError(f"hidden must be [tokens, {spec.hidden_size}], got {list(hidden.shape)}")
    if (hidden.dtype, hidden.device) != (pool.dtype, pool.device):
        raise ValueError(f"hidden is {hidden.dtype} on {hidden.device}, the pool {pool.dtype} on {pool.device}")
    if pool.num_layers < last - first:
        raise ValueError(f"the pool has {pool.num_layers} layers, blocks [{first}, {last}) need {last - first}")
    if (pool.num_kv_heads, pool.head_dim) != (spec.num_kv_heads, spec.head_dim):
        raise ValueError(
            f"pool pages hold {pool.num_kv_heads}x{pool.head_dim} keys, the model needs {spec.num_kv_heads}x{spec.head_dim}"
        )
    with torch.inference_mode():
        blocks = span.blocks[first:last]
        plan = _plan(span, pool, segments, hidden, {block.window for block in blocks})
        if plan.zero_slots is not None:
            pool.zero_slots(plan.zero_slots)
        heads, head_dim = spec.num_heads, spec.head_dim
        for layer, block in enumerate(blocks):
            adapters = None if lora is None else lora[layer]
            if prompts is not None:
                hidden = hidden.index_add(0, prompts[0], prompts[1][layer].to(hidden.dtype))
            q, k, v = block.attention_input(hidden, plan.cos, plan.sin, adapters)  # [tokens, (kv_)heads, head_dim]
            keys, values = pool.layer(layer)  # [kv_heads, pages, page_size, head_dim]
            keys.view(keys.shape[0], -1, head_dim).index_copy_(1, plan.write_slots, k.transpose(0, 1))
            values.view(values.shape[0], -1, head_dim).index_copy_(1, plan.write_slots, v.transpose(0, 1))
            masks = plan.masks[block.window]
            attended = _attend(masks, q, k, v, keys, values, heads * head_dim, block.scoring)  # [tokens, heads * head_dim]
            hidden = block.mlp_residual(block.attention_output(hidden, attended, adapters), adapters)
    return hidden


@dataclass
class SessionSlice:
    """What one session runs in an iteration, as the scheduler plans it: plain data."""

    hidden: Tensor  # [rows, positions, hidden]: its next positions, every row of its batch
    sequences: Sequence[SequencePages]  # one per row, pages reserved for them
    pad_lens: Sequence[int]  # left padding of each row
    lora: Optional[Sequence[BlockLora]] = None  # its adapter, one per block of the iteration's range
    prompts: Optional[Tensor] = None  # its deep prompts [blocks, prefix, hidden], for positions < prefix


def run_slices(span: BlockSpan, pool: KVPool, slices: Sequence[SessionSlice], *, first: int, last: int) -> list[Tensor]:
    """One iteration: the slices' tokens as one batch through blocks [first, last) -> each slice's
    output [rows, positions, hidden]. Assembles the batch (segments, LoRA rows, prompt rows); does
    not commit the pages' lengths (the caller does, once every group of the iteration ran)."""
    segments, inputs = [], []
    lora: list[list] = [[] for _ in range(last - first)]  # per block: (rows, adapter) of slices with one
    prompt_rows: list[Tensor] = []  # rows of the batch at a prompt position, and the prompts for them
    prompt_values: list[Tensor] = []
    row = 0
    for s in slices:
        rows, positions, width = s.hidden.shape
        for pages, pad in zip(s.sequences, s.pad_lens):
            segments.append(Segment(pages, pages.length, positions, int(pad)))
        inputs.append(s.hidden.reshape(-1, width))
        if s.lora is not None:
            for layer, adapter in enumerate(s.lora):
                lora[layer].append((slice(row, row + rows * positions), adapter))
        past = s.sequences[0].length
        if s.prompts is not None and past < s.prompts.shape[1]:
            covered = torch.arange(past, min(past + positions, s.prompts.shape[1]), device=s.prompts.device)
            for i in range(rows):
                prompt_rows.append(row + i * positions + covered - past)
                prompt_values.append(s.prompts[:, covered])
        row += rows * positions
    with torch.inference_mode():
        prompts = (torch.cat(prompt_rows), torch.cat(prompt_values, dim=1)) if prompt_rows else None
        out = run_batched(
            span, pool, segments, torch.cat(inputs), first=first, last=last, lora=lora if any(lora) else None, prompts=prompts
        )
    outputs, offset = [], 0
    for s in slices:
        rows, positions, _ = s.hidden.shape
        outputs.append(out[offset : offset + rows * positions].view(rows, positions, -1))
        offset += rows * positions
    return outputs


class PagedRunner:
    """One session's incremental inference, run alone through the path servers serve with (a KVPool
    and run_batched): throughput measurement, the bench's no-network baseline and test references
    use it, so what they time and check is what serves. The pool holds exactly max_length tokens
    per row."""

    def __init__(
        self,
        span: BlockSpan,
        batch_size: int,
        max_length: int,
        *,
        first: int = 0,
        last: Optional[int] = None,
        pad_lens: Optional[Sequence[int]] = None,
        page_size: int = 16,
    ) -> None:
        last = len(span.blocks) if last is None else last
        if not 0 <= first < last <= len(span.blocks):
            raise ValueError(f"blocks [{first}, {last}) are not inside this span's [0, {len(span.blocks)})")
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(f"batch_size={batch_size} and max_length={max_length} must be positive")
        self.span, self.first, self.last, self.max_length = span, first, last, max_length
        self.pad_lens = list(pad_lens) if pad_lens is not None else [0] * batch_size
        if len(self.pad_lens) != batch_size:
            raise ValueError(f"pad_lens must have {batch_size} entries, got {len(self.pad_lens)}")
        weight = span.blocks[first].input_layernorm.weight  # not a projection's: those may be quantized
        self.pool = KVPool(
            num_layers=last - first,
            num_kv_heads=span.spec.num_kv_heads,
            head_dim=span.spec.head_dim,
            num_pages=batch_size * -(-max_length // page_size),
            page_size=page_size,
            dtype=weight.dtype,
            device=weight.device,
        )
        self.rows = [SequencePages() for _ in range(batch_size)]

    @property
    def length(self) -> int:
        return self.rows[0].length

    def step(self, hidden: Tensor) -> Tensor:
        """hidden [batch, seq, hidden] of the next tokens -> their outputs, same shape and dtype."""
        batch, seq, width = hidden.shape
        if batch != len(self.rows):
            raise ValueError(f"batch size {batch} differs from the session's {len(self.rows)}")
        if self.length + seq > self.max_length:
            raise ValueError(f"{self.length} + {seq} tokens exceed max_length={self.max_length}")
        reserve_rows(self.pool, self.rows, seq)
        work = SessionSlice(hidden.to(self.pool.dtype), self.rows, self.pad_lens)
        (out,) = run_slices(self.span, self.pool, [work], first=self.first, last=self.last)
        for pages in self.rows:
            pages.length += seq
        return out.to(hidden.dtype)


def _attend(
    masks: _Masks, q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor, width: int, scoring: Optional[Scoring] = None
) -> Tensor:
    """Attention of every segment over its pages (new k/v already written) -> [tokens, width]."""
    group = masks.decode
    if group is not None and not masks.chunks:
        return _attend_decode(group, q, keys, values, width, scoring)  # all decode: no scatter needed
    out = q.new_empty(q.shape[0], width)
    if group is not None:
        out.index_copy_(0, group.rows, _attend_decode(group, q.index_select(0, group.rows), keys, values, width, scoring))
    kv_heads, head_dim = keys.shape[0], keys.shape[3]
    for chunk in masks.chunks:
        cq = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, heads, queries, head_dim]
        if chunk.pages is None:
            ck = k[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, keys, head_dim]
            cv = v[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
        else:
            ck = keys.index_select(1, chunk.pages).view(1, kv_heads, -1, head_dim)[:, :, chunk.lo : chunk.hi]
            cv = values.index_select(1, chunk.pages).view(1, kv_heads, -1, head_dim)[:, :, chunk.lo : chunk.hi]
        res = sdpa(cq, ck, cv, mask=chunk.mask, is_causal=chunk.is_causal, scoring=scoring)  # [1, heads, queries, head_dim]
        out[chunk.start : chunk.end] = res[0].transpose(0, 1).reshape(chunk.end - chunk.start, width)
    return out


def _attend_decode(
    group: _DecodeGroup, q: Tensor, keys: Tensor, values: Tensor, width: int, scoring: Optional[Scoring] = None
) -> Tensor:
    """q [n, heads, head_dim] -> [n, width]: one SDPA call for all one-token segments.

    Grouped heads are folded into queries: the heads // kv_heads query heads that share a kv head
    become that many query rows of it, so SDPA needs no k/v expansion (one query per head means
    no causal structure to break, and the mask is per row anyway).
    """
    n, heads, head_dim = q.shape
    kv_heads, _, page_size, _ = keys.shape
    shape = (kv_heads, n, group.pages_per_row * page_size, head_dim)
    columns = slice(group.lo, group.hi)
    gk = keys.index_select(1, group.pages).view(shape).transpose(0, 1)[:, :, columns]  # [n, kv_heads, keys, head_dim]
    gv = values.index_select(1, group.pages).view(shape).transpose(0, 1)[:, :, columns]
    folded = q.view(n, kv_heads, heads // kv_heads, head_dim)
    res = sdpa(folded, gk, gv, mask=group.mask, is_causal=False, scoring=scoring)  # [n, kv_heads, groups, head_dim]
    return res.reshape(n, width)


def _plan(span: BlockSpan, pool: KVPool, segments: Sequence[Segment], hidden: Tensor, windows: set[Optional[int]]) -> _Plan:
    """Validate the segments and precompute slots, rotary tables and the masks for each of the blocks'
    sliding windows, for the whole iteration."""
    page_size, device = pool.page_size, hidden.device
    write_slots: list[int] = []
    zero_slots: list[int] = []
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
            if in_page == 0 and take < page_size:  # a fresh page this step does not fill
                zero_slots.extend(range(base + take, base + page_size))
            pos += take
        if seg.pad_len <= past:
            positions.extend(range(past - seg.pad_len, past + n - seg.pad_len))
        else:
            positions.extend(max(i - seg.pad_len, 0) for i in range(past, past + n))
        offset += n
    if offset != hidden.shape[0]:
        raise ValueError(f"segments hold {offset} new tokens, hidden has {hidden.shape[0]} rows")

    cos, sin = _rotary(span, positions, [s.num_tokens for s in segments], hidden)
    dtype = hidden.dtype
    # with only one-token segments, their rows are all the rows in order: no gather/scatter of queries
    rows = None if len(decode_ids) == len(segments) else [offsets[i] for i in decode_ids]
    masks = {}
    for window in windows:
        decode = _decode_group(pool, [segments[i] for i in decode_ids], rows, window, dtype, device, span) if decode_ids else None
        chunks = [
            _chunk(pool, seg, offsets[i], window, dtype, device, span.alibi)
            for i, seg in enumerate(segments)
            if seg.num_tokens > 1
        ]
        masks[window] = _Masks(decode, chunks)
    zero = torch.tensor(zero_slots, dtype=torch.int64, device=device) if zero_slots else None
    return _Plan(torch.tensor(write_slots, dtype=torch.int64, device=device), zero, cos, sin, masks)


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


def _decode_group(
    pool: KVPool,
    segs: list[Segment],
    rows: Optional[list[int]],
    window: Optional[int],
    dtype: torch.dtype,
    device: torch.device,
    span: BlockSpan,
) -> _DecodeGroup:
    """Pages and mask of every one-token segment; rows are padded to the widest with the zero page.
    With ALiBi (span.alibi) the mask is per head, [n, kv_heads, heads // kv_heads, keys], as the
    queries are folded."""
    page_size, null = pool.page_size, pool.null_page
    rows_t = None if rows is None else torch.tensor(rows, dtype=torch.int64, device=device)
    lengths = [s.past_len + 1 for s in segs]  # keys up to and including the new token
    starts = [max(0, length - window) if window is not None else 0 for length in lengths]  # first visible key
    first_pages = [start // page_size for start in starts]
    tables = [s.pages.pages[p : -(-length // page_size)] for s, p, length in zip(segs, first_pages, lengths)]
    per_row = max(len(t) for t in tables)
    padded = [p for t in tables for p in t + [null] * (per_row - len(t))]
    pages = torch.tensor(padded, dtype=torch.int64, device=device)
    offsets = [p * page_size for p in first_pages]  # absolute index of each row's first gathered key
    los = {start - offset for start, offset in zip(starts, offsets)}
    his = {length - offset for length, offset in zip(lengths, offsets)}
    if span.alibi is None and len(los) == 1 and len(his) == 1 and all(s.pad_len <= start for s, start in zip(segs, starts)):
        # every row sees the same columns (equal lengths, no pads): a slice, no mask
        return _DecodeGroup(rows_t, pages, per_row, los.pop(), his.pop(), None)

    def column(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)[:, None]

    pos = column(offsets) + torch.arange(per_row * page_size, device=device)  # [n, keys] absolute key indices
    length = column(lengths)
    real = pos >= column([s.pad_len for s in segs])
    visible = (pos >= column(starts)) & (pos < length) & (real | (pos == length - 1))  # a pad query sees itself
    mask = _additive(visible, dtype).view(len(segs), 1, 1, per_row * page_size)
    if span.alibi is not None:
        key_positions = (pos - column([s.pad_len for s in segs])).clamp(min=0)
        bias = alibi_bias(span.alibi, key_positions)  # [n, heads, 1, keys]
        kv_heads = span.spec.num_kv_heads
        mask = mask + bias.view(len(segs), kv_heads, -1, per_row * page_size).to(dtype)
    return _DecodeGroup(rows_t, pages, per_row, 0, per_row * page_size, mask)


def _chunk(
    pool: KVPool,
    seg: Segment,
    start: int,
    window: Optional[int],
    dtype: torch.dtype,
    device: torch.device,
    alibi: Optional[Tensor] = None,
) -> _Chunk:
    """Keys, mask and causality of one multi-token segment, as make_attention_context would set them
    (with ALiBi slopes, a mask per head: [1, heads, queries, keys])."""
    past, n, pad, page_size = seg.past_len, seg.num_tokens, seg.pad_len, pool.page_size
    total = past + n
    key_start = max(0, past - window + 1) if window is not None else 0  # older keys are out of every query's window
    pages, lo, hi = None, 0, n
    if past > 0:
        first_page = key_start // page_size
        pages = torch.tensor(seg.pages.pages[first_page : -(-total // page_size)], dtype=torch.int64, device=device)
        lo, hi = key_start - first_page * page_size, total - first_page * page_size
    window_binds = window is not None and (total - 1) - key_start >= window
    if pad <= key_start and not window_binds:
        if past == 0 and alibi is None:
            return _Chunk(start, start + n, None, lo, hi, None, True)
        mask = _mask(past, total, key_start, None, 0, device)
    else:
        mask = _mask(past, total, key_start, window, pad, device)
    additive = _additive(mask, dtype).view(1, 1, n, total - key_start)
    if alibi is not None:
        key_positions = (torch.arange(key_start, total, device=device) - pad).clamp(min=0)
        additive = additive + alibi_bias(alibi, key_positions[None]).to(dtype)  # [1, heads, queries, keys]
    return _Chunk(start, start + n, pages, lo, hi, additive, False)


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


def _additive(visible: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask -> 0 / -inf in `dtype`, once per iteration (SDPA would convert a bool mask in every block)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))

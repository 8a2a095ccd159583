"""Rotary tables and the attention of a whole sequence, shared by every block of a span.

BlockSpan.forward (forward and backward passes, no cache) builds one `AttentionContext` per call
(`make_attention_context`) and every block attends through it, so the mask and the rotary tables
are computed once per call, not once per block. Incremental inference does not come here: it runs
on the server's paged pool (server/batched_span.py), whose masks follow the same rule.

Index conventions (shared with the client and the server):
- the absolute index of a token is its column in the session: pad tokens included;
- `pad_lens[b]` left-padding tokens occupy absolute indices `< pad_lens[b]`;
- the rotary position of a token is `absolute index - pad_len`, clamped at 0, which equals
  transformers' `attention_mask.cumsum(-1) - 1` on real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from petals_like.models.spec import ModelSpec

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5 on; older torch repeats k/v
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")


class RotaryEmbedding:
    """Inverse frequencies of rotary position embeddings, including the checkpoint's rope scaling.

    Not an nn.Module on purpose: it holds no weights, and `cos_sin` follows the device of the
    positions it is given, so moving a span with `.to()` needs nothing from it.
    """

    def __init__(self, spec: ModelSpec, device: torch.device | str | None = None) -> None:
        self.head_dim = spec.head_dim
        self.base = float(spec.rope_theta)
        self.max_position_embeddings = spec.max_position_embeddings
        scaling = dict(spec.rope_scaling or {})
        self.rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if scaling.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported by llama-family blocks")
        self.scaling = scaling
        self.attention_scaling = 1.0  # multiplies cos/sin; only yarn changes it
        self.inv_freq = self._compute_inv_freq()  # [head_dim // 2] float32
        if device is not None:
            self.inv_freq = self.inv_freq.to(device)

    def _default_inv_freq(self, base: float | Tensor) -> Tensor:
        # float32 on purpose: transformers and the reference implementations compute it this way,
        # and the checkpoint was trained with these exact (slightly rounded) frequencies
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        return 1.0 / (base**exponents)

    def _compute_inv_freq(self) -> Tensor:
        s = self.scaling
        if self.rope_type in ("default", "dynamic"):
            # dynamic NTK starts from plain frequencies; cos_sin rescales them for long inputs
            return self._default_inv_freq(self.base)
        if self.rope_type == "linear":
            return self._default_inv_freq(self.base) / float(s["factor"])
        if self.rope_type == "llama3":
            return self._llama3_inv_freq()
        return self._yarn_inv_freq()

    def _llama3_inv_freq(self) -> Tensor:
        """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
        s = self.scaling
        inv_freq = self._default_inv_freq(self.base)
        factor = float(s["factor"])
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, interpolated, out)

    def _yarn_inv_freq(self) -> Tensor:
        """YaRN: blend of interpolated and extrapolated frequencies, plus a cos/sin magnitude factor."""
        s = self.scaling
        dim = self.head_dim
        orig_len = s.get("original_max_position_embeddings") or self.max_position_embeddings
        factor = s.get("factor") or self.max_position_embeddings / orig_len

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = s.get("attention_factor")
        if attention_factor is None:
            if s.get("mscale") and s.get("mscale_all_dim"):
                attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
            else:
                attention_factor = mscale(factor)
        self.attention_scaling = float(attention_factor)

        def correction_dim(rotations: float) -> float:
            # the dimension whose wavelength fits `rotations` times into the original context
            return dim * math.log(orig_len / (rotations * 2 * math.pi)) / (2 * math.log(self.base))

        low = correction_dim(s.get("beta_fast") or 32)
        high = correction_dim(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolated = self._default_inv_freq(self.base)
        interpolated = extrapolated / factor
        return interpolated * ramp + extrapolated * (1 - ramp)

    def _dynamic_inv_freq(self, positions: Tensor) -> Tensor:
        """Dynamic NTK: stretch the base once the call reaches past max_position_embeddings.

        Stateless, unlike transformers (which keeps the largest length seen so far): frequencies
        depend only on the furthest position of this call. Keys already cached keep their rotation.
        """
        seq_len = int(positions.max()) + 1  # one sync per call; dynamic NTK is rare
        if seq_len <= self.max_position_embeddings:
            return self.inv_freq
        factor = float(self.scaling["factor"])
        ratio = factor * seq_len / self.max_position_embeddings - (factor - 1)
        base = self.base * ratio ** (self.head_dim / (self.head_dim - 2))
        return self._default_inv_freq(base).to(self.inv_freq.device)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [batch, seq] int64 -> cos, sin [batch, seq, head_dim] in `dtype`."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)  # follow the span's device once
        inv_freq = self._dynamic_inv_freq(positions) if self.rope_type == "dynamic" else self.inv_freq
        with torch.autocast(device_type=positions.device.type, enabled=False):
            freqs = positions[..., None].float() * inv_freq  # [batch, seq, head_dim // 2]
            angles = torch.cat((freqs, freqs), dim=-1)  # [batch, seq, head_dim]
            cos = angles.cos() * self.attention_scaling
            sin = angles.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [..., heads, head_dim] by cos/sin [..., head_dim] (halves layout, as in HF checkpoints)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class AttentionContext:
    """What every block of a span needs to attend for one step: rotary tables, the mask, and where keys/values live.

    Invariant: no query row is fully masked (a pad query sees itself), so SDPA never yields NaN
    that could leak into the cache and then into real tokens.
    """

    cos: Tensor  # [batch, seq, head_dim]
    sin: Tensor  # [batch, seq, head_dim]
    mask: Optional[Tensor]  # [batch or 1, 1, seq, seq] bool, True = may attend; None = see is_causal
    is_causal: bool  # no mask: SDPA's own causal mask is right

    @property
    def seq_len(self) -> int:
        return self.cos.shape[1]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scoring: Optional[Scoring] = None) -> Tensor:
        """q [batch, heads, seq, head_dim], k/v [batch, kv_heads, seq, head_dim] (all rotated)
        -> [batch, heads, seq, head_dim]."""
        return sdpa(q, k, v, mask=self.mask, is_causal=self.is_causal, scoring=scoring)


@dataclass(frozen=True)
class Scoring:
    """How attention scores are made where they differ from q.k * head_dim ** -0.5 (Gemma 2)."""

    scale: Optional[float] = None  # None: head_dim ** -0.5
    softcap: Optional[float] = None  # scores -> softcap * tanh(scores / softcap) before the mask

    @classmethod
    def of(cls, spec: ModelSpec) -> Optional[Scoring]:
        return None if spec.attn_scale is None and spec.attn_softcap is None else cls(spec.attn_scale, spec.attn_softcap)


def sdpa(
    q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Tensor], is_causal: bool, scoring: Optional[Scoring] = None
) -> Tensor:
    """Scaled dot-product attention with grouped k/v heads (q [..., heads, queries, d], k/v [..., kv_heads,
    keys, d]); scale head_dim ** -0.5 unless `scoring` says otherwise."""
    num_heads, num_kv_heads = q.shape[-3], k.shape[-3]
    if scoring is not None and scoring.softcap is not None:
        return _softcapped(q, k, v, mask, is_causal, scoring)
    scale = None if scoring is None else scoring.scale
    if num_heads == num_kv_heads:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True, scale=scale)
    groups = num_heads // num_kv_heads
    k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def _softcapped(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scoring: Scoring) -> Tensor:
    """Attention with soft-capped scores, as transformers' eager Gemma 2 computes it (SDPA cannot cap):
    softmax in float32, the weights cast back to the query dtype."""
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    scale = scoring.scale if scoring.scale is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / scoring.softcap) * scoring.softcap
    if is_causal:
        queries, keys = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(queries, keys, dtype=torch.bool, device=q.device).tril(keys - queries)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:  # additive (0 / -inf), as the paged pool's iterations build them
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's slope per head (float32 [heads]): a geometric series 2^(-8 / n), (2^(-8 / n))^2, ... over the
    largest power of two n <= heads, and for the heads beyond it every other power of the series of 2n."""

    def series(n: int) -> Tensor:
        return torch.tensor(2.0 ** (-8.0 / n), dtype=torch.float32) ** torch.arange(1, n + 1, dtype=torch.float32)

    power = 2 ** math.floor(math.log2(num_heads))
    slopes = series(power)
    if power < num_heads:
        slopes = torch.cat([slopes, series(2 * power)[0::2][: num_heads - power]])
    return slopes


def alibi_bias(slopes: Tensor, key_positions: Tensor) -> Tensor:
    """slopes [heads] x key positions [..., keys] (pad-aware, 0 for pads) -> [..., heads, 1, keys] float32.
    A per-key bias is enough: softmax ignores what a query row adds to every key alike."""
    return slopes.to(key_positions.device)[:, None, None] * key_positions.unsqueeze(-2).unsqueeze(-3).float()


def make_attention_context(
    rotary: RotaryEmbedding,
    *,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype,
    device: torch.device | str,
    pad_lens: Optional[Tensor] = None,
    sliding_window: Optional[int] = None,
    alibi: Optional[Tensor] = None,
) -> AttentionContext:
    """Rotary tables and mask for a whole sequence of `seq_len` tokens.

    Key j is visible to query i iff j <= i, and (j >= pad_len or j == i), and, with a sliding
    window, i - j < sliding_window (transformers' rule, on absolute indices). Pass pad_lens=None
    when nothing is padded: SDPA's causal mask then serves and no mask is built. alibi: the slopes
    per head (BLOOM); the mask is then additive, [batch, heads, seq, seq], the bias where visible.
    """
    device = torch.device(device)
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window={sliding_window} must be positive")
    if pad_lens is not None:
        if pad_lens.shape != (batch_size,):
            raise ValueError(f"pad_lens must have shape [{batch_size}], got {list(pad_lens.shape)}")
        if bool((pad_lens < 0).any()):
            raise ValueError("pad_lens must be non-negative")
        pad_lens = pad_lens.to(device=device, dtype=torch.int64)
    query_idx = torch.arange(seq_len, device=device)  # [seq] absolute indices
    positions = query_idx.unsqueeze(0).expand(batch_size, seq_len)  # [batch, seq]
    if pad_lens is not None:
        positions = (positions - pad_lens[:, None]).clamp(min=0)
    cos, sin = rotary.cos_sin(positions, dtype)

    window_binds = sliding_window is not None and seq_len > sliding_window
    if alibi is not None:
        visible = _causal_mask(query_idx, seq_len, sliding_window, pad_lens).view(-1, 1, seq_len, seq_len)
        bias = alibi_bias(alibi, positions)  # [batch, heads, 1, seq]: the keys' positions are the queries'
        mask = torch.where(visible, bias.to(dtype), float("-inf"))  # [batch, heads, seq, seq]
        return AttentionContext(cos, sin, mask, False)
    if pad_lens is None and not window_binds:
        # SDPA builds the square causal mask (or skips it in flash kernels); one token needs none
        return AttentionContext(cos, sin, None, seq_len > 1)
    mask = _causal_mask(query_idx, seq_len, sliding_window, pad_lens)
    return AttentionContext(cos, sin, mask.view(-1, 1, seq_len, seq_len), False)


def _causal_mask(query_idx: Tensor, key_end: int, sliding_window: Optional[int], pad_lens: Optional[Tensor]) -> Tensor:
    """Bool [seq, keys] (or [batch, seq, keys] with pad_lens), True where a query may attend."""
    key_idx = torch.arange(key_end, device=query_idx.device)  # [keys]
    q, k = query_idx[:, None], key_idx[None, :]
    allowed = k <= q  # [seq, keys]
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    if pad_lens is None:
        return allowed
    real_key = key_idx[None, None, :] >= pad_lens[:, None, None]  # [batch, 1, keys]
    return allowed & (real_key | (k == q))  # [batch, seq, keys]; a pad query still sees itself

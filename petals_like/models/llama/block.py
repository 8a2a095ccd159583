"""One decoder block of the Llama family (Llama, Mistral, Qwen2, Qwen3, and with a mixture of experts
for a feed-forward Mixtral, Qwen2-MoE and Qwen3-MoE): hidden -> hidden.

Submodule and parameter names mirror transformers' decoder layer, so a block loads the tensors
`model.layers.{i}.*` of a checkpoint with the prefix stripped via plain `load_state_dict()`.

The block works on flattened tokens [tokens, hidden] for everything but attention itself, and
forward() is split into attention_input / attention_output / mlp_residual, so a continuous
batching engine can run the projections over tokens from many sessions at once and attend per
session in between.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from petals_like.models.attention import AttentionContext, Scoring, apply_rotary
from petals_like.models.linear import linear
from petals_like.models.lora import FUSED_TARGETS, LoraRows, lora_delta, projection_shape, target_shape, targets_of
from petals_like.models.moe import LAYOUTS, SparseMoE
from petals_like.models.spec import ModelSpec

# the MLP's gate activation by its transformers name
ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """RMS normalization computed in float32 and cast back before the weight, as transformers does.

    The order (normalize in fp32, cast, then multiply by the weight) matters for matching
    half-precision checkpoints bit for bit-ish; do not fold the weight in before the cast.
    offset=True is Gemma's: the weight is stored minus one, and the product (1 + weight) is taken in
    float32 before the cast.
    """

    def __init__(self, hidden_size: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size) if offset else torch.ones(hidden_size))
        self.eps = eps
        self.offset = offset

    def forward(self, x: Tensor) -> Tensor:
        if self.offset:
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())).type_as(x)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op, same math in fp32
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def make_norm(spec: ModelSpec, size: int) -> nn.Module:
    """The family's normalization over `size` features: RMSNorm (Gemma's with 1 + weight), or Falcon's
    LayerNorm with a bias."""
    if spec.layer_norm:
        return nn.LayerNorm(size, eps=spec.rms_norm_eps)
    return RMSNorm(size, spec.rms_norm_eps, offset=spec.norm_weight_offset)


# checkpoint names -> this block's, for families whose checkpoints name the parts otherwise
_FUSED_ATTENTION_NAMES = {
    "self_attention.query_key_value.": "self_attn.qkv_proj.",
    "self_attention.dense.": "self_attn.o_proj.",
    "mlp.dense_h_to_4h.": "mlp.up_proj.",
    "mlp.dense_4h_to_h.": "mlp.down_proj.",
}
RENAMES: dict[str, dict[str, str]] = {
    "falcon": _FUSED_ATTENTION_NAMES | {"ln_attn.": "input_layernorm.", "ln_mlp.": "post_attention_layernorm."},
    "bloom": _FUSED_ATTENTION_NAMES,
}


class LlamaAttentionProjections(nn.Module):
    """The four attention projections; named `self_attn` in the block to match checkpoint keys."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, q_size, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden_size, kv_size, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden_size, kv_size, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(q_size, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:  # Qwen3: each head's q and k normalized before the rotation
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)


class LlamaMLP(nn.Module):
    """Gated feed-forward down(act(gate(x)) * up(x)) (SwiGLU, GeGLU), or without a gate down(act(up(x)))
    (Falcon)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gated = spec.gated_mlp
        if spec.gated_mlp:
            self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)
        self.act = activation(spec.hidden_act)

    def input_projections(self) -> list[nn.Linear]:
        return [self.gate_proj, self.up_proj] if self.gated else [self.up_proj]

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(hidden)


class LlamaBlock(nn.Module):
    """Pre-norm decoder block: h + attn(norm(h)), then h + mlp(norm(h)); or, parallel (Falcon),
    h + attn(norm(h)) + mlp(norm'(h))."""

    def __init__(self, spec: ModelSpec, layer_idx: int, offload_experts: bool = False) -> None:
        """offload_experts: an MoE block holds no routed expert; the loader gives it an ExpertStore."""
        super().__init__()
        if spec.num_heads % spec.num_kv_heads != 0:
            raise ValueError(f"num_heads={spec.num_heads} is not a multiple of num_kv_heads={spec.num_kv_heads}")
        self.layer_idx = layer_idx  # index in the whole model; informational (checkpoint keys, logs)
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.input_layernorm = make_norm(spec, spec.hidden_size)
        self.self_attn = LlamaAttentionProjections(spec)
        # parallel blocks (Falcon): the MLP runs on the block's input, normalized by post_attention_layernorm
        # (ln_mlp) or by input_layernorm itself (shared_parallel_norm)
        self.parallel = spec.parallel_block
        self.shared_parallel_norm = spec.shared_parallel_norm
        if not spec.shared_parallel_norm:
            self.post_attention_layernorm = make_norm(spec, spec.hidden_size)
        # Gemma 2: post_attention_layernorm normalizes the attention's output, these two the MLP's input and output
        self.sandwich_norms = spec.sandwich_norms
        if spec.sandwich_norms:
            self.pre_feedforward_layernorm = make_norm(spec, spec.hidden_size)
            self.post_feedforward_layernorm = make_norm(spec, spec.hidden_size)
        self.window = spec.window_of(layer_idx)  # sliding window of this block's attention (None: none)
        self.scoring = Scoring.of(spec)
        self.qk_norm = spec.qk_norm
        self.rotate = not spec.alibi  # ALiBi (BLOOM): positions enter as score biases, not rotations
        # the feed-forward: a dense MLP, or experts under the name the family's checkpoints use
        self._moe_name: Optional[str] = None
        if spec.is_moe_block(layer_idx):
            self._moe_name = LAYOUTS[spec.family][0]
            setattr(self, self._moe_name, SparseMoE(spec, layer_idx, offloaded=offload_experts))
        else:
            self.mlp = LlamaMLP(spec)
        self.q_size, self.kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        # LoRA: the family's targets (PEFT's names) and which of this block's projections each adapts; Falcon's
        # and BLOOM's fused query_key_value adapts q/k/v at once, in the checkpoint's row order (_qkv_order)
        self.fused_lora = targets_of(spec) is FUSED_TARGETS
        shape = target_shape if self.fused_lora else projection_shape
        self.out_features = {name: shape(spec, name)[1] for name in targets_of(spec)}
        self.lora_name = {"o_proj": "dense", "up_proj": "dense_h_to_4h", "down_proj": "dense_4h_to_h"} if self.fused_lora else {}
        self._qkv_order: Optional[Tensor] = None
        self.renames = RENAMES.get(spec.family, {})
        self.qkv_layout = spec.qkv_layout
        if spec.fused_checkpoint or self.renames:  # Phi-3, Falcon: their checkpoints' names and fused matrices
            self._register_load_state_dict_pre_hook(self._convert_checkpoint)
        # set by fuse_projections(): q/k/v and gate/up weights stored as one tensor each
        self._qkv: tuple[Tensor, Tensor | None] | None = None
        self._gate_up: tuple[Tensor, Tensor | None] | None = None
        # set by replace_linear_weights() (quant.quantize_block): every weight matrix converted, used in all modes
        self.quant_type = "none"
        self._o: tuple | None = None
        self._down: tuple | None = None

    def _convert_checkpoint(self, state_dict: dict, prefix: str, *args) -> None:
        """In place: the checkpoint's names to this block's (RENAMES), then `self_attn.qkv_proj` split into
        q/k/v_proj by its layout and `mlp.gate_up_proj` into gate/up_proj (gate first)."""
        for key in [key for key in state_dict if key.startswith(prefix)]:
            for old, new in self.renames.items():
                if key[len(prefix) :].startswith(old):
                    state_dict[prefix + new + key[len(prefix) + len(old) :]] = state_dict.pop(key)
                    break
        for kind in ("weight", "bias"):
            qkv = state_dict.pop(f"{prefix}self_attn.qkv_proj.{kind}", None)
            if qkv is not None:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), self._split_qkv(qkv)):
                    state_dict[f"{prefix}self_attn.{name}.{kind}"] = part
            gate_up = state_dict.pop(f"{prefix}mlp.gate_up_proj.{kind}", None)
            if gate_up is not None:
                for name, part in zip(("gate_proj", "up_proj"), gate_up.chunk(2)):
                    state_dict[f"{prefix}mlp.{name}.{kind}"] = part

    def _split_qkv(self, fused: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A fused q/k/v weight [rows, in] (or bias [rows]) -> q [heads * d, ...], k and v [kv_heads * d, ...]."""
        if self.qkv_layout == "contiguous":
            return tuple(fused.split([self.q_size, self.kv_size, self.kv_size]))  # type: ignore[return-value]
        rest = fused.shape[1:]
        if self.qkv_layout == "grouped":  # per KV head: its query heads, then its k, then its v
            groups = self.num_heads // self.num_kv_heads
            view = fused.reshape(self.num_kv_heads, groups + 2, self.head_dim, *rest)
            q, k, v = view[:, :groups], view[:, groups], view[:, groups + 1]
        else:  # "per_head": per head q, k, v
            view = fused.reshape(self.num_heads, 3, self.head_dim, *rest)
            q, k, v = view[:, 0], view[:, 1], view[:, 2]
        return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)

    def _qkv_rows(self, device: torch.device) -> Tensor:
        """For each row of this block's q/k/v (in that order), its row in the checkpoint's fused matrix."""
        if self._qkv_order is None or self._qkv_order.device != device:
            rows = self.q_size + 2 * self.kv_size
            with torch.inference_mode(False):  # a plain tensor: backward passes index with it too
                self._qkv_order = torch.cat(self._split_qkv(torch.arange(rows, device=device)))
        return self._qkv_order

    @property
    def moe(self) -> Optional[SparseMoE]:
        """The experts of an MoE block (None for a dense MLP)."""
        return getattr(self, self._moe_name) if self._moe_name else None

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Store the q/k/v weights in one tensor and the gate/up weights in another, so a step runs two
        matmuls instead of five (decode on CPU is dominated by per-op overhead for small models).

        The separate Linears keep their names and become views of the fused tensors: memory and
        state_dict() are unchanged. Call it last, after moving the block to its device and dtype:
        .to() would copy the views apart again.
        """
        attn = self.self_attn
        self._qkv = self._fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        if self.moe is not None:
            self.moe.fuse()
        else:
            self._gate_up = self._fuse(self.mlp.input_projections())

    def linear_weights(self) -> dict[str, tuple[Any, Optional[Tensor]]]:
        """The weight matrices inference multiplies by, with their biases: "qkv" (fused) and "o", then
        "gate_up" (fused) and "down", or each expert's (models/moe.py). Call after fuse_projections()."""
        if self._qkv is None or (self._gate_up is None and self.moe is None):
            raise ValueError("linear_weights() needs a block after fuse_projections()")
        o_proj = self.self_attn.o_proj
        weights = {"qkv": self._qkv, "o": self._o or (o_proj.weight, o_proj.bias)}
        if self.moe is not None:
            return weights | self.moe.linear_weights()
        down = self._down or (self.mlp.down_proj.weight, self.mlp.down_proj.bias)
        return weights | {"gate_up": self._gate_up, "down": down}

    @torch.no_grad()
    def replace_linear_weights(self, convert: Callable[[Tensor], Any], quant_type: str) -> None:
        """Store every weight matrix as convert(weight) (e.g. quantized), used in all modes from now on;
        the float weights go. A converted weight is whatever models/linear.py's linear() accepts."""
        weights = self.linear_weights()
        self._qkv, self._o = ((convert(weights[k][0]), weights[k][1]) for k in ("qkv", "o"))
        attn = self.self_attn
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]  # (q/k/v: views of the fused tensor)
        if self.moe is not None:
            self.moe.replace_linear_weights(convert)
        else:
            self._gate_up, self._down = ((convert(weights[k][0]), weights[k][1]) for k in ("gate_up", "down"))
            linears += [*self.mlp.input_projections(), self.mlp.down_proj]
        self.quant_type = quant_type
        for lin in linears:
            lin.weight = None

    @staticmethod
    def _fuse(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
        weight = torch.cat([lin.weight for lin in linears])
        bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
        offset = 0
        for lin in linears:
            size = lin.weight.shape[0]
            lin.weight = nn.Parameter(weight[offset : offset + size], requires_grad=lin.weight.requires_grad)
            if bias is not None:
                lin.bias = nn.Parameter(bias[offset : offset + size], requires_grad=lin.bias.requires_grad)
            offset += size
        return weight, bias

    def _plus_lora(self, out: Tensor, x: Tensor, lora: Optional[LoraRows], names: tuple[str, ...]) -> Tensor:
        """out = x through the projections `names` (fused side by side) -> plus their LoRA deltas."""
        if not lora:
            return out
        deltas = [lora_delta(x, lora, name, self.out_features[name]) for name in names]
        if all(d is None for d in deltas):
            return out
        if len(names) == 1:
            return out + deltas[0]
        parts = [x.new_zeros(x.shape[0], self.out_features[n]) if d is None else d for n, d in zip(names, deltas)]
        return out + torch.cat(parts, dim=-1)

    def attention_input(
        self, hidden: Tensor, cos: Tensor, sin: Tensor, lora: Optional[LoraRows] = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """hidden [tokens, hidden], cos/sin [tokens, head_dim] -> rotated q [tokens, heads, head_dim],
        rotated k [tokens, kv_heads, head_dim], v [tokens, kv_heads, head_dim]. `lora`: adapters by row."""
        x = self.input_layernorm(hidden)
        tokens = x.shape[0]
        fused = self._qkv is not None and (self.quant_type != "none" or not torch.is_grad_enabled())
        if fused or self.fused_lora:
            if self.fused_lora:  # Falcon, BLOOM: one LoRA over q/k/v, its rows in the checkpoint's order
                attn = self.self_attn
                qkv = (
                    linear(x, *self._qkv)
                    if self._qkv is not None
                    else torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
                )
                delta = lora_delta(x, lora, "query_key_value", self.out_features["query_key_value"])
                if delta is not None:
                    qkv = qkv + delta[:, self._qkv_rows(delta.device)]
            else:
                qkv = self._plus_lora(linear(x, *self._qkv), x, lora, ("q_proj", "k_proj", "v_proj"))
            qk_size = self.q_size + self.kv_size
            qk = qkv[:, :qk_size].view(tokens, self.num_heads + self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
                qk = torch.cat([self.self_attn.q_norm(q), self.self_attn.k_norm(k)], dim=1)
            q, k = (apply_rotary(qk, cos, sin) if self.rotate else qk).split([self.num_heads, self.num_kv_heads], dim=1)
            return q, k, qkv[:, qk_size:].view(tokens, self.num_kv_heads, self.head_dim)
        attn = self.self_attn
        q = self._plus_lora(attn.q_proj(x), x, lora, ("q_proj",)).view(-1, self.num_heads, self.head_dim)
        k = self._plus_lora(attn.k_proj(x), x, lora, ("k_proj",)).view(-1, self.num_kv_heads, self.head_dim)
        v = self._plus_lora(attn.v_proj(x), x, lora, ("v_proj",)).view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if not self.rotate:
            return q, k, v
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attention_output(self, residual: Tensor, attended: Tensor, lora: Optional[LoraRows] = None) -> Tensor:
        """residual [tokens, hidden], attended [tokens, heads * head_dim] -> [tokens, hidden]."""
        o_proj = self.self_attn.o_proj
        out = linear(attended, *self._o) if self._o is not None else linear(attended, o_proj.weight, o_proj.bias)
        out = self._plus_lora(out, attended, lora, (self.lora_name.get("o_proj", "o_proj"),))
        if self.parallel:  # the MLP of the same input, added alongside (mlp_residual passes through)
            norm = self.input_layernorm if self.shared_parallel_norm else self.post_attention_layernorm
            return residual + out + self._mlp(norm(residual), lora)
        return residual + (self.post_attention_layernorm(out) if self.sandwich_norms else out)

    def mlp_residual(self, hidden: Tensor, lora: Optional[LoraRows] = None) -> Tensor:
        """[tokens, hidden] -> [tokens, hidden]: the feed-forward half of the block (in parallel blocks,
        attention_output ran it already)."""
        if self.parallel:
            return hidden
        x = (self.pre_feedforward_layernorm if self.sandwich_norms else self.post_attention_layernorm)(hidden)
        if self.moe is not None:  # (LoRA targets here are refused before: lora.target_shape)
            return hidden + self.moe(x, residual=hidden)
        down = self._mlp(x, lora)
        return hidden + (self.post_feedforward_layernorm(down) if self.sandwich_norms else down)

    def _mlp(self, x: Tensor, lora: Optional[LoraRows]) -> Tensor:
        """The dense MLP of normalized x, LoRA included."""
        mlp = self.mlp
        inputs = ("gate_proj", "up_proj") if mlp.gated else ("up_proj",)
        names = tuple(self.lora_name.get(name, name) for name in inputs)
        if self._gate_up is not None and (self.quant_type != "none" or not torch.is_grad_enabled()):
            projected = self._plus_lora(linear(x, *self._gate_up), x, lora, names)
        else:
            projected = torch.cat(
                [self._plus_lora(getattr(mlp, module)(x), x, lora, (name,)) for module, name in zip(inputs, names)], dim=-1
            )
        if mlp.gated:
            gate, up = projected.chunk(2, dim=-1)
            act = mlp.act(gate) * up
        else:
            act = mlp.act(projected)
        down_proj = mlp.down_proj
        down = linear(act, *self._down) if self._down is not None else linear(act, down_proj.weight, down_proj.bias)
        return self._plus_lora(down, act, lora, (self.lora_name.get("down_proj", "down_proj"),))

    def forward(self, hidden: Tensor, ctx: AttentionContext, layer: int, lora: Optional[LoraRows] = None) -> Tensor:
        """hidden [batch, seq, hidden] -> [batch, seq, hidden]; `layer` indexes the span's cache."""
        batch, seq, hidden_size = hidden.shape
        flat = hidden.reshape(batch * seq, hidden_size)  # [tokens, hidden]
        cos = ctx.cos.reshape(batch * seq, self.head_dim)  # [tokens, head_dim]
        sin = ctx.sin.reshape(batch * seq, self.head_dim)
        q, k, v = self.attention_input(flat, cos, sin, lora)

        def heads_first(x: Tensor) -> Tensor:  # [tokens, h, d] -> [batch, h, seq, d]
            return x.view(batch, seq, x.shape[1], self.head_dim).transpose(1, 2)

        attended = ctx.attend(layer, heads_first(q), heads_first(k), heads_first(v), self.scoring)  # [batch, heads, seq, d]
        attended = attended.transpose(1, 2).reshape(batch * seq, self.num_heads * self.head_dim)
        out = self.mlp_residual(self.attention_output(flat, attended, lora), lora)
        return out.view(batch, seq, hidden_size)

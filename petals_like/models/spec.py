"""ModelSpec: the family-agnostic shape of a checkpoint, read from its Hugging Face config.

Servers, clients and the block math all read the model through this one value, so the code
that knows about transformers' config fields (which moved between releases) lives here only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

SUPPORTED_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma",
    "gemma2",
    "falcon",
    "bloom",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")  # an RMSNorm over each head's q and k before the rotation
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")  # sparse mixture-of-experts feed-forward (models/moe.py)


@dataclass(frozen=True)
class ModelSpec:
    family: str  # one of SUPPORTED_FAMILIES: selects block math details (qkv bias, q/k norms, experts)
    num_blocks: int  # transformer blocks (num_hidden_layers)
    hidden_size: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict[str, Any]] = None  # None or {"rope_type": "llama3"|"linear"|..., ...}
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v projections
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Optional[int] = None  # Mistral / Qwen2 with use_sliding_window
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"  # dtype the checkpoint was saved in
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | list[int]] = None
    pad_token_id: Optional[int] = None
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    hidden_act: str = "silu"  # the MLP's gate activation: silu, or Gemma's gelu_pytorch_tanh (ACTIVATIONS)
    norm_weight_offset: bool = False  # Gemma: norms multiply by (1 + weight), in float32
    embed_scale: Optional[float] = None  # Gemma: embeddings times sqrt(hidden_size) (on the client)
    fused_checkpoint: bool = False  # Phi-3, Falcon: checkpoints hold q/k/v as one matrix (split at load)
    # how q/k/v rows sit in a fused matrix: "contiguous" (all q, all k, all v: Phi-3, Falcon-7B's
    # multi-query), "grouped" (per KV head: its query heads, its k, its v: Falcon's new architecture),
    # "per_head" (per head: q, k, v: Falcon-RW)
    qkv_layout: str = "contiguous"
    layer_norm: bool = False  # Falcon: LayerNorm with bias instead of RMSNorm (eps in rms_norm_eps)
    gated_mlp: bool = True  # False: down(act(up(x))), Falcon's dense_h_to_4h / dense_4h_to_h
    parallel_block: bool = False  # Falcon: h + attention(norm(h)) + mlp(norm'(h)), both from the block's input
    shared_parallel_norm: bool = False  # ... with one norm for both (Falcon-7B's input_layernorm)
    alibi: bool = False  # BLOOM: no rotary embedding; each head adds slope x key position to its scores
    embed_norm: bool = False  # BLOOM: a LayerNorm right after the embeddings (on the client)
    # Gemma 2: norms after attention and around the MLP, attention and final logits soft-capped (cap *
    # tanh(x / cap)), queries scaled by query_pre_attn_scalar ** -0.5, the window on some layers only
    sandwich_norms: bool = False
    attn_softcap: Optional[float] = None
    final_softcap: Optional[float] = None
    attn_scale: Optional[float] = None  # None: head_dim ** -0.5
    sliding_layers: Optional[tuple[int, ...]] = None  # None: sliding_window (if any) on every layer

    # sparse mixture of experts (0 experts: a dense MLP in every block)
    num_experts: int = 0
    experts_per_token: int = 0  # top-k
    moe_intermediate_size: int = 0  # of each routed expert
    norm_topk_prob: bool = True  # renormalize the top-k router probabilities to sum to 1 (Mixtral always does)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: an always-on expert with a sigmoid gate
    dense_layers: tuple[int, ...] = ()  # blocks with a dense MLP in an MoE model (Qwen-MoE's mlp_only_layers)

    def window_of(self, index: int) -> Optional[int]:
        """The sliding window of block `index` (None: it attends to every earlier token)."""
        if self.sliding_window is None or (self.sliding_layers is not None and index not in self.sliding_layers):
            return None
        return self.sliding_window

    def is_moe_block(self, index: int) -> bool:
        return self.num_experts > 0 and index not in self.dense_layers

    def feed_forward_parameters(self) -> int:
        """Weights of one block's feed-forward: the dense MLP's, or every expert's and the router's
        (the larger of the two where an MoE model has dense blocks too)."""
        dense = 3 * self.hidden_size * self.intermediate_size
        if not self.num_experts:
            return dense
        experts = 3 * self.hidden_size * (self.num_experts * self.moe_intermediate_size + self.shared_expert_intermediate_size)
        return max(experts + self.hidden_size * (self.num_experts + 1), dense if self.dense_layers else 0)

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ModelSpec:
        """Build from a transformers config object or its dict."""
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        family = d.get("model_type", "llama")
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(f"model_type={family!r} is not supported (supported: {', '.join(SUPPORTED_FAMILIES)})")
        # Falcon and BLOOM: their fields, and their config's values under the Llama names read below
        renamed = {"falcon": _falcon_fields, "bloom": _bloom_fields}.get(family, lambda _: {})(d)
        d = dict(d, **renamed.pop("config", {}))
        num_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        # transformers >= 5 keeps theta and scaling together in rope_parameters; older ones split them
        rope = dict(d.get("rope_parameters") or {})
        theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = rope or d.get("rope_scaling") or None
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
        sliding_window = d.get("sliding_window")
        if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not d.get("use_sliding_window", False):
            sliding_window = None
        moe = _moe_fields(family, d)
        return cls(
            family=family,
            num_blocks=d["num_hidden_layers"],
            hidden_size=d["hidden_size"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            intermediate_size=d["intermediate_size"],
            vocab_size=d["vocab_size"],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=family in ("qwen2", "qwen2_moe") or bool(d.get("attention_bias", False)),
            o_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=sliding_window,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32").replace("torch.", ""),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            qk_norm=family in QK_NORM_FAMILIES,
            hidden_act=str(d.get("hidden_activation") or d.get("hidden_act") or "silu"),
            norm_weight_offset=family in ("gemma", "gemma2"),
            embed_scale=float(d["hidden_size"]) ** 0.5 if family in ("gemma", "gemma2") else None,
            fused_checkpoint=family in ("phi3", "falcon", "bloom"),
            **moe,
            **_gemma2_fields(family, d),
            **renamed,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelSpec:
        """Read config.json of a local checkpoint folder."""
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: expected a Hugging Face checkpoint folder")
        return cls.from_hf_config(json.loads(config_path.read_text()))


def _falcon_fields(d: dict[str, Any]) -> dict[str, Any]:
    """ModelSpec's fields of a Falcon config, and under "config" its values under the Llama names."""
    if d.get("alibi"):
        raise ValueError("Falcon with alibi=True (Falcon-RW) is not supported: ALiBi positions are not implemented")
    heads = d["num_attention_heads"]
    new = bool(d.get("new_decoder_architecture"))
    kv_heads = d.get("num_kv_heads") or heads if new else (1 if d.get("multi_query", True) else heads)
    parallel = bool(d.get("parallel_attn", True))
    bias = bool(d.get("bias", False))
    return dict(
        config=dict(
            intermediate_size=d.get("ffn_hidden_size") or 4 * d["hidden_size"],
            num_key_value_heads=kv_heads,
            rms_norm_eps=d.get("layer_norm_epsilon", 1e-5),
            attention_bias=bias,
            mlp_bias=bias,
            hidden_act=d.get("activation", "gelu"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
        ),
        qkv_layout="grouped" if new else ("contiguous" if kv_heads == 1 else "per_head"),
        layer_norm=True,
        gated_mlp=False,
        parallel_block=parallel,
        shared_parallel_norm=parallel and not (new or d.get("num_ln_in_parallel_attn") == 2),
    )


def _bloom_fields(d: dict[str, Any]) -> dict[str, Any]:
    """ModelSpec's fields of a BLOOM config, and under "config" its values under the Llama names."""
    if d.get("apply_residual_connection_post_layernorm"):
        raise ValueError("BLOOM with apply_residual_connection_post_layernorm=True is not supported")
    heads = d.get("n_head") or d["num_attention_heads"]
    return dict(
        config=dict(
            num_hidden_layers=d.get("n_layer") or d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=heads,
            intermediate_size=4 * d["hidden_size"],
            rms_norm_eps=d.get("layer_norm_epsilon", 1e-5),
            attention_bias=True,
            mlp_bias=True,
            hidden_act="gelu_pytorch_tanh",  # BLOOM's own GELU is the same tanh approximation
            max_position_embeddings=d.get("seq_length") or 2048,  # (ALiBi has no table; its training length)
        ),
        qkv_layout="per_head",
        layer_norm=True,
        gated_mlp=False,
        alibi=True,
        embed_norm=True,
    )


def _gemma2_fields(family: str, d: dict[str, Any]) -> dict[str, Any]:
    if family != "gemma2":
        return {}
    layer_types = d.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(d["num_hidden_layers"])
    ]
    return dict(
        sandwich_norms=True,
        attn_softcap=d.get("attn_logit_softcapping"),
        final_softcap=d.get("final_logit_softcapping"),
        attn_scale=float(d["query_pre_attn_scalar"]) ** -0.5,
        sliding_layers=tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention"),
    )


def _moe_fields(family: str, d: dict[str, Any]) -> dict[str, Any]:
    """ModelSpec's expert fields from a Mixtral / Qwen2-MoE / Qwen3-MoE config dict (nothing for dense families)."""
    if family not in MOE_FAMILIES:
        return {}
    if family == "mixtral":
        return dict(
            num_experts=d["num_local_experts"],
            experts_per_token=d["num_experts_per_tok"],
            moe_intermediate_size=d["intermediate_size"],
            norm_topk_prob=True,
        )
    num_layers, step = d["num_hidden_layers"], d.get("decoder_sparse_step", 1) or 1
    only_mlp = set(d.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(num_layers) if i in only_mlp or (i + 1) % step != 0)
    return dict(
        num_experts=d.get("num_experts") or d["num_local_experts"],  # (transformers 5 writes Qwen3-MoE's so)
        experts_per_token=d["num_experts_per_tok"],
        moe_intermediate_size=d["moe_intermediate_size"],
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=d.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0,
        dense_layers=dense,
    )


def resolve_dtype(name: str, spec: ModelSpec) -> torch.dtype:
    """'auto' -> the checkpoint's dtype; otherwise one of float32, float16, bfloat16."""
    import torch

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    name = (spec.torch_dtype if name == "auto" else name).replace("torch.", "")
    if name not in dtypes:
        raise ValueError(f"torch_dtype={name!r} not supported (choose from auto, {', '.join(dtypes)})")
    return dtypes[name]

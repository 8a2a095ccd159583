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

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "llama" | "mistral" | "qwen2": selects block math details (qkv bias, sliding window)
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

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ModelSpec:
        """Build from a transformers config object or its dict."""
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        family = d.get("model_type", "llama")
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(f"model_type={family!r} is not supported (supported: {', '.join(SUPPORTED_FAMILIES)})")
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
        if family == "qwen2" and not d.get("use_sliding_window", False):
            sliding_window = None
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
            qkv_bias=family == "qwen2" or bool(d.get("attention_bias", False)),
            o_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=sliding_window,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32").replace("torch.", ""),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelSpec:
        """Read config.json of a local checkpoint folder."""
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: expected a Hugging Face checkpoint folder")
        return cls.from_hf_config(json.loads(config_path.read_text()))


def resolve_dtype(name: str, spec: ModelSpec) -> torch.dtype:
    """'auto' -> the checkpoint's dtype; otherwise one of float32, float16, bfloat16."""
    import torch

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    name = (spec.torch_dtype if name == "auto" else name).replace("torch.", "")
    if name not in dtypes:
        raise ValueError(f"torch_dtype={name!r} not supported (choose from auto, {', '.join(dtypes)})")
    return dtypes[name]

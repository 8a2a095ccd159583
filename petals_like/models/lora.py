"""LoRA on the blocks' projections: the math, the wire order, and PEFT's file layout.

A LoRA adapter adds `scaling * B @ A @ x` to a projection's output, with A [rank, in_features] and
B [out_features, rank]. Adapters reach a block in two ways: a client sends the weights it trains
with each request (client-held LoRA), or a server loads a PEFT adapter folder for inference
(server-hosted). Either way a block gets `LoraRows`: which rows of the flattened token batch use
which adapter, so one batched iteration can mix sessions with different adapters (or none).

On the wire, a span's LoRA tensors are a flat list in a fixed order: block by block, and within a
block the targets in the family's order (targets_of), A then B. Gradients come back in the same order.

Targets are PEFT's names of the checkpoint's projections: q_proj ... down_proj for the Llama layout,
query_key_value, dense, dense_h_to_4h, dense_4h_to_h for Falcon and BLOOM, whose fused q/k/v LoRA
the block maps onto its own q/k/v order.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

from petals_like.models.spec import ModelSpec

# projection name -> the submodule holding it (checkpoint and PEFT key layout)
TARGETS: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# Falcon and BLOOM (`transformer.h.{i}.self_attention.*`, `.mlp.*`)
FUSED_TARGETS: dict[str, str] = {
    "query_key_value": "self_attention",
    "dense": "self_attention",
    "dense_h_to_4h": "mlp",
    "dense_4h_to_h": "mlp",
}
FUSED_TARGET_FAMILIES = ("falcon", "bloom")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.layers|transformer\.h)\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight$")


def targets_of(spec: Optional[ModelSpec]) -> dict[str, str]:
    """The family's LoRA targets, in wire order: name -> the submodule holding it (PEFT's key layout)."""
    return FUSED_TARGETS if spec is not None and spec.family in FUSED_TARGET_FAMILIES else TARGETS


def target_shape(spec: ModelSpec, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection LoRA adapts; a feed-forward projection of a
    mixture-of-experts model is refused (its experts have no single such projection), and so are the
    parts of a fused projection (Phi-3's qkv_proj, gate_up_proj: PEFT adapts them whole)."""
    targets = targets_of(spec)
    if target not in targets:
        raise ValueError(f"LoRA target {target!r} is not a projection of this {spec.family} model; choose among {list(targets)}")
    if spec.num_experts and targets[target] == "mlp":
        raise ValueError(
            f"LoRA target {target!r}: this {spec.family} model's feed-forward is a mixture of experts, which "
            f"LoRA is not supported on; target the attention projections (q_proj, k_proj, v_proj, o_proj)"
        )
    if spec.fused_checkpoint and targets is TARGETS and target not in ("o_proj", "down_proj"):
        raise ValueError(
            f"LoRA target {target!r}: this {spec.family} model holds q/k/v and gate/up as one projection each "
            f"(qkv_proj, gate_up_proj), which LoRA is not supported on here; target o_proj and down_proj"
        )
    if targets is FUSED_TARGETS:
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        hidden, inter = spec.hidden_size, spec.intermediate_size
        return {
            "query_key_value": (hidden, q_size + 2 * kv_size),
            "dense": (q_size, hidden),
            "dense_h_to_4h": (hidden, inter),
            "dense_4h_to_h": (inter, hidden),
        }[target]
    return projection_shape(spec, target)


def projection_shape(spec: ModelSpec, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection of a dense block."""
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    hidden, inter = spec.hidden_size, spec.intermediate_size
    shapes = {
        "q_proj": (hidden, q_size),
        "k_proj": (hidden, kv_size),
        "v_proj": (hidden, kv_size),
        "o_proj": (q_size, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    return shapes[target]


def canonical_targets(targets: Iterable[str], spec: Optional[ModelSpec] = None) -> tuple[str, ...]:
    """Targets in the family's order, each once; unknown names are an error that lists the allowed ones."""
    known = targets_of(spec)
    targets = set(targets)
    unknown = sorted(targets - set(known))
    if unknown:
        raise ValueError(f"LoRA target modules {unknown} are not supported; choose among {list(known)}")
    if not targets:
        raise ValueError("a LoRA adapter needs at least one target module")
    return tuple(t for t in known if t in targets)


@dataclass
class BlockLora:
    """One block's adapter: target -> (A [rank, in], B [out, rank]), and the factor on B @ A."""

    scaling: float
    weights: dict[str, tuple[Tensor, Tensor]]

    def to(self, dtype: torch.dtype, device: torch.device | str) -> BlockLora:
        return BlockLora(self.scaling, {t: (a.to(device, dtype), b.to(device, dtype)) for t, (a, b) in self.weights.items()})

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


# (rows of the flattened [tokens, hidden] batch, the adapter for them); rows=None means all rows
LoraRows = Sequence[tuple[Optional[slice], BlockLora]]


def lora_delta(x: Tensor, rows: Optional[LoraRows], target: str, out_features: int) -> Optional[Tensor]:
    """x [tokens, in] -> the adapters' contribution to `target`'s output [tokens, out], or None if none apply."""
    if not rows:
        return None
    terms = [(where, lora.scaling, lora.weights[target]) for where, lora in rows if target in lora.weights]
    if not terms:
        return None
    if len(terms) == 1 and terms[0][0] is None:
        _, scaling, (a, b) = terms[0]
        return (x @ a.to(x.dtype).t()) @ b.to(x.dtype).t() * scaling
    delta = x.new_zeros(x.shape[0], out_features)
    for where, scaling, (a, b) in terms:
        delta[where] += (x[where] @ a.to(x.dtype).t()) @ b.to(x.dtype).t() * scaling
    return delta


def wire_shapes(spec: ModelSpec, rank: int, targets: Sequence[str], num_blocks: int) -> list[tuple[int, ...]]:
    """The shapes of a span's flat LoRA tensor list (see the module docstring for the order)."""
    shapes: list[tuple[int, ...]] = []
    for _ in range(num_blocks):
        for target in targets:
            fan_in, fan_out = target_shape(spec, target)
            shapes += [(rank, fan_in), (fan_out, rank)]
    return shapes


def from_wire(tensors: Sequence[Tensor], targets: Sequence[str], scaling: float, num_blocks: int) -> list[BlockLora]:
    """A flat tensor list (already shape-checked) -> one BlockLora per block."""
    per_block = 2 * len(targets)
    if len(tensors) != per_block * num_blocks:
        raise ValueError(f"expected {per_block * num_blocks} LoRA tensors, got {len(tensors)}")
    blocks = []
    for i in range(num_blocks):
        chunk = tensors[i * per_block : (i + 1) * per_block]
        blocks.append(BlockLora(scaling, {t: (chunk[2 * j], chunk[2 * j + 1]) for j, t in enumerate(targets)}))
    return blocks


def to_wire(blocks: Sequence[BlockLora], targets: Sequence[str]) -> list[Tensor]:
    return [w for block in blocks for t in targets for w in block.weights[t]]


# ---- PEFT's format ----


def scaling_from_config(config: dict[str, Any]) -> float:
    """PEFT's factor: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    rank, alpha = config["r"], config.get("lora_alpha", 8)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def check_peft_config(
    config: dict[str, Any], *, for_training: bool, spec: Optional[ModelSpec] = None
) -> tuple[int, float, tuple[str, ...]]:
    """(rank, scaling, targets) of a PEFT LoraConfig (as a dict) for `spec`'s family (None: the Llama
    layout's); anything this LoRA cannot do is an error."""
    known = targets_of(spec)
    if str(config.get("peft_type", "LORA")).upper().split(".")[-1] != "LORA":
        raise ValueError(f"only LoRA adapters are supported, got peft_type={config.get('peft_type')!r}")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {rank!r}")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "bias": config.get("bias", "none") != "none",
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "lora_bias": bool(config.get("lora_bias")),
        "layers_to_transform": config.get("layers_to_transform") is not None,
    }
    if for_training:
        unsupported["lora_dropout"] = bool(config.get("lora_dropout"))
    bad = sorted(name for name, on in unsupported.items() if on)
    if bad:
        raise ValueError(f"LoRA options {bad} are not supported for remote blocks (use their defaults)")
    modules = config.get("target_modules")
    if modules == "all-linear":
        modules = list(known)
    elif isinstance(modules, str):
        modules = [t for t in known if re.fullmatch(modules, t) or modules == t]
        if not modules:
            raise ValueError(f"target_modules={config.get('target_modules')!r} matches none of {list(known)}")
    if modules is None:
        raise ValueError(f"target_modules must be given (among {list(known)})")
    return rank, scaling_from_config(config), canonical_targets(modules, spec)


def read_peft_adapter(
    path: str | Path, spec: ModelSpec, blocks: Iterable[int], *, for_training: bool = False
) -> tuple[dict[str, Any], dict[int, BlockLora]]:
    """Load a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) for the given blocks.

    Returns (config dict, block index -> BlockLora); every target of every requested block must be there.
    """
    from safetensors import safe_open

    path = Path(path)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = json.loads(config_file.read_text())
    rank, scaling, targets = check_peft_config(config, for_training=for_training, spec=spec)
    known = targets_of(spec)
    wanted = set(blocks)
    found: dict[tuple[int, str, str], Tensor] = {}
    with safe_open(str(weights_file), framework="pt") as f:
        for key in f.keys():
            match = _PEFT_KEY.match(key.replace(".default.", "."))
            if match is None:
                raise ValueError(f"{weights_file}: unexpected tensor {key!r} for a LoRA adapter of this model")
            block, module, target, which = int(match[1]), match[2], match[3], match[4]
            if target not in known or known[target] != module or not 0 <= block < spec.num_blocks:
                raise ValueError(f"{weights_file}: tensor {key!r} does not belong to a supported projection")
            if block in wanted:
                found[block, target, which] = f.get_tensor(key)
    result = {}
    for block in sorted(wanted):
        weights = {}
        for target in targets:
            fan_in, fan_out = target_shape(spec, target)
            a, b = found.get((block, target, "A")), found.get((block, target, "B"))
            if a is None or b is None:
                raise ValueError(f"{path}: block {block} has no LoRA weights for {target}")
            if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
                raise ValueError(
                    f"{path}: block {block} {target} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                    f"this model needs A {(rank, fan_in)}, B {(fan_out, rank)}"
                )
            weights[target] = (a, b)
        result[block] = BlockLora(scaling, weights)
    return config, result


def peft_state_dict(blocks: dict[int, BlockLora], spec: Optional[ModelSpec] = None) -> dict[str, Tensor]:
    """block index -> BlockLora, as the tensors of PEFT's adapter_model.safetensors (names in `spec`'s
    family's layout)."""
    known = targets_of(spec)
    layers = "transformer.h" if known is FUSED_TARGETS else "model.layers"
    state = {}
    for block, lora in sorted(blocks.items()):
        for target, (a, b) in lora.weights.items():
            prefix = f"base_model.model.{layers}.{block}.{known[target]}.{target}"
            state[f"{prefix}.lora_A.weight"] = a.detach().contiguous()
            state[f"{prefix}.lora_B.weight"] = b.detach().contiguous()
    return state

"""Trainable parameters a client keeps while the servers keep the frozen blocks.

PromptTuning: `pre_seq_len` soft prompt vectors prepended to the input embeddings ("ptune"), and
with "deep_ptune" also one [pre_seq_len, hidden] prompt per block, added to the first pre_seq_len
positions before that block on the server (the server returns its gradient).

ClientLora: a PEFT LoRA (peft.LoraConfig) on the remote blocks' projections whose weights live
here. Requests carry them (servers cache them per client, adapter id and version, so a backward or
a second micro-batch of the same version sends only a reference); servers return their gradients
and the optimizer step runs here. save_pretrained() writes PEFT's format.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from petals_like.client.transport import SpanExtras
from petals_like.data_structures import RemoteSpanInfo
from petals_like.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BlockLora,
    check_peft_config,
    from_wire,
    peft_state_dict,
    read_peft_adapter,
    target_shape,
)
from petals_like.models.spec import ModelSpec
from petals_like.wire import LoraRef, TuningRef

TUNING_MODES = ("ptune", "deep_ptune")


class PromptTuning(nn.Module):
    def __init__(self, spec: ModelSpec, mode: str, pre_seq_len: int, init_from: Optional[Tensor] = None):
        """init_from: the embedding matrix; prompts start as random rows of it (a common warm start)."""
        super().__init__()
        if mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES}, got {mode!r}")
        if isinstance(pre_seq_len, bool) or not isinstance(pre_seq_len, int) or pre_seq_len < 1:
            raise ValueError(f"{mode} needs pre_seq_len >= 1, got {pre_seq_len!r}")
        self.mode = mode
        self.pre_seq_len = pre_seq_len
        if init_from is not None:
            rows = torch.randint(0, init_from.shape[0], (pre_seq_len,))
            prompts = init_from.detach()[rows].clone().float()
        else:
            prompts = torch.randn(pre_seq_len, spec.hidden_size) * 0.02
        self.prompts = nn.Parameter(prompts)
        # deep prompts start at zero: the model is unchanged until training moves them
        self.deep_prompts = (
            nn.Parameter(torch.zeros(spec.num_blocks, pre_seq_len, spec.hidden_size)) if mode == "deep_ptune" else None
        )

    def prepend(self, embeds: Tensor) -> Tensor:
        """[batch, seq, hidden] -> [batch, pre_seq_len + seq, hidden]."""
        prompts = self.prompts.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return torch.cat([prompts, embeds], dim=1)


class ClientLora(nn.Module):
    """LoRA weights for every block: parameters named `{block}_{target}_{A|B}` (A [r, in], B [out, r])."""

    def __init__(self, spec: ModelSpec, config: Any, *, base_model_name_or_path: str = ""):
        """config: a peft.LoraConfig (or its dict). Initialized as PEFT does: A Kaiming-uniform, B zero."""
        super().__init__()
        self.spec = spec
        self.peft_config = config
        config_dict = _config_dict(config)
        self.rank, self.scaling, self.targets = check_peft_config(config_dict, for_training=True, spec=spec)
        self.base_model_name_or_path = base_model_name_or_path
        self.weights = nn.ParameterDict()
        for block in range(spec.num_blocks):
            for target in self.targets:
                fan_in, fan_out = target_shape(spec, target)
                a = torch.empty(self.rank, fan_in)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.weights[f"{block}_{target}_A"] = nn.Parameter(a)
                self.weights[f"{block}_{target}_B"] = nn.Parameter(torch.zeros(fan_out, self.rank))
        self.adapter_id = secrets.token_hex(8)  # names these weights in servers' caches

    def block_tensors(self, block: int) -> list[Tensor]:
        """Block `block`'s tensors in wire order (targets in order, A then B)."""
        return [self.weights[f"{block}_{target}_{which}"] for target in self.targets for which in "AB"]

    def tensors(self, start: int = 0, end: Optional[int] = None) -> list[Tensor]:
        end = self.spec.num_blocks if end is None else end
        return [t for block in range(start, end) for t in self.block_tensors(block)]

    @property
    def version(self) -> int:
        """A fingerprint of the current weights: servers' copies under another version are stale."""
        return weights_version(self.tensors())

    def ref(self, with_weights: bool, version: Optional[int] = None) -> LoraRef:
        """How a request names these weights (wire.LoraRef); version: of a snapshot taken earlier."""
        version = self.version if version is None else version
        return LoraRef(self.adapter_id, version, with_weights, self.rank, float(self.scaling), tuple(self.targets))

    def block_loras(self) -> dict[int, BlockLora]:
        return dict(enumerate(from_wire(self.tensors(), self.targets, self.scaling, self.spec.num_blocks)))

    # ---- PEFT's format ----

    def save_pretrained(self, path: str | Path) -> Path:
        """adapter_config.json + adapter_model.safetensors, loadable with peft.PeftModel.from_pretrained."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = _config_dict(self.peft_config)
        config.update(
            base_model_name_or_path=self.base_model_name_or_path or config.get("base_model_name_or_path"),
            inference_mode=True,
            target_modules=list(self.targets),
            peft_type="LORA",
            task_type=config.get("task_type") or "CAUSAL_LM",
        )
        (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        save_file(peft_state_dict(self.block_loras(), self.spec), str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, spec: ModelSpec) -> ClientLora:
        config, blocks = read_peft_adapter(path, spec, range(spec.num_blocks), for_training=True)
        lora = cls(spec, config, base_model_name_or_path=str(config.get("base_model_name_or_path") or ""))
        with torch.no_grad():
            for block, weights in blocks.items():
                for target, (a, b) in weights.weights.items():
                    lora.weights[f"{block}_{target}_A"].copy_(a)
                    lora.weights[f"{block}_{target}_B"].copy_(b)
        return lora


def weights_version(tensors: list[Tensor]) -> int:
    """A 63-bit hash of the tensors' contents. Content, not torch's in-place counters: fused optimizers
    and `.data` writes change weights without bumping those, and a stale cached copy would silently
    give gradients of the old weights."""
    digest = hashlib.blake2b(digest_size=8)
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy())
    return int.from_bytes(digest.digest(), "big") >> 1


def _config_dict(config: Any) -> dict:
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        result = config.to_dict()
        for key, value in list(result.items()):  # sets and enums as PEFT writes them
            if isinstance(value, set):
                result[key] = sorted(value)
            elif hasattr(value, "value"):
                result[key] = value.value
        return result
    raise TypeError(f"expected a peft.LoraConfig or a dict, got {type(config).__name__}")


@dataclass
class RequestTuning:
    """The trainable extras of one forward/backward pass or inference session, as they were when it
    began: later optimizer steps change the live parameters, not what this pass sends."""

    prompts: Optional[torch.Tensor] = None  # deep prompts [num_blocks, prefix, hidden], a copy
    lora: Optional[ClientLora] = None
    lora_tensors: list[torch.Tensor] = field(default_factory=list)  # a copy of its weights, wire order
    lora_version: int = 0  # their fingerprint
    adapter: Optional[str] = None  # a server-hosted adapter's name

    @classmethod
    def snapshot(cls, prompts: Optional[torch.Tensor], lora: Optional[ClientLora], adapter: Optional[str]) -> RequestTuning:
        tensors = [t.detach().to("cpu", copy=True) for t in lora.tensors()] if lora is not None else []
        return cls(
            None if prompts is None else prompts.detach().to("cpu", copy=True),
            lora,
            tensors,
            weights_version(tensors) if lora is not None else 0,
            adapter,
        )

    def span_lora_tensors(self, span: RemoteSpanInfo) -> list[torch.Tensor]:
        """The LoRA weights of the span's blocks, in wire order."""
        per_block = 2 * len(self.lora.targets)
        return self.lora_tensors[span.start * per_block : span.end * per_block]

    def extras(self, span: RemoteSpanInfo, with_weights: bool) -> SpanExtras:
        extras = SpanExtras()
        if self.prompts is not None:
            prompts = self.prompts[span.start : span.end]
            extras.tensors.append(prompts)
            extras.grad_like.append(prompts)
        lora_ref = None
        if self.lora is not None:
            lora = self.lora
            tensors = self.span_lora_tensors(span)
            lora_ref = lora.ref(with_weights, self.lora_version)
            if with_weights:
                extras.tensors += tensors
            extras.grad_like += tensors
        extras.tuning = TuningRef(self.prompts is not None, self.adapter, lora_ref)
        return extras

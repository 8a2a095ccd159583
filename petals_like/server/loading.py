"""Loading a server's span from a checkpoint, and how much memory is free for it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import psutil
import torch

from petals_like.models.checkpoint import CheckpointReader
from petals_like.models.expert_store import ExpertStore
from petals_like.models.llama.block import LlamaBlock
from petals_like.models.span import BlockSpan
from petals_like.models.spec import ModelSpec
from petals_like.quant.weights import quantize_block


def free_memory(device: torch.device) -> int:
    """Bytes free on the device: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def load_span(
    path: Path,
    spec: ModelSpec,
    start: int,
    end: int,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool = True,
    quant_type: str = "none",
    resident_experts: Optional[float] = None,
) -> BlockSpan:
    """Build blocks [start, end) from only their tensors: peak memory follows the span, not the model.

    Each block is moved, fused and quantized as soon as it is read, so a quantized span never holds
    more than one block in full precision. resident_experts (run_server --offload_experts): of an MoE
    model, read no routed expert now and keep at most this fraction of the span's resident later
    (models/expert_store.py); the span's `expert_store` says how that goes.
    """
    reader = CheckpointReader(path)
    offload = resident_experts is not None
    if offload:
        _check_offload(spec, quant_type, resident_experts)
    states = reader.load_blocks(start, end, dtype, progress=progress, skip=_EXPERT_TENSOR.search if offload else None)
    blocks = []
    for index, state_dict in zip(range(start, end), states):
        with torch.device("meta"):
            block = LlamaBlock(spec, index, offload_experts=offload)
        block.load_state_dict(state_dict, strict=True, assign=True)
        del state_dict
        block = block.to(device=device, dtype=dtype).requires_grad_(False)
        block.fuse_projections()  # after the move to the device (see its docstring)
        if quant_type != "none":
            quantize_block(block, quant_type)
            for param in block.parameters():  # norms and biases: own copies, so the checkpoint's
                param.data = param.data.clone()  # memory map (read zero-copy) can be released
        blocks.append(block)
    span = BlockSpan(spec, start, end, blocks)
    if offload:
        span.expert_store = _expert_store(reader, spec, blocks, resident_experts, dtype, device)
    if quant_type != "none":
        _return_freed_memory()
    return span.eval()


_EXPERT_TENSOR = re.compile(r"\.experts\.\d+\.")  # a routed expert's, in every MoE family's names


def _check_offload(spec: ModelSpec, quant_type: str, resident: float) -> None:
    if not spec.num_experts:
        raise ValueError(f"--offload_experts needs a mixture-of-experts model; this {spec.family} model has no experts")
    if quant_type != "none":
        raise ValueError("--offload_experts reads experts in the span's dtype: use it with --quant_type none")
    if not 0 < resident <= 1:
        raise ValueError(f"--offload_experts takes the fraction of experts kept resident, in (0, 1], got {resident}")


def _expert_store(
    reader: CheckpointReader, spec: ModelSpec, blocks: list[LlamaBlock], resident: float, dtype: torch.dtype, device: torch.device
) -> ExpertStore:
    by_index = {block.layer_idx: block for block in blocks if block.moe is not None}
    capacity = max(1, round(resident * len(by_index) * spec.num_experts))

    def names(index: int, expert: int) -> tuple[str, str, str]:
        return by_index[index].moe.expert_tensor_names(reader.block_prefix(index), expert)

    store = ExpertStore(reader.path, reader.weight_map, names, capacity=capacity, dtype=dtype, device=device)
    for index, block in by_index.items():
        block.moe.store = store
        store.add_predictor(index, block.post_attention_layernorm, block.moe.gate.weight, spec.experts_per_token)
    return store


def _return_freed_memory() -> None:
    """Hand the full-precision weights' freed heap back to the OS (glibc keeps it otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused by later allocations anyway
        pass

"""Loading a server's span from a checkpoint, and how much memory is free for it."""

from __future__ import annotations

from pathlib import Path

import psutil
import torch

from petals_like.models.checkpoint import CheckpointReader
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
) -> BlockSpan:
    """Build blocks [start, end) from only their tensors: peak memory follows the span, not the model.

    Each block is moved, fused and quantized as soon as it is read, so a quantized span never holds
    more than one block in full precision.
    """
    reader = CheckpointReader(path)
    blocks = []
    for index, state_dict in zip(range(start, end), reader.load_blocks(start, end, dtype, progress=progress)):
        with torch.device("meta"):
            block = LlamaBlock(spec, index)
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
    if quant_type != "none":
        _return_freed_memory()
    return span.eval()


def _return_freed_memory() -> None:
    """Hand the full-precision weights' freed heap back to the OS (glibc keeps it otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused by later allocations anyway
        pass

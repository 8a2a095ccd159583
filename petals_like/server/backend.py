"""SpanBackend: the server's hosted blocks plus the checks that every request passes before compute.

Everything here runs on the compute thread except the validate_* methods, which the handlers call
on the event loop so that bad input is answered before it waits in the queue.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from petals_like.models.lora import BlockLora, to_wire
from petals_like.models.span import BlockRange, BlockSpan
from petals_like.protocol import WIRE_DTYPES, ErrorCode, ProtocolError, all_finite
from petals_like.server.adapters import AdapterStore, Tuning

logger = logging.getLogger(__name__)


class SpanBackend:
    def __init__(
        self,
        span: BlockSpan,
        *,
        dtype: torch.dtype,
        device: torch.device,
        max_batch_size: int,
        max_request_tokens: int,
        adapters: Optional[AdapterStore] = None,
    ):
        self.span = span
        self.spec = span.spec
        self.dtype = dtype
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_request_tokens = max_request_tokens
        # hosted and client-held LoRA (the server builds it from its config); by default none hosted
        self.adapters = adapters or AdapterStore(span.spec, span.start, span.end, dtype=dtype, device=device)

    @property
    def start(self) -> int:
        return self.span.start

    @property
    def end(self) -> int:
        return self.span.end

    # ---- validation (event loop) ----

    def block_range(self, start: int, end: int) -> BlockRange:
        """Absolute block indices from a request -> offsets into the span; rejects ranges it does not host."""
        if not start < end:
            raise ProtocolError(f"blocks [{start}, {end}) are not inside any span: the range is empty")
        if not self.start <= start < end <= self.end:
            raise ProtocolError(
                f"blocks [{start}, {end}) are not inside this server's span [{self.start}, {self.end})", ErrorCode.SERVER_LIMIT
            )
        return BlockRange(start - self.start, end - self.start)

    def check_hidden(self, tensor: torch.Tensor, name: str = "hidden_states") -> None:
        """[batch, seq, hidden] in a wire dtype, finite, within the request limits."""
        if tensor.dtype not in WIRE_DTYPES.values():
            raise ProtocolError(f"{name} must be one of {sorted(WIRE_DTYPES)}, got {str(tensor.dtype).replace('torch.', '')}")
        if tensor.ndim != 3:
            raise ProtocolError(f"{name} must be [batch, seq, hidden], got shape {tuple(tensor.shape)}")
        batch, seq, hidden = tensor.shape
        if hidden != self.spec.hidden_size:
            raise ProtocolError(f"{name} hidden size {hidden} != model hidden size {self.spec.hidden_size}")
        if not 1 <= batch or not 1 <= seq:
            raise ProtocolError(f"{name} of shape {tuple(tensor.shape)} hold no tokens")
        if batch > self.max_batch_size:
            raise ProtocolError(f"batch size {batch} not in [1, {self.max_batch_size}]", ErrorCode.SERVER_LIMIT)
        if batch * seq > self.max_request_tokens:
            raise ProtocolError(f"{batch}x{seq} tokens not in [1, {self.max_request_tokens}] per request", ErrorCode.SERVER_LIMIT)
        if not all_finite(tensor):
            raise ProtocolError(f"{name} contains NaN or infinity")

    def check_pad_lens(self, pad_lens: Optional[Sequence[int]], batch: int, seq: int) -> Optional[torch.Tensor]:
        """Left-padding counts per sequence (or None); each must leave at least one real token."""
        if pad_lens is None:
            return None
        if len(pad_lens) != batch:
            raise ProtocolError(f"pad_lens must be a list of {batch} integers")
        if not all(0 <= p < seq for p in pad_lens):
            raise ProtocolError(f"pad_lens must be integers in [0, {seq})")
        if not any(pad_lens):
            return None
        return torch.tensor(pad_lens, dtype=torch.int64, device=self.device)

    # ---- compute (compute thread) ----

    def _to_compute(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def forward(
        self, hidden: torch.Tensor, pad_lens: Optional[torch.Tensor], blocks: BlockRange, tuning: Optional[Tuning] = None
    ) -> torch.Tensor:
        out = self.span(
            self._to_compute(hidden),
            pad_lens=pad_lens,
            first=blocks.first,
            last=blocks.last,
            **_tuning_args(tuning.prompts if tuning else None, tuning.lora if tuning else None),
        )
        return out.to(device="cpu", dtype=hidden.dtype)

    def backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        pad_lens: Optional[torch.Tensor],
        blocks: BlockRange,
        tuning: Optional[Tuning] = None,
    ) -> list[torch.Tensor]:
        """Recompute the forward (servers keep no activations between calls) and return d(loss)/d(hidden),
        then (float32) d(loss)/d(prompts) and d(loss)/d(client LoRA tensors) when the request has them."""
        with torch.enable_grad():
            inputs = self._to_compute(hidden).requires_grad_(True)
            leaves = [inputs]
            prompts = lora = None
            if tuning is not None and tuning.prompts is not None:
                prompts = tuning.prompts.detach().requires_grad_(True)
                leaves.append(prompts)
            if tuning is not None and tuning.lora is not None:
                lora = tuning.lora
                if tuning.lora_targets:  # client-held: fresh leaves, the cached tensors stay untouched
                    lora = [
                        BlockLora(
                            b.scaling,
                            {
                                t: (a.detach().requires_grad_(True), bb.detach().requires_grad_(True))
                                for t, (a, bb) in b.weights.items()
                            },
                        )
                        for b in lora
                    ]
                    leaves += to_wire(lora, tuning.lora_targets)
            out = self.span(inputs, pad_lens=pad_lens, first=blocks.first, last=blocks.last, **_tuning_args(prompts, lora))
            grads = torch.autograd.grad(out, leaves, grad_outputs=self._to_compute(grad_output))
        return [grads[0].to(device="cpu", dtype=hidden.dtype)] + [g.to(device="cpu", dtype=torch.float32) for g in grads[1:]]


def _tuning_args(prompts: Optional[torch.Tensor], lora: Optional[list[BlockLora]]) -> dict[str, Any]:
    """BlockSpan.forward's keywords for deep prompts and one LoRA per block (over all rows)."""
    return {"prompts": prompts, "lora": None if lora is None else [[(None, block)] for block in lora]}

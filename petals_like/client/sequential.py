"""RemoteSequential: all remote blocks as one autograd-aware function of the hidden states.

Forward calls each span of a route in turn and remembers (span, input). Backward walks them in
reverse with rpc_backward; servers recompute their activations, so nothing is held remotely between
calls. A span that fails in either direction is replaced by a new route over the same blocks; in
backward the replacement first re-runs the forward to get its inner inputs. Results are unchanged.

Trainable client parameters ride along (client/tuning.py): deep prompts and client-held LoRA
weights are sent with the requests of the blocks they belong to, and backward returns their
gradients, which autograd then accumulates like any other. With ClientConfig.num_chains > 1 a
batch is split into micro-batches that run through different chains at once, sized by the
chains' throughput; their gradients are summed here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from petals_like.client.inference_session import InferenceSession
from petals_like.client.mux import StepMuxes
from petals_like.client.spot_check import SpotChecker
from petals_like.client.transport import call_backward, call_forward, callers_fault
from petals_like.client.tuning import ClientLora, RequestTuning
from petals_like.config import ClientConfig
from petals_like.data_structures import RemoteSpanInfo
from petals_like.dht.node import SwarmNode
from petals_like.protocol import ErrorCode, refusal_code
from petals_like.routing.manager import RouteManager

logger = logging.getLogger(__name__)

Trace = list[tuple[RemoteSpanInfo, torch.Tensor]]  # (span, the hidden states it received)


@dataclass
class _Grads:
    """Gradients of the extras, summed over spans and micro-batches."""

    prompts: Optional[torch.Tensor] = None
    lora: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # block -> wire-order gradients

    def add(self, span: RemoteSpanInfo, tuning: RequestTuning, grads: list[torch.Tensor]) -> None:
        if tuning.prompts is not None:
            grad, grads = grads[0], grads[1:]
            if self.prompts is None:
                self.prompts = torch.zeros_like(tuning.prompts)
            self.prompts[span.start : span.end] += grad.to(self.prompts.dtype)
        if tuning.lora is not None:
            per_block = 2 * len(tuning.lora.targets)
            for i, block in enumerate(range(span.start, span.end)):
                chunk = grads[i * per_block : (i + 1) * per_block]
                if block in self.lora:
                    self.lora[block] = [a + b for a, b in zip(self.lora[block], chunk)]
                else:
                    self.lora[block] = list(chunk)


class RemoteSequential(torch.nn.Module):
    """Blocks [start, end) of the model (all of them by default) as one module. Index or slice it for
    a sub-range (`model.transformer.h[3:6]`, `h[2]`), which shares this one's routes and node; every
    range runs forward, backward and inference sessions."""

    def __init__(
        self,
        node: SwarmNode,
        routes: RouteManager,
        config: ClientConfig,
        num_blocks: int,
        start: int = 0,
        end: Optional[int] = None,
    ):
        super().__init__()
        end = num_blocks if end is None else end
        if not 0 <= start < end <= num_blocks:
            raise ValueError(f"blocks [{start}, {end}) are not a range of the model's {num_blocks} blocks")
        self.node = node
        self.routes = routes
        self.config = config
        self.num_blocks = num_blocks  # of the whole model
        self.start, self.end = start, end
        self.last_trace_peers: list[str] = []  # servers of the latest forward pass, in order
        self.last_chains = 0  # chains the latest forward pass ran through at once
        self._lora_sent: dict[str, tuple[str, int, set[int]]] = {}  # peer -> (adapter id, version, blocks)
        self.lora_uploads = 0  # requests that carried LoRA weights (the others named a cached version)
        self.lora_upload_bytes = 0  # the bytes of those weights
        self.spot_checker = SpotChecker(routes, config)  # shared with the model's inference sessions
        self.muxes = StepMuxes(lambda: node.p2p, enabled=config.multiplex)  # shared by its sessions, as well

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index: int | slice) -> RemoteSequential:
        """Block `index` or blocks `index` (a slice with step 1) of this range, as a RemoteSequential."""
        if isinstance(index, slice):
            first, last, step = index.indices(len(self))
            if step != 1 or first >= last:
                raise IndexError(f"a slice of blocks must be non-empty with step 1, got {index}")
        elif isinstance(index, int):
            first = index + len(self) if index < 0 else index
            if not 0 <= first < len(self):
                raise IndexError(f"block {index} out of range for {len(self)} blocks")
            last = first + 1
        else:
            raise TypeError(f"blocks are indexed by int or slice, got {type(index).__name__}")
        part = RemoteSequential(self.node, self.routes, self.config, self.num_blocks, self.start + first, self.start + last)
        part.spot_checker, part.muxes = self.spot_checker, self.muxes
        return part

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def extra_repr(self) -> str:
        return f"blocks {self.start}:{self.end} of {self.num_blocks}"

    def inference_session(self, max_length: int) -> InferenceSession:
        """A session over these blocks whose KV cache lives on the servers (hidden states in and out)."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        return InferenceSession(
            self.node,
            self.routes,
            self.config,
            max_length=max_length,
            num_blocks=self.end,
            start=self.start,
            spot_checker=self.spot_checker,
            muxes=self.muxes,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        pad_lens: Optional[list[int]] = None,
        *,
        prompts: Optional[torch.Tensor] = None,
        lora: Optional[ClientLora] = None,
        adapter: Optional[str] = None,
    ) -> torch.Tensor:
        """[batch, seq, hidden] -> [batch, seq, hidden] through blocks [start, end), differentiable in
        hidden, in the deep prompts [num_blocks, prefix, hidden] and in the client LoRA's weights
        (those two for the whole model's range only)."""
        if (prompts is not None or lora is not None) and len(self) != self.num_blocks:
            raise ValueError("deep prompts and a client-held LoRA run through the whole model's blocks, not a slice")
        if prompts is not None and (prompts.dim() != 3 or prompts.shape[0] != self.num_blocks):
            raise ValueError(f"deep prompts must be [{self.num_blocks}, prefix, hidden], got {list(prompts.shape)}")
        tuning = RequestTuning.snapshot(prompts, lora, adapter)
        lora_tensors = lora.tensors() if lora is not None else []
        return _RemoteBlocks.apply(hidden, prompts, self, pad_lens, tuning, *lora_tensors)

    def _run(self, coro):
        return self.node.run(coro, timeout=self.config.request_timeout * (1 + self.config.max_retries))

    # ---- one call, with the adapter weights sent only when the server lacks them ----

    def _needs_weights(self, span: RemoteSpanInfo, tuning: RequestTuning) -> bool:
        if tuning.lora is None:
            return False
        sent = self._lora_sent.get(span.peer_id)
        return (
            sent is None
            or sent[:2] != (tuning.lora.adapter_id, tuning.lora_version)
            or not set(range(span.start, span.end)) <= sent[2]
        )

    def _weights_sent(self, span: RemoteSpanInfo, tuning: RequestTuning) -> None:
        key = (tuning.lora.adapter_id, tuning.lora_version)
        sent = self._lora_sent.get(span.peer_id)
        blocks = sent[2] if sent is not None and sent[:2] == key else set()
        self._lora_sent[span.peer_id] = (*key, blocks | set(range(span.start, span.end)))

    async def _tuned_call(self, call, span: RemoteSpanInfo, tuning: RequestTuning, *args: Any) -> Any:
        with_weights = self._needs_weights(span, tuning)
        try:
            result = await call(
                self.node.p2p, span, *args, timeout=self.config.request_timeout, extras=tuning.extras(span, with_weights)
            )
        except Exception as e:
            if with_weights or refusal_code(e) is not ErrorCode.ADAPTER_NOT_CACHED:
                raise
            with_weights = True  # the server dropped them (idle timeout, restart): send them again
            result = await call(
                self.node.p2p, span, *args, timeout=self.config.request_timeout, extras=tuning.extras(span, with_weights)
            )
        if with_weights:
            self._weights_sent(span, tuning)
            self.lora_uploads += 1
            self.lora_upload_bytes += sum(t.nbytes for t in tuning.span_lora_tensors(span))
        return result

    # ---- forward / backward over a range of blocks, with fail-over ----

    async def forward_range(
        self,
        start: int,
        end: int,
        hidden: torch.Tensor,
        pad_lens: Optional[list[int]],
        tuning: Optional[RequestTuning] = None,
        route: Optional[list[RemoteSpanInfo]] = None,
    ) -> tuple[torch.Tensor, Trace]:
        tuning = tuning or RequestTuning()
        trace: Trace = []
        block, failures = start, 0
        while block < end:
            if route is None:
                route = await self.routes.make_route(block, end, training=True)
            self.routes.show("forward", block, end, route)
            for span in route:
                try:
                    out = await self._tuned_call(call_forward, span, tuning, hidden, pad_lens)
                    if self.spot_checker.draw():
                        await self.spot_checker.verify(
                            span, out, lambda other: self._tuned_call(call_forward, other, tuning, hidden, pad_lens)
                        )
                except Exception as e:
                    if refused := callers_fault(e, span):
                        raise refused from e
                    failures += 1
                    if failures > self.config.max_retries:
                        raise RuntimeError(f"forward through blocks {block}:{end} failed {failures} times: {e!r}") from e
                    self.routes.ban(span.peer_id, repr(e))
                    break  # re-plan from this block
                self.routes.succeeded(span.peer_id)
                trace.append((span, hidden))
                hidden, block = out, span.end
            route = None
        return hidden, trace

    async def backward_trace(
        self,
        trace: Trace,
        grad: torch.Tensor,
        pad_lens: Optional[list[int]],
        tuning: Optional[RequestTuning] = None,
        grads: Optional[_Grads] = None,
    ) -> torch.Tensor:
        tuning, grads = tuning or RequestTuning(), grads if grads is not None else _Grads()
        for span, inputs in reversed(trace):
            grad = await self._backward_span(span, inputs, grad, pad_lens, tuning, grads, depth=0)
        return grad

    async def _backward_span(
        self,
        span: RemoteSpanInfo,
        inputs: torch.Tensor,
        grad: torch.Tensor,
        pad_lens: Optional[list[int]],
        tuning: RequestTuning,
        grads: _Grads,
        depth: int,
    ) -> torch.Tensor:
        try:
            result = await self._tuned_call(call_backward, span, tuning, inputs, grad, pad_lens)
        except Exception as e:
            if refused := callers_fault(e, span):
                raise refused from e
            if depth >= self.config.max_retries:
                raise RuntimeError(f"backward through blocks {span.start}:{span.end} kept failing: {e!r}") from e
            self.routes.ban(span.peer_id, repr(e))
            _, trace = await self.forward_range(span.start, span.end, inputs, pad_lens, tuning)
            for inner_span, inner_inputs in reversed(trace):
                grad = await self._backward_span(inner_span, inner_inputs, grad, pad_lens, tuning, grads, depth + 1)
            return grad
        self.routes.succeeded(span.peer_id)
        grads.add(span, tuning, result[1:])
        return result[0]

    # ---- data parallelism: micro-batches through different chains at once ----

    async def forward_parallel(
        self, hidden: torch.Tensor, pad_lens: Optional[list[int]], tuning: RequestTuning
    ) -> tuple[torch.Tensor, list[tuple[slice, Trace]]]:
        batch = hidden.shape[0]
        chains = min(self.config.num_chains, batch)
        if chains <= 1:
            out, trace = await self.forward_range(self.start, self.end, hidden, pad_lens, tuning)
            return out, [(slice(0, batch), trace)]
        routes = await self.routes.make_training_routes(self.start, self.end, chains)
        sizes = _split_sizes(batch, [weight for _, weight in routes])
        slices, offset = [], 0
        for size in sizes:
            slices.append(slice(offset, offset + size))
            offset += size
        results = await asyncio.gather(
            *(
                self.forward_range(
                    self.start, self.end, hidden[rows], None if pad_lens is None else pad_lens[rows], tuning, route=route
                )
                for rows, (route, _) in zip(slices, routes)
            )
        )
        return torch.cat([out for out, _ in results]), [(rows, trace) for rows, (_, trace) in zip(slices, results)]

    async def backward_parallel(
        self, traces: list[tuple[slice, Trace]], grad: torch.Tensor, pad_lens: Optional[list[int]], tuning: RequestTuning
    ) -> tuple[torch.Tensor, _Grads]:
        grads = _Grads()
        parts = await asyncio.gather(
            *(
                self.backward_trace(trace, grad[rows].contiguous(), None if pad_lens is None else pad_lens[rows], tuning, grads)
                for rows, trace in traces
            )
        )
        return torch.cat(parts), grads


def _split_sizes(total: int, weights: list[float]) -> list[int]:
    """total items split in proportion to weights, at least one each (len(weights) <= total)."""
    weights = [max(w, 1e-9) for w in weights]
    scale = sum(weights)
    sizes = [max(1, int(total * w / scale)) for w in weights]
    while sum(sizes) < total:  # hand out the rounding remainder to the most under-served
        i = max(range(len(sizes)), key=lambda j: total * weights[j] / scale - sizes[j])
        sizes[i] += 1
    while sum(sizes) > total:
        i = max((j for j in range(len(sizes)) if sizes[j] > 1), key=lambda j: sizes[j] - total * weights[j] / scale)
        sizes[i] -= 1
    return sizes


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        prompts: Optional[torch.Tensor],
        sequential: RemoteSequential,
        pad_lens: Optional[list[int]],
        tuning: RequestTuning,
        *lora_tensors: torch.Tensor,
    ) -> torch.Tensor:
        out, traces = sequential._run(sequential.forward_parallel(hidden.detach().cpu(), pad_lens, tuning))
        ctx.sequential, ctx.traces, ctx.pad_lens, ctx.tuning = sequential, traces, pad_lens, tuning
        sequential.last_trace_peers = [span.peer_id for span, _ in traces[0][1]]
        sequential.last_chains = len(traces)
        ctx.input_device = hidden.device
        ctx.prompts_meta = None if prompts is None else (prompts.device, prompts.dtype)
        ctx.lora_meta = [(t.device, t.dtype) for t in lora_tensors]
        return out.to(hidden.device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        sequential: RemoteSequential = ctx.sequential
        tuning: RequestTuning = ctx.tuning
        grad, grads = sequential._run(
            sequential.backward_parallel(ctx.traces, grad_output.detach().cpu().contiguous(), ctx.pad_lens, tuning)
        )
        grad_prompts = None
        if ctx.prompts_meta is not None and grads.prompts is not None:
            grad_prompts = grads.prompts.to(*ctx.prompts_meta)
        lora_grads: list[Optional[torch.Tensor]] = []
        if tuning.lora is not None:
            for block in range(sequential.num_blocks):
                lora_grads += grads.lora.get(block, [None] * (2 * len(tuning.lora.targets)))
            lora_grads = [None if g is None else g.to(*meta) for g, meta in zip(lora_grads, ctx.lora_meta)]
        return (grad.to(ctx.input_device), grad_prompts, None, None, None, *lora_grads)

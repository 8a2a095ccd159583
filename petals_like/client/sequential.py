"""RemoteSequential: all remote blocks as one autograd-aware function of the hidden states.

Forward calls each span of a route in turn and remembers (span, input). Backward walks them in
reverse with rpc_backward; servers recompute their activations, so nothing is held remotely between
calls. A span that fails in either direction is replaced by a new route over the same blocks; in
backward the replacement first re-runs the forward to get its inner inputs. Results are unchanged.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from petals_like.client.transport import call_backward, call_forward
from petals_like.config import ClientConfig
from petals_like.data_structures import RemoteSpanInfo
from petals_like.dht.node import SwarmNode
from petals_like.routing.manager import RouteManager

logger = logging.getLogger(__name__)

Trace = list[tuple[RemoteSpanInfo, torch.Tensor]]  # (span, the hidden states it received)


class RemoteSequential(torch.nn.Module):
    def __init__(self, node: SwarmNode, routes: RouteManager, config: ClientConfig, num_blocks: int):
        super().__init__()
        self.node = node
        self.routes = routes
        self.config = config
        self.num_blocks = num_blocks
        self.last_trace_peers: list[str] = []  # servers of the latest forward pass, in order

    def forward(self, hidden: torch.Tensor, pad_lens: Optional[list[int]] = None) -> torch.Tensor:
        """[batch, seq, hidden] -> [batch, seq, hidden] through blocks 0..num_blocks-1, differentiable."""
        return _RemoteBlocks.apply(hidden, self, pad_lens)

    def _run(self, coro):
        return self.node.run(coro, timeout=self.config.request_timeout * (1 + self.config.max_retries))

    async def forward_range(self, start: int, end: int, hidden: torch.Tensor, pad_lens: Optional[list[int]]
                            ) -> tuple[torch.Tensor, Trace]:  # fmt: skip
        trace: Trace = []
        block, failures = start, 0
        while block < end:
            route = await self.routes.make_route(block, end, training=True)
            for span in route:
                try:
                    out = await call_forward(self.node.p2p, span, hidden, pad_lens, timeout=self.config.request_timeout)
                except Exception as e:
                    failures += 1
                    if failures > self.config.max_retries:
                        raise RuntimeError(f"forward through blocks {block}:{end} failed {failures} times: {e!r}") from e
                    self.routes.ban(span.peer_id, repr(e))
                    break  # re-plan from this block
                self.routes.succeeded(span.peer_id)
                trace.append((span, hidden))
                hidden, block = out, span.end
        return hidden, trace

    async def backward_trace(self, trace: Trace, grad: torch.Tensor, pad_lens: Optional[list[int]]) -> torch.Tensor:
        for span, inputs in reversed(trace):
            grad = await self._backward_span(span, inputs, grad, pad_lens, depth=0)
        return grad

    async def _backward_span(self, span: RemoteSpanInfo, inputs: torch.Tensor, grad: torch.Tensor,
                             pad_lens: Optional[list[int]], depth: int) -> torch.Tensor:  # fmt: skip
        try:
            result = await call_backward(self.node.p2p, span, inputs, grad, pad_lens, timeout=self.config.request_timeout)
        except Exception as e:
            if depth >= self.config.max_retries:
                raise RuntimeError(f"backward through blocks {span.start}:{span.end} kept failing: {e!r}") from e
            self.routes.ban(span.peer_id, repr(e))
            _, trace = await self.forward_range(span.start, span.end, inputs, pad_lens)
            for inner_span, inner_inputs in reversed(trace):
                grad = await self._backward_span(inner_span, inner_inputs, grad, pad_lens, depth + 1)
            return grad
        self.routes.succeeded(span.peer_id)
        return result


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, sequential: RemoteSequential, pad_lens: Optional[list[int]]) -> torch.Tensor:
        out, trace = sequential._run(sequential.forward_range(0, sequential.num_blocks, hidden.detach().cpu(), pad_lens))
        ctx.sequential, ctx.trace, ctx.pad_lens = sequential, trace, pad_lens
        sequential.last_trace_peers = [span.peer_id for span, _ in trace]
        ctx.input_device = hidden.device
        return out.to(hidden.device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        sequential: RemoteSequential = ctx.sequential
        grad = sequential._run(sequential.backward_trace(ctx.trace, grad_output.detach().cpu().contiguous(), ctx.pad_lens))
        return grad.to(ctx.input_device), None, None

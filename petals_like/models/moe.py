"""The sparse mixture-of-experts feed-forward of Mixtral, Qwen2-MoE and Qwen3-MoE blocks.

A router (`gate`, a linear layer) scores every expert for each token; the top-k experts' SwiGLU
MLPs run on that token and their outputs are summed, weighted by the router's softmax
probabilities (renormalized over the top k where the family does). Qwen2-MoE adds a shared expert
that every token goes through, scaled by a sigmoid gate of its own.

Why grouped by expert: a server's batched iteration hands this module the tokens of every session
at once ([tokens, hidden]); the tokens are sorted by expert, so each chosen expert multiplies all of
its tokens in one product and its weights are read once per iteration, however many sessions chose
it. Per-token routing would read an expert's weights once for each token that picked it
(tokens x k products); `expert_products` counts the products actually run, `routed_tokens` the
tokens x k, so the saving is measured (bench (r)).

Checkpoint names (transformers saves both families this way):
- Mixtral: `block_sparse_moe.gate.weight`, `block_sparse_moe.experts.{e}.w1|w3|w2.weight`
  (gate, up, down);
- Qwen-MoE: `mlp.gate.weight`, `mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`, and for
  Qwen2-MoE `mlp.shared_expert.*` and `mlp.shared_expert_gate.weight`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from petals_like.models.expert_store import ExpertStore
from petals_like.models.linear import linear, stored_bytes
from petals_like.models.spec import ModelSpec

# family -> (the block's attribute, the expert's gate / up / down projection names)
LAYOUTS: dict[str, tuple[str, tuple[str, str, str]]] = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}


class Expert(nn.Module):
    """One SwiGLU MLP, its projections named as the family's checkpoints name them."""

    def __init__(self, hidden_size: int, intermediate_size: int, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden_size, intermediate_size, bias=False))
        setattr(self, up, nn.Linear(hidden_size, intermediate_size, bias=False))
        setattr(self, down, nn.Linear(intermediate_size, hidden_size, bias=False))
        self.fused: Optional[list[Any]] = None  # [gate_up, down] weights, set by fuse()

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return tuple(getattr(self, name) for name in self.names)  # type: ignore[return-value]

    @torch.no_grad()
    def fuse(self) -> None:
        """gate and up in one weight (the Linears become views of it), down as it is."""
        gate, up, down = self.projections()
        gate_up = torch.cat([gate.weight, up.weight])
        size = gate.weight.shape[0]
        gate.weight = nn.Parameter(gate_up[:size], requires_grad=gate.weight.requires_grad)
        up.weight = nn.Parameter(gate_up[size:], requires_grad=up.weight.requires_grad)
        self.fused = [gate_up, down.weight]

    def forward(self, x: Tensor) -> Tensor:
        if self.fused is not None and (not isinstance(self.fused[0], Tensor) or not torch.is_grad_enabled()):
            gate, up = linear(x, self.fused[0]).chunk(2, dim=-1)
            return swiglu(gate, up, self.fused[1])
        gate, up, down = self.projections()
        return swiglu(gate(x), up(x), down.weight)


def swiglu(gate: Tensor, up: Tensor, down: Any) -> Tensor:
    """An expert's output from its gate and up projections of x: down(silu(gate) * up)."""
    return linear(F.silu(gate) * up, down)


class SparseMoE(nn.Module):
    """Router + routed experts (+ Qwen2-MoE's gated shared expert): [tokens, hidden] -> [tokens, hidden].

    offloaded=True: no routed expert is held here; `store` (models/expert_store.py), set by the loader,
    runs them from the checkpoint on demand."""

    def __init__(self, spec: ModelSpec, block_index: int, offloaded: bool = False) -> None:
        super().__init__()
        _, names = LAYOUTS[spec.family]
        self.family = spec.family
        self.block_index = block_index
        self.num_experts = spec.num_experts
        self.top_k = spec.experts_per_token
        self.norm_topk_prob = spec.norm_topk_prob
        self.gate = nn.Linear(spec.hidden_size, spec.num_experts, bias=False)
        count = 0 if offloaded else spec.num_experts
        self.experts = nn.ModuleList(Expert(spec.hidden_size, spec.moe_intermediate_size, names) for _ in range(count))
        self.store: Optional[ExpertStore] = None
        if spec.shared_expert_intermediate_size:
            self.shared_expert = Expert(spec.hidden_size, spec.shared_expert_intermediate_size, names)
            self.shared_expert_gate = nn.Linear(spec.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None
        # counters since creation: experts run (each on all of its tokens at once), and tokens x top_k (the
        # products that routing token by token would run); for the call with the most tokens, both
        self.calls = 0
        self.expert_products = 0
        self.routed_tokens = 0
        self.busiest_call = (0, 0)  # (routed tokens x top_k, experts run) of the largest call

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(weights [tokens, k], experts [tokens, k]) as the family computes them."""
        logits = linear(x, self.gate.weight)
        if self.family == "mixtral":  # softmax in float32, always renormalized, kept in float32
            weights, chosen = torch.topk(F.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
            return weights / weights.sum(dim=-1, keepdim=True), chosen
        weights, chosen = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), chosen

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """x: the normalized hidden states [tokens, hidden]; residual: the block's residual stream, from
        which an expert store guesses the next block's experts (once this block's are in hand)."""
        weights, chosen = self.route(x)
        out = torch.zeros_like(x)
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        used = [index for index, count in enumerate(counts) if count]
        if self.store is not None:
            held = {index: self.store.acquire(self.block_index, index) for index in used}
            if residual is not None:
                self.store.prefetch_next(self.block_index, residual)
        flat_weights = weights.reshape(-1)
        start = 0
        for index in used:
            pairs = order[start : start + counts[index]]
            start += counts[index]
            rows = pairs // self.top_k
            if self.store is not None:
                gate, up, down = held[index]
                y = swiglu(linear(x[rows], gate), linear(x[rows], up), down)
            else:
                y = self.experts[index](x[rows])
            out.index_add_(0, rows, (y * flat_weights[pairs, None]).to(out.dtype))
        if self.store is not None:
            self.store.finish_call(self.block_index, set(used))
        self.calls += 1
        self.expert_products += len(used)
        self.routed_tokens += flat.numel()
        if flat.numel() > self.busiest_call[0]:
            self.busiest_call = (flat.numel(), len(used))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return out

    def expert_tensor_names(self, prefix: str, expert: int) -> tuple[str, str, str]:
        """Checkpoint names of a routed expert's (gate, up, down) weights; prefix: the block's, e.g. `model.layers.3.`."""
        attribute, names = LAYOUTS[self.family]
        return tuple(f"{prefix}{attribute}.experts.{expert}.{name}.weight" for name in names)  # type: ignore[return-value]

    def _all_experts(self) -> list[tuple[str, Expert]]:
        named = [(f"experts.{e}", expert) for e, expert in enumerate(self.experts)]
        return named + ([("shared_expert", self.shared_expert)] if self.shared_expert is not None else [])

    def fuse(self) -> None:
        for _, expert in self._all_experts():
            expert.fuse()

    def linear_weights(self) -> dict[str, tuple[Any, None]]:
        """Each expert's fused gate_up and down weights (the router stays as it is: small, and it decides
        which experts run, so it is never quantized)."""
        weights = {}
        for name, expert in self._all_experts():
            if expert.fused is None:
                raise ValueError("linear_weights() needs the experts fused (fuse_projections())")
            weights[f"{name}.gate_up"], weights[f"{name}.down"] = (expert.fused[0], None), (expert.fused[1], None)
        return weights

    @torch.no_grad()
    def replace_linear_weights(self, convert: Callable[[Tensor], Any]) -> None:
        for _, expert in self._all_experts():
            expert.fused = [convert(weight) for weight in expert.fused]
            for projection in expert.projections():
                projection.weight = None


def span_expert_stats(span: nn.Module) -> dict[str, Any]:
    """For rpc_info and the benchmark: the MoE blocks' counters summed (calls are one per block per
    batched iteration or forward), and with offloaded experts the store's hit rates and resident bytes;
    {} for a dense span."""
    blocks = [block.moe for block in getattr(span, "blocks", ()) if getattr(block, "moe", None) is not None]
    if not blocks:
        return {}
    stats: dict[str, Any] = {
        "moe_blocks": len(blocks),
        "calls": sum(moe.calls for moe in blocks),
        "expert_products": sum(moe.expert_products for moe in blocks),
        "routed_tokens": sum(moe.routed_tokens for moe in blocks),
        "resident_expert_bytes": sum(_stored_bytes(expert) for moe in blocks for expert in moe.experts),
    }
    store = getattr(span, "expert_store", None)
    if store is not None:
        stats["resident_expert_bytes"] = store.resident_bytes
        stats["store"] = store.stats.summary()
    return stats


def _stored_bytes(expert: Expert) -> int:
    weights = expert.fused if expert.fused is not None else [p.weight for p in expert.projections()]
    return sum(stored_bytes(weight) for weight in weights)

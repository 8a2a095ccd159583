"""BlockSpan: the consecutive blocks of one model that a server hosts, run as one unit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from petals_like.models.attention import RotaryEmbedding, alibi_slopes, make_attention_context
from petals_like.models.llama.block import LlamaBlock
from petals_like.models.lora import LoraRows
from petals_like.models.spec import ModelSpec


@dataclass(frozen=True)
class BlockRange:
    """Which of a span's blocks a request runs, as offsets into the span: [first, last)."""

    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first


class BlockSpan(nn.Module):
    """Blocks [start, end) of one model: the unit a server hosts.

    `blocks[i]` is model block `start + i`. forward() can run a sub-range [first, last) of the span
    (relative indices), e.g. when a client's route covers only part of what this server holds.
    """

    def __init__(self, spec: ModelSpec, start: int, end: int, blocks: Optional[Sequence[LlamaBlock]] = None) -> None:
        super().__init__()
        if not 0 <= start < end <= spec.num_blocks:
            raise ValueError(f"span [{start}, {end}) is not inside [0, {spec.num_blocks})")
        if spec.family.startswith("qwen") and spec.sliding_window is not None:
            # Qwen2 slides only in layers >= max_window_layers, which ModelSpec does not carry
            raise ValueError(f"{spec.family} with use_sliding_window=True is not supported")
        if blocks is None:
            blocks = [LlamaBlock(spec, i) for i in range(start, end)]
        if len(blocks) != end - start:
            raise ValueError(f"got {len(blocks)} blocks for span [{start}, {end})")
        self.spec = spec
        self.start = start
        self.end = end
        self.blocks = nn.ModuleList(blocks)
        self.rotary = RotaryEmbedding(spec)
        self.expert_store = None  # models/expert_store.py's, where the loader offloads experts
        self.alibi = alibi_slopes(spec.num_heads) if spec.alibi else None  # BLOOM

    def _range(self, first: int, last: Optional[int]) -> tuple[int, int]:
        last = len(self.blocks) if last is None else last
        if not 0 <= first < last <= len(self.blocks):
            raise ValueError(f"blocks [{first}, {last}) are not inside this span's [0, {len(self.blocks)})")
        return first, last

    def forward(
        self,
        hidden: Tensor,
        *,
        pad_lens: Optional[Tensor] = None,
        first: int = 0,
        last: Optional[int] = None,
        prompts: Optional[Tensor] = None,
        lora: Optional[Sequence[Optional[LoraRows]]] = None,
    ) -> Tensor:
        """hidden [batch, seq, hidden] -> [batch, seq, hidden] through blocks[first:last].

        prompts [last - first, prefix, hidden] (deep prompt tuning) are added to the first `prefix`
        positions of every sequence before each block; lora[i] are the adapters of block first + i.

        pad_lens [batch] counts left pads, or None when nothing is padded (faster). No cache:
        incremental inference runs on the server's paged pool (server/batched_span.py).
        """
        first, last = self._range(first, last)
        if hidden.dim() != 3 or hidden.shape[-1] != self.spec.hidden_size or hidden.shape[1] == 0:
            raise ValueError(f"hidden must be [batch, seq > 0, {self.spec.hidden_size}], got {list(hidden.shape)}")
        batch, seq, _ = hidden.shape
        contexts = {  # one per sliding window among the blocks (Gemma 2 alternates two)
            window: make_attention_context(
                self.rotary,
                batch_size=batch,
                seq_len=seq,
                dtype=hidden.dtype,
                device=hidden.device,
                pad_lens=pad_lens,
                sliding_window=window,
                alibi=self.alibi,
            )  # fmt: skip
            for window in {block.window for block in self.blocks[first:last]}
        }
        if prompts is not None and (prompts.dim() != 3 or prompts.shape[0] != last - first or prompts.shape[1] > seq):
            raise ValueError(f"prompts must be [{last - first}, prefix <= {seq}, hidden], got {list(prompts.shape)}")
        if lora is not None and len(lora) != last - first:
            raise ValueError(f"got LoRA for {len(lora)} blocks, blocks [{first}, {last}) need {last - first}")
        for layer, block in enumerate(self.blocks[first:last]):
            if prompts is not None:
                prefix = prompts.shape[1]
                hidden = torch.cat([hidden[:, :prefix] + prompts[layer].to(hidden.dtype), hidden[:, prefix:]], dim=1)
            hidden = block(hidden, contexts[block.window], layer, None if lora is None else lora[layer])
        return hidden

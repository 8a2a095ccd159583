"""Token generation on top of an InferenceSession: greedy or sampled, EOS stop, left-padded batches.

A session may span several generate() calls: the last sampled token of one call is sent as the
first input of the next, so continuing a session equals one long generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from petals_like.client.inference_session import InferenceSession


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    generator: Optional[torch.Generator] = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch, vocab] float logits -> [batch] token ids."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        logits = logits / self.temperature
        if self.top_k is not None:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        if self.top_p is not None and self.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative - sorted_logits.softmax(dim=-1) >= self.top_p  # keep the smallest set reaching top_p
            sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
            logits = torch.full_like(logits, -float("inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def left_pad_lens(attention_mask: Optional[torch.Tensor], input_ids: torch.Tensor) -> Optional[list[int]]:
    """Leading zeros of each row of the mask; None without padding. Right padding needs none (causal)."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    mask = attention_mask.bool()
    seq = mask.shape[1]
    first_real = torch.where(mask.any(dim=1), mask.int().argmax(dim=1), torch.full_like(mask[:, 0], seq, dtype=torch.long))
    pad_lens = first_real.tolist()
    for row, pad in zip(mask, pad_lens):
        if pad >= seq:
            raise ValueError("a sequence in the batch has no real tokens (attention_mask is all zeros)")
        rest = row[pad:]
        if not rest.all():
            # zeros after real tokens are right padding: allowed only as a trailing block
            last_real = int(rest.int().cumsum(0).argmax())
            if not rest[: last_real + 1].all():
                raise ValueError("attention_mask must be left- or right-padding only (no holes)")
    return pad_lens if any(pad_lens) else None


def generate_tokens(
    session: InferenceSession,
    embed: Callable[[torch.Tensor], torch.Tensor],
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    input_ids: Optional[torch.Tensor],
    *,
    pad_lens: Optional[list[int]],
    max_new_tokens: int,
    sampling: SamplingParams,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    streamer: Optional[Any] = None,
) -> torch.Tensor:
    """Generate up to max_new_tokens per sequence; returns them as [batch, n] (pad after EOS).

    `session` needs only step(), position, last_token_ids and finished, so the same loop drives a
    remote InferenceSession and a local one (benchmarks). `streamer` gets put(tokens [batch]) per
    step and end() at the end, as transformers' streamers do.
    """
    pending = session.last_token_ids
    if input_ids is None and pending is None:
        raise ValueError("input_ids are required to start a session")
    inputs = input_ids if pending is None else pending if input_ids is None else torch.cat([pending, input_ids], dim=1)
    batch = inputs.shape[0]
    finished = session.finished
    if finished is None or finished.shape[0] != batch:
        finished = torch.zeros(batch, dtype=torch.bool)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long)
    new_tokens: list[torch.Tensor] = []
    first = session.position == 0
    for _ in range(max_new_tokens):
        hidden = session.step(embed(inputs), pad_lens=pad_lens if first else None, token_ids=inputs)
        first = False
        logits = logits_fn(hidden[:, -1:, :])[:, -1, :].float()
        tokens = sampling.choose(logits)
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        new_tokens.append(tokens)
        if streamer is not None:
            streamer.put(tokens)
        if len(eos):
            finished = finished | torch.isin(tokens, eos)
        inputs = tokens[:, None]
        if finished.all():
            break
    if streamer is not None:
        streamer.end()
    session.last_token_ids = inputs if new_tokens else pending
    session.finished = finished
    if not new_tokens:
        return torch.empty(batch, 0, dtype=torch.long)
    return torch.stack(new_tokens, dim=1)

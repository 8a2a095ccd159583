"""Token generation on top of an InferenceSession: greedy or sampled, EOS stop, left-padded batches.

A session may span several generate() calls: the last sampled token of one call is sent as the
first input of the next, so continuing a session equals one long generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch


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


class Generation:
    """The token loop of generate() without its I/O: which tokens go in next, and what to make of logits.

    A driver alternates `next_inputs()` (token ids [batch, n] for the next step) and `accept(logits)`
    (the step's last-position logits [batch, vocab]) while `running`, then calls `result()`. The
    blocking driver is generate_tokens(); the remote model drives it on the client's event loop
    (DistributedModelForCausalLM.generate), where many concurrent calls share one thread.
    """

    def __init__(
        self,
        session,
        input_ids: Optional[torch.Tensor],
        *,
        pad_lens: Optional[list[int]],
        max_new_tokens: int,
        sampling: SamplingParams,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        streamer: Optional[Any] = None,
    ):
        """`session` needs position, last_token_ids and finished (a remote or a local session)."""
        self.session = session
        self.pending = session.last_token_ids
        if input_ids is None and self.pending is None:
            raise ValueError("input_ids are required to start a session")
        pending = self.pending
        self.inputs = input_ids if pending is None else pending if input_ids is None else torch.cat([pending, input_ids], dim=1)
        batch = self.inputs.shape[0]
        finished = session.finished
        self.finished = finished if finished is not None and finished.shape[0] == batch else torch.zeros(batch, dtype=torch.bool)
        self.eos = torch.tensor(list(eos_token_ids), dtype=torch.long)
        self.sampling = sampling
        self.pad_token_id = pad_token_id
        self.streamer = streamer
        self.max_new_tokens = max_new_tokens
        self.new_tokens: list[torch.Tensor] = []
        self.first_pad_lens = pad_lens if session.position == 0 else None  # the first step only
        self.running = max_new_tokens > 0

    def next_inputs(self) -> tuple[torch.Tensor, Optional[list[int]]]:
        """Token ids [batch, n] of the next step and its pad_lens (only a session's first step has any)."""
        pad_lens, self.first_pad_lens = self.first_pad_lens, None
        return self.inputs, pad_lens

    def accept(self, logits: torch.Tensor) -> None:
        """The last position's logits [batch, vocab] of the step just run: choose the next tokens."""
        tokens = self.sampling.choose(logits.float())
        tokens = torch.where(self.finished, torch.full_like(tokens, self.pad_token_id), tokens)
        self.new_tokens.append(tokens)
        if self.streamer is not None:
            self.streamer.put(tokens)
        if len(self.eos):
            self.finished = self.finished | torch.isin(tokens, self.eos)
        self.inputs = tokens[:, None]
        self.running = len(self.new_tokens) < self.max_new_tokens and not bool(self.finished.all())

    def result(self) -> torch.Tensor:
        """The new tokens [batch, n] (pad after EOS); the session remembers where it stopped."""
        if self.streamer is not None:
            self.streamer.end()
        session = self.session
        session.last_token_ids = self.inputs if self.new_tokens else self.pending
        session.finished = self.finished
        if not self.new_tokens:
            return torch.empty(self.inputs.shape[0], 0, dtype=torch.long)
        return torch.stack(self.new_tokens, dim=1)


def generate_tokens(
    session,
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
    """Generate up to max_new_tokens per sequence, blocking; returns them as [batch, n] (pad after EOS).

    `session` needs step(), position, last_token_ids and finished, so the same loop drives a
    remote InferenceSession and a local one (benchmarks). `streamer` gets put(tokens [batch]) per
    step and end() at the end, as transformers' streamers do. logits_fn: [batch, 1, hidden] ->
    [batch, 1, vocab].
    """
    run = Generation(
        session,
        input_ids,
        pad_lens=pad_lens,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        streamer=streamer,
    )
    while run.running:
        inputs, step_pad_lens = run.next_inputs()
        hidden = session.step(embed(inputs), pad_lens=step_pad_lens, token_ids=inputs)
        run.accept(logits_fn(hidden[:, -1:, :])[:, -1, :])
    return run.result()

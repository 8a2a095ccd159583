"""Speculative generation: several tokens per trip through the chain.

Why: over the internet a decode step costs the chain's round trips, not compute, so one session gets
a few tokens per second however fast the servers are. Here each step sends the pending token and k
drafted guesses of the tokens after it; the servers run all k + 1 positions at once, the client
checks every guess against its own choice at that position, keeps the guesses up to the first
rejected one plus its own token there, and rolls the session back past the rest (the servers drop
those KV entries). Greedy output is the same as without drafts, token for token. When sampling, a
draft d (a guess, not a distribution) is kept with probability p(d) under the processed target
distribution p, and otherwise the token is drawn from p without d, renormalized: each token is then
distributed exactly as p (the accept/reject rule of speculative sampling, for a point-mass proposal).

Drafts come from a `drafter(sequence, k) -> list of token ids`: `ngram_drafter` needs no model
(prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last n
tokens), which pays off on text that repeats its context (code, edits, quotes); `model_drafter`
asks a small local model sharing the tokenizer. k adapts: it grows after a step that accepted every
draft and shrinks after one that accepted none.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from petals_like.client.generation import Generation

Drafter = Callable[[torch.Tensor, int], Sequence[int]]
MAX_DRAFT = 8  # guesses per step at most
FIRST_DRAFT = 4


def ngram_drafter(max_ngram: int = 3) -> Drafter:
    """Prompt-lookup drafts: for n = max_ngram .. 1, the latest earlier place where the last n tokens
    occur, and the (up to k) tokens that followed them there."""

    def draft(sequence: torch.Tensor, k: int) -> list[int]:
        tokens = sequence.tolist()
        for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    return tokens[start + n : start + n + k]
        return []

    return draft


@dataclass
class Speculation:
    """generate(speculative=...): where drafts come from, and counters over every call that used it."""

    drafter: Drafter
    steps: int = 0  # trips through the chain
    drafted: int = 0  # drafted tokens sent
    accepted: int = 0  # ... that the model agreed with
    tokens: int = 0  # tokens generated

    @classmethod
    def of(cls, speculative: str | Drafter | Speculation) -> Speculation:
        if isinstance(speculative, Speculation):
            return speculative
        if speculative == "ngram":
            return cls(ngram_drafter())
        if callable(speculative):
            return cls(speculative)
        raise ValueError(
            f"speculative must be 'ngram', a Speculation or a drafter(sequence, k) -> token ids, got {speculative!r}"
        )

    @property
    def acceptance(self) -> Optional[float]:
        """Share of drafted tokens the model agreed with (None before any draft)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_step(self) -> Optional[float]:
        return self.tokens / self.steps if self.steps else None


class ModelDrafter:
    """Drafts from a small local causal LM sharing the tokenizer (a transformers model): its greedy next
    k tokens, one forward pass per token.

    Its KV cache is kept between calls: a call crops it to the longest prefix that the new sequence
    shares with what it holds (the drafts the chain rejected go) and runs only the tokens after that.
    Why not the model's generate(): it re-reads the whole sequence on every call, and its per-call
    setup costs milliseconds; on the trained reference model (bench (s)) that made a step's drafting
    cost about a quarter of a 20 ms link's trip."""

    def __init__(self, draft_model):
        self.model = draft_model
        # the forward's name for the cache: `cache` in recent transformers, `past_key_values` before
        self._cache_argument = "cache" if "cache" in inspect.signature(draft_model.forward).parameters else "past_key_values"
        self._cache = None
        self._held = torch.empty(0, dtype=torch.long)  # the tokens the cache holds, in order

    def __call__(self, sequence: torch.Tensor, k: int) -> list[int]:
        from transformers import DynamicCache

        sequence = sequence.detach().to("cpu", torch.long).reshape(-1)
        if k <= 0 or sequence.numel() == 0:
            return []
        held = self._held[: sequence.numel()]
        differ = (held != sequence[: held.numel()]).nonzero()
        shared = int(differ[0]) if differ.numel() else held.numel()
        shared = min(shared, sequence.numel() - 1)  # at least one token runs: its logits give the first draft
        if self._cache is None or shared == 0:
            self._cache, shared = DynamicCache(), 0
        elif self._cache.get_seq_length() > shared:
            self._cache.crop(shared - self._cache.get_seq_length())  # negative: tokens to drop from the end
        device = self.model.device
        drafts: list[int] = []
        with torch.inference_mode():
            inputs = sequence[shared:]
            while True:
                cache = {self._cache_argument: self._cache}
                logits = self.model(input_ids=inputs[None].to(device), use_cache=True, **cache).logits
                drafts.append(int(logits[0, -1].argmax()))
                if len(drafts) == k:
                    break
                inputs = torch.tensor(drafts[-1:])
        # the cache holds the sequence and every draft but the last (never run)
        self._held = torch.cat([sequence, torch.tensor(drafts[:-1], dtype=torch.long)])
        return drafts


model_drafter = ModelDrafter  # the drafter's name beside ngram_drafter


def first_of(*drafters: Drafter) -> Drafter:
    """The first non-empty draft among `drafters`, tried in order (e.g. n-gram lookup, then a model)."""

    def draft(sequence: torch.Tensor, k: int) -> list[int]:
        for drafter in drafters:
            tokens = list(drafter(sequence, k))
            if tokens:
                return tokens
        return []

    return draft


class SpeculativeGeneration(Generation):
    """Generation's loop with drafts: a step's inputs are the pending token and up to k drafts, and
    accept() takes the logits of those k + 1 positions ([k + 1, vocab]). One sequence."""

    def __init__(self, session, input_ids: Optional[torch.Tensor], *, speculation: Speculation, **kwargs):
        super().__init__(session, input_ids, **kwargs)
        if self.inputs.shape[0] != 1:
            raise ValueError("speculative generation runs one sequence at a time (batch size 1)")
        if self.first_pad_lens:
            raise ValueError("speculative generation needs an unpadded prompt")
        self.speculation = speculation
        self.k = FIRST_DRAFT
        self.drafts: list[int] = []
        self.positions = 1  # logits the next accept() takes: the pending token's and the drafts'
        self._kept_before = 0  # session position + tokens of this step that are known right

    def next_inputs(self) -> tuple[torch.Tensor, Optional[list[int]], None]:
        inputs, pad_lens, _ = super().next_inputs()
        room = self.max_new_tokens - len(self.new_tokens) - 1  # a step always yields one token of its own
        k = min(self.k, room)
        self.drafts = [int(t) for t in self.speculation.drafter(self.sequence[0], k)][:k] if k > 0 else []
        self.positions = 1 + len(self.drafts)
        self._kept_before = self.session.position + inputs.shape[1]
        drafts = torch.tensor([self.drafts], dtype=inputs.dtype)
        return torch.cat([inputs, drafts], dim=1), pad_lens, None

    def accept(self, logits: torch.Tensor) -> None:
        """logits [k + 1, vocab]: at the pending token and at each draft."""
        matched, before = 0, len(self.new_tokens)
        for i in range(self.positions):
            draft = self.drafts[i] if i < len(self.drafts) else None
            if self.chooser.do_sample:
                kept = self._sample(logits[i : i + 1].float(), draft)
            else:
                super().accept(logits[i : i + 1])  # chooses, appends, streams, checks EOS / criteria / length
                kept = draft is not None and int(self.new_tokens[-1][0]) == draft
            if not self.running or not kept:
                break
            matched += 1
        stats = self.speculation
        stats.steps, stats.drafted, stats.accepted = stats.steps + 1, stats.drafted + len(self.drafts), stats.accepted + matched
        stats.tokens += len(self.new_tokens) - before
        # the servers ran the pending token and every draft; they keep those before the new pending token
        keep = self._kept_before + matched
        if self.session.position > keep:
            self.session.position = keep  # rolls every server back (their KV past `keep` is dropped)
        if self.drafts:
            self.k = min(self.k + 1, MAX_DRAFT) if matched == len(self.drafts) else max(1, self.k - 1) if matched == 0 else self.k
        self.positions = 1

    def _sample(self, logits: torch.Tensor, draft: Optional[int]) -> bool:
        """Draw this position's token by the accept/reject rule; True if it is the draft."""
        chooser = self.chooser
        scores = chooser.processors(self.sequence, logits.clone())
        probs = scores.softmax(dim=-1)
        if draft is not None and float(torch.rand((), generator=chooser.generator)) < float(probs[0, draft]):
            token, kept = draft, True
        else:
            if draft is not None:
                probs[0, draft] = 0.0  # the rest of p, renormalized by the draw
            token, kept = int(torch.multinomial(probs, 1, generator=chooser.generator)), False
        self._append(torch.tensor([token]), scores, logits)
        return kept

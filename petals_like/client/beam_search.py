"""Beam search over one inference session, choosing what transformers' generate(num_beams=K) chooses.

The session holds batch x K rows from the prompt on. After each step the K best continuations of
each input may come from any of its rows: the next step tells the servers which row each new row
continues (Step.hypo_ids), and they reorder the rows' KV pages before running it (sharing the
pages two rows have in common, copying only a partial last page).

The choice follows transformers' beam search: per input, the top 2K (more with several EOS ids)
continuations by accumulated log-probability, the best K not stopping continue, and those that
stop (EOS, the length limit, a stopping criterion) compete for the K finished slots with their
score divided by length ** length_penalty; early_stopping and its heuristic as transformers has
them. Why not transformers' own loop: it drives a local model object step by step, while here
many sessions share the client's event loop and LM-head passes.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList

_NEVER = -1.0e9  # the score of a candidate that must not be chosen


class BeamSearch:
    """The beam state of one generate() call, driven as a generation.Generation is: `next_inputs()`
    (token ids [batch x K, n], the first step's pad_lens, and the row order hypo_ids [batch x K] to
    send with them) and `accept(logits)` while `running`, then `result()`."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        *,
        num_beams: int,
        max_new_tokens: int,
        eos_token_ids: Sequence[int],
        pad_token_id: Optional[int],
        processors: LogitsProcessorList,
        criteria: Optional[StoppingCriteriaList] = None,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        do_sample: bool = False,
        generator: Optional[torch.Generator] = None,
        num_return_sequences: int = 1,
        pad_lens: Optional[list[int]] = None,
        keep_scores: bool = False,
        keep_logits: bool = False,
    ):
        """pad_lens: left padding of each input (the rows of its beams get the same)."""
        if num_return_sequences > num_beams:
            raise ValueError(f"num_return_sequences={num_return_sequences} must be <= num_beams={num_beams}")
        batch, prompt_len = input_ids.shape
        self.batch, self.num_beams, self.prompt_len = batch, num_beams, prompt_len
        self.max_length = prompt_len + max_new_tokens
        self.eos = torch.tensor(list(eos_token_ids), dtype=torch.long)
        self.processors, self.criteria = processors, criteria
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.do_sample, self.generator = do_sample, generator
        self.num_return_sequences = num_return_sequences
        self.keep = max(2, 1 + len(self.eos)) * num_beams  # candidates per input and step
        self.top_mask = torch.arange(self.keep) < num_beams  # only these candidates may finish

        fill = (pad_token_id or int(self.eos[0])) if len(self.eos) else -1  # as transformers fills
        self.beams = torch.full((batch, num_beams, self.max_length), fill, dtype=torch.long)  # running ones
        self.beams[:, :, :prompt_len] = input_ids[:, None, :]
        self.running_scores = torch.zeros(batch, num_beams)
        self.running_scores[:, 1:] = _NEVER  # all rows start equal: only the first one's continuations count
        self.finished = self.beams.clone()
        self.finished_scores = torch.full((batch, num_beams), _NEVER)
        self.finished_lengths = torch.zeros(batch, num_beams, dtype=torch.long)  # new tokens of each
        self.is_finished = torch.zeros(batch, num_beams, dtype=torch.bool)
        self.may_improve = torch.ones(batch, 1, dtype=torch.bool)
        self.cur_len = prompt_len
        self.hypo_ids: Optional[torch.Tensor] = None
        self.pad_lens = None if pad_lens is None else [pad for pad in pad_lens for _ in range(num_beams)]
        self.scores: Optional[list[torch.Tensor]] = [] if keep_scores else None  # processed log-probs per step
        self.logits: Optional[list[torch.Tensor]] = [] if keep_logits else None
        self.running = max_new_tokens > 0

    def next_inputs(self) -> tuple[torch.Tensor, Optional[list[int]], Optional[torch.Tensor]]:
        """Token ids of the next step [batch x K, n], its pad_lens (the first step's only) and the rows
        they continue (None: as they are)."""
        flat = self.beams.view(self.batch * self.num_beams, -1)
        if self.cur_len == self.prompt_len:
            return flat[:, : self.prompt_len], self.pad_lens, None
        return flat[:, self.cur_len - 1 : self.cur_len], None, self.hypo_ids

    def accept(self, logits: torch.Tensor) -> None:
        """The step's last-position logits [batch x K, vocab]: choose the next beams."""
        batch, beams, cur_len = self.batch, self.num_beams, self.cur_len
        logits = logits.float()
        sequences = self.beams.view(batch * beams, -1)[:, :cur_len]
        log_probs = self.processors(sequences, torch.log_softmax(logits, dim=-1))
        if self.logits is not None:
            self.logits.append(logits.clone())
        if self.scores is not None:
            self.scores.append(log_probs.clone())
        vocab = log_probs.shape[-1]
        total = (log_probs.view(batch, beams, vocab) + self.running_scores[:, :, None]).view(batch, beams * vocab)

        if self.do_sample:
            picked = torch.multinomial(torch.softmax(total, dim=-1), self.keep, generator=self.generator)
            cand_scores, order = total.gather(1, picked).sort(dim=-1, descending=True)
            picked = picked.gather(1, order)
        else:
            cand_scores, picked = torch.topk(total, self.keep)
        parents, tokens = picked // vocab, picked % vocab
        candidates = _take(self.beams, parents)
        candidates[:, :, cur_len] = tokens

        stops = torch.full_like(tokens, cur_len + 1 >= self.max_length, dtype=torch.bool)
        if len(self.eos):
            stops |= torch.isin(tokens, self.eos)
        if self.criteria:
            flat = candidates.view(batch * self.keep, -1)[:, : cur_len + 1]
            stops |= self.criteria(flat, log_probs).to(torch.bool).view(batch, self.keep)

        # the best K candidates that do not stop run on
        running_scores = cand_scores + stops.float() * _NEVER
        best = torch.topk(running_scores, beams).indices
        self.beams = _take(candidates, best)
        self.running_scores = running_scores.gather(1, best)
        origin = parents.gather(1, best)

        # those among the first K that stop compete for the finished slots
        just_finished = stops & self.top_mask[None, :]
        scored = cand_scores / ((cur_len + 1 - self.prompt_len) ** self.length_penalty)
        full = self.is_finished.all(dim=-1, keepdim=True) & (self.early_stopping is True)
        scored = scored + full.float() * _NEVER + (~self.may_improve).float() * _NEVER + (~just_finished).float() * _NEVER
        merged = torch.topk(torch.cat([self.finished_scores, scored], dim=1), beams).indices
        lengths = torch.full_like(tokens, cur_len + 1 - self.prompt_len)
        self.finished = _take(torch.cat([self.finished, candidates], dim=1), merged)
        self.finished_scores = torch.cat([self.finished_scores, scored], dim=1).gather(1, merged)
        self.finished_lengths = torch.cat([self.finished_lengths, lengths], dim=1).gather(1, merged)
        self.is_finished = torch.cat([self.is_finished, just_finished], dim=1).gather(1, merged)

        self.cur_len = cur_len = cur_len + 1
        self.hypo_ids = (origin + torch.arange(batch)[:, None] * beams).view(-1)
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_length - self.prompt_len
        else:
            best_length = cur_len - self.prompt_len
        best_possible = self.running_scores[:, :1] / (best_length**self.length_penalty)
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(dim=1, keepdim=True).values, -1.0e9)
        self.may_improve = self.may_improve & (best_possible > worst_finished).any(dim=-1, keepdim=True)
        open_beam = not (bool(self.is_finished.all()) and self.early_stopping is True)
        self.running = bool(self.may_improve.any()) and open_beam and not bool(stops.all())

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequences [batch x num_return_sequences, prompt + new], their scores), best first per input."""
        n = self.num_return_sequences
        sequences = self.finished[:, :n].reshape(self.batch * n, -1)
        scores = self.finished_scores[:, :n].reshape(-1)
        longest = int(self.finished_lengths[:, :n].max())
        return sequences[:, : self.prompt_len + longest], scores


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor [batch, beams, ...] rows picked per input by index [batch, k] -> [batch, k, ...]."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)

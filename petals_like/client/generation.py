"""Token generation on top of an InferenceSession, with transformers' own generation options.

generate() takes what transformers' generate() takes for decoder-only models without beam search:
a GenerationConfig (the checkpoint's generation_config.json, then transformers' defaults, then the
caller's), transformers' logits processors and warpers for the per-step choice (built in the order
transformers applies them, so seeded sampling draws the same tokens), stopping criteria, and
ModelOutput results (return_dict_in_generate, output_scores, output_logits). The loop itself is this
project's: it runs on the client's event loop, where concurrent calls share LM-head passes.

A session may span several generate() calls: the last sampled token of one call is sent as the
first input of the next, so continuing a session equals one long generation.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria

# options that need something a client of the swarm does not do: refused with a clear error, never ignored
_UNSUPPORTED = {
    "num_beam_groups": (1, "group beam search"),
    "penalty_alpha": (None, "contrastive search"),
    "guidance_scale": (None, "classifier-free guidance"),
    "sequence_bias": (None, "sequence_bias"),
    "force_words_ids": (None, "forced words (constrained beam search)"),
    "constraints": (None, "constrained beam search"),
    "exponential_decay_length_penalty": (None, "exponential_decay_length_penalty"),
    "forced_bos_token_id": (None, "forced_bos_token_id (the first token is the prompt's)"),
    "watermarking_config": (None, "watermarking"),
    "prompt_lookup_num_tokens": (None, "prompt lookup decoding"),
    "assistant_early_exit": (None, "assisted decoding"),
    "dola_layers": (None, "DoLa decoding"),
    "top_h": (None, "top_h"),
    "max_time": (None, "max_time (a wall-clock stop)"),
}


def resolve_generation_config(
    model_config: GenerationConfig, generation_config: Optional[GenerationConfig] = None, **kwargs: Any
) -> GenerationConfig:
    """What one generate() call runs with, by transformers' precedence: the call's keywords, then its
    generation_config, then the model's (the checkpoint's generation_config.json), then transformers'
    defaults. Unknown keywords raise TypeError (transformers would pass them to the model's forward)."""
    config = copy.deepcopy(generation_config if generation_config is not None else model_config)
    config.update(**model_config.to_dict(), defaults_only=True)
    # transformers' documented defaults (top_k=50, temperature=1.0, ...); the accessor exists since 5.0
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    unused = config.update(**kwargs)
    if unused:
        raise TypeError(f"generate() got unknown arguments {sorted(unused)}")
    for name, (neutral, what) in _UNSUPPORTED.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            raise ValueError(f"{what} is not supported by generate() over the swarm ({name}={value!r})")
    copies, beams = config.num_return_sequences or 1, config.num_beams or 1
    if copies > 1 and not config.do_sample and copies > beams:
        raise ValueError(f"num_return_sequences={copies} needs do_sample=True or num_beams >= {copies}")
    return config


def eos_ids(config: GenerationConfig) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def logits_processors(
    config: GenerationConfig,
    prompt_len: int,
    user: Optional[LogitsProcessorList] = None,
    *,
    pad_lens: Optional[list[int]] = None,
) -> LogitsProcessorList:
    """transformers' processors and (with do_sample) warpers for `config`, in the order its generate()
    applies them; the caller's own processors go after the built-in ones and before the warpers, as
    in transformers. prompt_len: tokens of the sequence before this call's first new token."""
    eos = torch.tensor(eos_ids(config), dtype=torch.long)
    built = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        extra = {}
        if pad_lens and "prompt_ignore_length" in inspect.signature(RepetitionPenaltyLogitsProcessor.__init__).parameters:
            extra["prompt_ignore_length"] = torch.tensor(pad_lens)  # the padding is not text to penalize
        built.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty, **extra))
    if config.no_repeat_ngram_size:
        built.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        built.append(NoBadWordsLogitsProcessor(config.bad_words_ids, eos))
    if config.min_length and len(eos):
        built.append(MinLengthLogitsProcessor(config.min_length, eos))
    if config.min_new_tokens and len(eos):
        built.append(MinNewTokensLengthLogitsProcessor(prompt_len, config.min_new_tokens, eos))
    if config.forced_eos_token_id is not None:
        built.append(ForcedEOSTokenLogitsProcessor(config.max_length, config.forced_eos_token_id))
    if config.remove_invalid_values:
        built.append(InfNanRemoveLogitsProcessor())
    if config.suppress_tokens is not None:
        built.append(SuppressTokensLogitsProcessor(config.suppress_tokens))
    if config.begin_suppress_tokens is not None:
        built.append(SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, prompt_len))
    for processor in user or ():
        if any(type(processor) is type(b) for b in built):
            raise ValueError(f"{type(processor).__name__} is given both as a logits_processor and by generation options")
        built.append(processor)
    if config.do_sample:
        # beam sampling keeps a token besides every EOS id, so that a beam can always continue
        keep = len(eos) + 1 if len(eos) else 2
        keep = keep if (config.num_beams or 1) > 1 else 1
        if config.temperature is not None and config.temperature != 1.0:
            built.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            built.append(TopKLogitsWarper(config.top_k, min_tokens_to_keep=keep))
        if config.top_p is not None and config.top_p < 1.0:
            built.append(TopPLogitsWarper(config.top_p, min_tokens_to_keep=keep))
        if config.min_p is not None:
            built.append(MinPLogitsWarper(config.min_p, min_tokens_to_keep=keep))
        if config.typical_p is not None and config.typical_p < 1.0:
            built.append(TypicalLogitsWarper(config.typical_p, min_tokens_to_keep=keep))
        if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
            built.append(EpsilonLogitsWarper(config.epsilon_cutoff, min_tokens_to_keep=keep))
        if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
            built.append(EtaLogitsWarper(config.eta_cutoff, min_tokens_to_keep=keep))
    if config.renormalize_logits:
        built.append(LogitNormalization())
    return built


def stopping_criteria(
    config: GenerationConfig, user: Optional[StoppingCriteriaList] = None, tokenizer: Optional[Any] = None
) -> StoppingCriteriaList:
    """Criteria besides the length and EOS (which the loop checks itself): stop strings, the caller's."""
    criteria = StoppingCriteriaList()
    if config.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings need the model's tokenizer: pass tokenizer= to generate()")
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
    criteria.extend(user or ())
    return criteria


@dataclass
class TokenChooser:
    """The per-step choice: processors over the sequence so far, then argmax or a draw."""

    processors: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    do_sample: bool = False
    generator: Optional[torch.Generator] = None  # None: torch's global generator, as transformers draws

    def choose(self, input_ids: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [batch, len] so far and the next position's float logits [batch, vocab] ->
        (token ids [batch], the processed scores [batch, vocab])."""
        scores = self.processors(input_ids, logits)
        if not self.do_sample:
            return scores.argmax(dim=-1), scores
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1), scores


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
        chooser: Callable[[int], TokenChooser],
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        criteria: Optional[StoppingCriteriaList] = None,
        streamer: Optional[Any] = None,
        keep_scores: bool = False,
        keep_logits: bool = False,
    ):
        """`session` needs position, last_token_ids, finished and token_ids (a remote or a local session).
        chooser(prompt_len) makes the per-step choice, given the tokens before the first new one."""
        self.session = session
        self.pending = session.last_token_ids
        if input_ids is None and self.pending is None:
            raise ValueError("input_ids are required to start a session (and after rolling one back)")
        pending = self.pending
        self.inputs = input_ids if pending is None else pending if input_ids is None else torch.cat([pending, input_ids], dim=1)
        batch = self.inputs.shape[0]
        # the whole sequence the processors see: what generate() gave the session before, then this call's
        known = session.token_ids
        if known is not None and known.shape[0] == batch and known.shape[1] == session.position:
            self.sequence = torch.cat([known, self.inputs], dim=1)
        else:
            self.sequence = self.inputs
        finished = session.finished
        self.finished = finished if finished is not None and finished.shape[0] == batch else torch.zeros(batch, dtype=torch.bool)
        self.eos = torch.tensor(list(eos_token_ids), dtype=torch.long)
        self.chooser = chooser(self.sequence.shape[1])
        self.criteria = criteria
        self.pad_token_id = pad_token_id
        self.streamer = streamer
        self.max_new_tokens = max_new_tokens
        self.new_tokens: list[torch.Tensor] = []
        self.scores: Optional[list[torch.Tensor]] = [] if keep_scores else None
        self.logits: Optional[list[torch.Tensor]] = [] if keep_logits else None
        self.first_pad_lens = pad_lens if session.position == 0 else None  # the first step only
        self.running = max_new_tokens > 0

    def next_inputs(self) -> tuple[torch.Tensor, Optional[list[int]], None]:
        """Token ids [batch, n] of the next step, its pad_lens (only a session's first step has any) and
        its row order (None: rows stay as they are; beam_search.BeamSearch reorders them)."""
        pad_lens, self.first_pad_lens = self.first_pad_lens, None
        return self.inputs, pad_lens, None

    def accept(self, logits: torch.Tensor) -> None:
        """The last position's logits [batch, vocab] of the step just run: choose the next tokens."""
        logits = logits.float()
        tokens, scores = self.chooser.choose(self.sequence, logits.clone() if self.logits is not None else logits)
        self._append(tokens, scores, logits)

    def _append(self, tokens: torch.Tensor, scores: torch.Tensor, logits: torch.Tensor) -> None:
        """The chosen tokens [batch] (and their processed scores and raw logits) join the sequence."""
        tokens = torch.where(self.finished, torch.full_like(tokens, self.pad_token_id), tokens)
        if self.scores is not None:
            self.scores.append(scores)
        if self.logits is not None:
            self.logits.append(logits)
        self.new_tokens.append(tokens)
        self.sequence = torch.cat([self.sequence, tokens[:, None]], dim=1)
        if self.streamer is not None:
            self.streamer.put(tokens)
        if len(self.eos):
            self.finished = self.finished | torch.isin(tokens, self.eos)
        if self.criteria:
            self.finished = self.finished | self.criteria(self.sequence, scores).to(torch.bool)
        self.inputs = tokens[:, None]
        self.running = len(self.new_tokens) < self.max_new_tokens and not bool(self.finished.all())

    def result(self) -> torch.Tensor:
        """The new tokens [batch, n] (pad after EOS); the session remembers where it stopped."""
        if self.streamer is not None:
            self.streamer.end()
        session = self.session
        session.last_token_ids = self.inputs if self.new_tokens else self.pending
        session.finished = self.finished
        # every token the session has processed (the last new one is sent by the next call)
        session.token_ids = self.sequence[:, :-1] if self.new_tokens else None
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
    chooser: Callable[[int], TokenChooser],
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    streamer: Optional[Any] = None,
) -> torch.Tensor:
    """Generate up to max_new_tokens per sequence, blocking; returns them as [batch, n] (pad after EOS).

    `session` needs step(), position, last_token_ids, finished and token_ids, so the same loop drives
    a remote InferenceSession and a local one (benchmarks). `streamer` gets put(tokens [batch]) per
    step and end() at the end, as transformers' streamers do. logits_fn: [batch, 1, hidden] ->
    [batch, 1, vocab].
    """
    run = Generation(
        session,
        input_ids,
        pad_lens=pad_lens,
        max_new_tokens=max_new_tokens,
        chooser=chooser,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        streamer=streamer,
    )
    while run.running:
        inputs, step_pad_lens, _ = run.next_inputs()
        hidden = session.step(embed(inputs), pad_lens=step_pad_lens, token_ids=inputs)
        run.accept(logits_fn(hidden[:, -1:, :])[:, -1, :])
    return run.result()

"""Completions for the OpenAI-compatible API: one request's choices through the model's generate().

Every request runs generate() on a worker thread of its own; all of them share the one client model,
so concurrent requests share its LM-head passes and the servers batch their steps. Tokens reach the
caller as they are chosen (on_delta), as text that can no longer change: held back while it could
still become a stop string or ends inside a multi-byte character.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

MAX_TOP_LOGPROBS = 20  # as OpenAI's API


@dataclass
class Sampling:
    """One request's generation options, in the API's terms (already checked by the app)."""

    max_tokens: Optional[int] = None  # None: up to the model's context
    temperature: Optional[float] = None  # None: the checkpoint's (1.0 if it has none); 0: greedy
    top_p: Optional[float] = None
    seed: Optional[int] = None
    n: int = 1
    stop: Sequence[str] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None  # None: none; k >= 0: the chosen token's and the k most likely


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class Choice:
    token_ids: list[int] = field(default_factory=list)  # generated, up to and including a stop
    text: str = ""  # what the caller gets: without the stop string, without EOS
    finish_reason: Optional[str] = None  # "stop" (EOS or a stop string) or "length"
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token whose text is in `text`
    sent: int = 0  # characters of `text` already given to on_delta
    sent_logprobs: int = 0


class ContextTooLong(ValueError):
    """The prompt plus max_tokens do not fit the model's context."""


class _Recorder(LogitsProcessor):
    """First in the list: keeps each step's log-probabilities of the model itself (before penalties and
    sampling options), for the logprobs of the token chosen next."""

    def __init__(self) -> None:
        self.last: Optional[torch.Tensor] = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties: logit -= frequency x count + presence x (count > 0),
    counting each token's occurrences in the completion so far (not in the prompt). transformers has
    no processor for them (its repetition_penalty divides logits and counts the prompt too)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        completion = input_ids[:, self.prompt_len :]
        if completion.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, completion, torch.ones_like(completion, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class _Cancelled(StoppingCriteria):
    """Ends generation at the next step once the request is gone (the HTTP client disconnected)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class CompletionEngine:
    """Runs requests through `model.generate()`; thread-safe (one call per request thread)."""

    def __init__(self, model: Any, tokenizer: Any, max_context: int):
        self.model, self.tokenizer, self.max_context = model, tokenizer, max_context
        config = model.generation_config
        eos = config.eos_token_id
        self.eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.top_k = config.top_k or 0  # the checkpoint's own top_k only: OpenAI's API has none

    def check_length(self, prompt_len: int, sampling: Sampling) -> int:
        """max_tokens for this prompt (the rest of the context when not given); ContextTooLong if over."""
        room = self.max_context - prompt_len
        wanted = sampling.max_tokens if sampling.max_tokens is not None else room
        if prompt_len == 0:
            raise ValueError("the prompt is empty")
        if room < 1 or wanted > room:
            raise ContextTooLong(
                f"This model's maximum context length is {self.max_context} tokens; the prompt has {prompt_len} tokens "
                f"and {wanted} more were requested"
            )
        return wanted

    def run(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        on_delta: Optional[Callable[[int, str, list[TokenLogprob], Optional[str]], None]] = None,
        cancelled: Optional[threading.Event] = None,
    ) -> list[Choice]:
        """Generate sampling.n choices for one prompt. on_delta(index, text, logprobs, finish_reason)
        is called on the client's network thread with each choice's new final text (keep it quick)."""
        max_tokens = self.check_length(len(prompt_ids), sampling)
        cancelled = cancelled or threading.Event()
        choices = [Choice() for _ in range(sampling.n)]
        input_ids = torch.tensor([prompt_ids] * sampling.n, dtype=torch.long)
        recorder = _Recorder()  # a log-softmax over the vocabulary per step: only where logprobs are asked for
        processors = LogitsProcessorList([recorder] if sampling.logprobs is not None else [])
        if sampling.presence_penalty or sampling.frequency_penalty:
            processors.append(OpenAIPenalties(len(prompt_ids), sampling.presence_penalty, sampling.frequency_penalty))
        options: dict[str, Any] = {"max_new_tokens": max_tokens}
        temperature = sampling.temperature if sampling.temperature is not None else self.model.generation_config.temperature
        if temperature is not None and temperature == 0:
            options["do_sample"] = False
        else:
            options.update(do_sample=True, temperature=temperature if temperature is not None else 1.0, top_k=self.top_k)
            if sampling.top_p is not None:
                options["top_p"] = sampling.top_p
        if sampling.stop:
            options.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator().manual_seed(sampling.seed)
        streamer = _Streamer(self, choices, sampling, recorder, on_delta)
        self.model.generate(
            input_ids,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]),
            generator=generator,
            streamer=streamer,
            **options,
        )
        for index, choice in enumerate(choices):
            if choice.finish_reason is None:
                choice.finish_reason = "length"
                streamer.flush(index, final=True)
        return choices


class _Text:
    """One choice's text, decoded incrementally: each token costs the decode of a few tokens, not of the
    whole answer so far. A window that starts one decoded token back (its text already known) is decoded
    and the difference appended, as the text-generation servers do; this keeps tokenizers that drop a
    leading space at the start of a decode (SentencePiece) exact. Tokens whose bytes end inside a
    multi-byte character wait for the ones that complete it."""

    def __init__(self, tokenizer: Any):
        self.decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
        self.text = ""
        self.start = 0  # the window's first token: its text is in self.text already
        self.read = 0  # tokens up to here are in self.text
        self.ends: list[int] = []  # where each token's text ends in self.text (tokens decoded so far)

    def add(self, ids: list[int], final: bool = False) -> None:
        """Take in ids[self.read:]; at the end (final) also an incomplete character, as U+FFFD."""
        if len(ids) <= self.read:
            return
        known = self.decode(ids[self.start : self.read]) if self.read > self.start else ""
        window = self.decode(ids[self.start :])
        if not final and (len(window) <= len(known) or window.endswith("\ufffd")):
            return
        self.text += window[len(known) :]
        self.ends += [len(self.text)] * (len(ids) - self.read)
        self.start, self.read = self.read, len(ids)


class _Streamer:
    """generate()'s streamer: puts each row's tokens into its Choice and hands on the final text, one
    on_delta call per token (its text may be empty while held back)."""

    def __init__(self, engine: CompletionEngine, choices: list[Choice], sampling: Sampling, recorder: _Recorder, on_delta):
        self.engine, self.choices, self.sampling, self.recorder, self.on_delta = engine, choices, sampling, recorder, on_delta
        self.longest_stop = max((len(s) for s in sampling.stop), default=0)
        self.hold = max(self.longest_stop - 1, 0)  # a stop string may still be forming
        self.texts = [_Text(engine.tokenizer) for _ in choices]

    def put(self, tokens: torch.Tensor) -> None:
        logprobs = self.recorder.last
        for index, token in enumerate(tokens.tolist()):
            choice = self.choices[index]
            if choice.finish_reason is not None:
                continue
            choice.token_ids.append(token)
            if self.sampling.logprobs is not None and logprobs is not None:
                choice.logprobs.append(_token_logprob(logprobs[index], token, self.sampling.logprobs))
            if token in self.engine.eos:
                choice.finish_reason = "stop"
                self.flush(index, final=True, drop_last=True)
                continue
            self.flush(index, final=False)

    def end(self) -> None:
        pass

    def flush(self, index: int, *, final: bool, drop_last: bool = False) -> None:
        """Decode the choice's new tokens, cut at a stop string, and hand on what is new and final."""
        choice, decoded = self.choices[index], self.texts[index]
        ids = choice.token_ids[:-1] if drop_last else choice.token_ids
        before = len(decoded.text)
        decoded.add(ids, final)
        text = decoded.text
        cut = -1
        if self.sampling.stop and len(text) > before:  # only a stop string that ends in the new text is new
            since = max(before - self.longest_stop + 1, 0)
            cut = min((i for i in (text.find(s, since) for s in self.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, final = text[:cut], True
            choice.finish_reason = "stop"
        elif not final:
            text = text[: max(len(text) - self.hold, 0)]
        choice.text = text
        delta = text[choice.sent :]
        choice.sent = len(text)
        new_logprobs: list[TokenLogprob] = []
        if self.sampling.logprobs is not None:
            ends = decoded.ends
            if final and cut < 0:
                done = len(ids)
            elif final:  # the tokens that start before the cut
                done = sum(1 for i in range(len(ends)) if (ends[i - 1] if i else 0) < len(text))
            else:  # the tokens whose text is entirely out
                done = sum(1 for end in ends if end <= len(text))
            new_logprobs = choice.logprobs[choice.sent_logprobs : max(done, choice.sent_logprobs)]
            choice.sent_logprobs = max(done, choice.sent_logprobs)
        if self.on_delta is not None:
            self.on_delta(index, delta, new_logprobs, choice.finish_reason if final else None)


def _token_logprob(row: torch.Tensor, token: int, top: int) -> TokenLogprob:
    value = float(row[token])
    best: list[tuple[int, float]] = []
    if top:
        values, indices = torch.topk(row, min(top, row.shape[0]))
        best = [(int(i), float(v)) for v, i in zip(values, indices)]
    return TokenLogprob(token, value if math.isfinite(value) else -9999.0, best)

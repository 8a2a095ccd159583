"""(s) speculative generation on a 3-server chain with a slow client link.

The trained reference model (`make_tiny_model --trained`) on servers 0:1, 1:2, 2:4, each of the
client's messages delayed by `link_ms` in its transport (the routing bench's emulation, one message
after another: a step to the three servers and back crosses it four times; the servers, which push
to each other, stay close). One session, 128 new tokens, greedy, for a code-completion prompt (the
first function of a validation file: Python the model was not trained on) and a chat prompt (the
chat template around a request):
- without drafts; with n-gram drafts (prompt lookup); with a model draft (the same checkpoint cut
  to its first 3 of 4 blocks, run locally by transformers: a draft model that shares the tokenizer
  and costs no trip); with both (n-gram where it finds a match, else the model);
- tokens/s, acceptance (drafted tokens the model agreed with), tokens per trip through the chain, and
  whether the tokens equal those without drafts.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from petals_like.bench.harness import BenchSwarm
from petals_like.bench.quality import trained_model_dir
from petals_like.bench.routing import _ClientLinkDelay
from petals_like.client.speculative import Speculation, first_of, model_drafter, ngram_drafter

CHAT_REQUEST = "Write a function that returns the n-th Fibonacci number."


def _prompts(model_dir: Path, tokenizer) -> dict[str, torch.Tensor]:
    from petals_like.models import trained

    _, validation_files = trained.corpus_files()
    text = next(t for t in (f.read_text(errors="replace") for f in validation_files) if "\ndef " in t)
    start = text.index("\ndef ") + 1
    code = text[start : start + 300]  # a function's start, ~100 tokens: with 128 new, within the 256 trained
    chat = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_REQUEST}], add_generation_prompt=True, tokenize=False)
    return {
        "code_completion": tokenizer(code, return_tensors="pt").input_ids,
        "chat": tokenizer(chat, return_tensors="pt", add_special_tokens=False).input_ids,
    }


def _draft_model(model_dir: Path):
    """The checkpoint's first 3/4 of blocks under its own embeddings, norm and head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = max(1, config.num_hidden_layers * 3 // 4)
    return AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).eval()


def speculative_chain(server_args: list[str], new_tokens: int = 128, link_ms: float = 20.0) -> dict:
    """(s)"""
    from transformers import AutoTokenizer

    model_dir = trained_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = _prompts(model_dir, tokenizer)
    draft = _draft_model(model_dir)
    results: dict = {"model": str(model_dir), "link_ms_each_way": link_ms, "new_tokens": new_tokens}
    with BenchSwarm(model_dir, server_args, spans=["0:1", "1:2", "2:4"]) as swarm, _ClientLinkDelay() as link:
        model = swarm.model
        model.generate(prompts["chat"][:, :8], max_new_tokens=4, eos_token_id=[])  # warm-up: routes, streams
        link.delay = link_ms / 1000
        for name, prompt in prompts.items():
            entry: dict = {"prompt_tokens": prompt.shape[1]}
            plain = None
            drafters = {"ngram": ngram_drafter(), "model": model_drafter(draft)}
            drafters["both"] = first_of(drafters["ngram"], drafters["model"])
            for kind in ("none", "ngram", "model", "both"):
                speculation = None if kind == "none" else Speculation(drafters[kind])
                with model.inference_session(max_length=prompt.shape[1] + new_tokens, reuse_prefix=False) as session:
                    started = time.perf_counter()
                    tokens = model.generate(
                        prompt, max_new_tokens=new_tokens, eos_token_id=[], session=session, speculative=speculation
                    )
                    elapsed = time.perf_counter() - started
                row = {"tokens_per_s": round(new_tokens / elapsed, 2)}
                if speculation is None:
                    plain = tokens
                else:
                    row.update(
                        acceptance=round(speculation.acceptance or 0.0, 3),
                        tokens_per_trip=round(speculation.tokens_per_step or 0.0, 2),
                        same_tokens=bool(torch.equal(tokens, plain)),
                    )
                entry[kind] = row
            for kind in ("ngram", "model", "both"):
                entry[kind]["speedup"] = round(entry[kind]["tokens_per_s"] / entry["none"]["tokens_per_s"], 2)
            results[name] = entry
    return results

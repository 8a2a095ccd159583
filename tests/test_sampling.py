"""generate()'s options, without a network: the client's token loop (Generation, driven by
generate_tokens over the serving path's block math in-process) against transformers' generate() on
the same checkpoint, token for token, greedy and seeded sampling alike; and how the options are
resolved (the checkpoint's generation_config.json, transformers' defaults, the caller's)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from petals_like.bench.harness import LocalSession
from petals_like.client.generation import (
    TokenChooser,
    eos_ids,
    generate_tokens,
    logits_processors,
    resolve_generation_config,
)
from petals_like.client.generation import stopping_criteria as build_criteria
from petals_like.models.checkpoint import CheckpointReader
from petals_like.models.llama.head import LocalModules
from petals_like.models.spec import ModelSpec
from petals_like.server.loading import load_span


@pytest.fixture(scope="module")
def ours(tiny_model: Path):
    spec = ModelSpec.from_pretrained(tiny_model)
    span = load_span(tiny_model, spec, 0, spec.num_blocks, torch.float32, torch.device("cpu"), progress=False)
    local = LocalModules.from_state_dict(spec, CheckpointReader(tiny_model).client_state_dict(torch.float32)).eval()
    return span, local, GenerationConfig.from_pretrained(tiny_model)


def generate_here(ours, input_ids: torch.Tensor, user_processors=None, user_criteria=None, **options) -> torch.Tensor:
    """What DistributedModelForCausalLM.generate() computes, with the blocks run in-process."""
    span, local, model_config = ours
    config = resolve_generation_config(model_config, **options)
    eos = eos_ids(config)

    def chooser(prompt_len: int) -> TokenChooser:
        config.max_length = prompt_len + config.max_new_tokens
        return TokenChooser(logits_processors(config, prompt_len, user_processors), bool(config.do_sample))

    session = LocalSession(span, input_ids.shape[1] + config.max_new_tokens)
    from petals_like.client.generation import Generation

    run = Generation(
        session,
        input_ids,
        pad_lens=None,
        max_new_tokens=config.max_new_tokens,
        chooser=chooser,
        eos_token_ids=eos,
        pad_token_id=config.pad_token_id,
        criteria=build_criteria(config, user_criteria),
    )
    with torch.inference_mode():
        while run.running:
            inputs, pad_lens, _ = run.next_inputs()
            hidden = session.step(local.embed(inputs), pad_lens=pad_lens)
            run.accept(local.logits(hidden[:, -1:, :])[:, -1, :])
        return torch.cat([input_ids, run.result()], dim=1)


PROMPT = torch.tensor([[1, 30, 31, 32, 33, 34], [1, 40, 41, 42, 43, 44]])

OPTIONS = [
    dict(do_sample=True),  # transformers' defaults: top_k=50
    dict(do_sample=True, temperature=0.7, top_p=0.9),
    dict(do_sample=True, top_k=0, temperature=1.3),  # top_k=0: no top-k at all
    dict(do_sample=True, min_p=0.05),
    dict(do_sample=True, typical_p=0.8, repetition_penalty=1.3),
    dict(do_sample=False, repetition_penalty=1.5),
    dict(do_sample=False, no_repeat_ngram_size=2),
    dict(do_sample=False, min_new_tokens=12, suppress_tokens=[5, 6]),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_options_choose_the_tokens_transformers_chooses(ours, reference, options):
    for seed in (0, 1):
        torch.manual_seed(seed)
        want = reference.generate(PROMPT, max_new_tokens=16, **options)
        torch.manual_seed(seed)
        got = generate_here(ours, PROMPT, max_new_tokens=16, **options)
        assert torch.equal(got, want), (options, seed, got, want)


def test_callers_processors_and_criteria_apply_as_in_transformers(ours, reference):
    class Ban(LogitsProcessor):  # never the token transformers would pick second
        def __call__(self, input_ids, scores):
            scores[:, 7] = -float("inf")
            return scores

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= PROMPT.shape[1] + 5, dtype=torch.bool)

    torch.manual_seed(3)
    want = reference.generate(
        PROMPT,
        max_new_tokens=16,
        do_sample=True,
        logits_processor=LogitsProcessorList([Ban()]),
        stopping_criteria=StoppingCriteriaList([StopAfter()]),
    )
    torch.manual_seed(3)
    got = generate_here(
        ours, PROMPT, LogitsProcessorList([Ban()]), StoppingCriteriaList([StopAfter()]), max_new_tokens=16, do_sample=True
    )
    assert torch.equal(got, want) and got.shape[1] == PROMPT.shape[1] + 5


def test_the_checkpoints_generation_config_then_transformers_defaults_then_the_caller(tmp_path):
    model_config = GenerationConfig(eos_token_id=2, pad_token_id=3, temperature=0.6, top_p=0.8)
    config = resolve_generation_config(model_config, do_sample=True, top_p=0.5)
    assert (config.temperature, config.top_p, config.top_k, config.eos_token_id) == (0.6, 0.5, 50, 2)
    given = GenerationConfig(top_k=5)
    config = resolve_generation_config(model_config, given, max_new_tokens=3)
    assert (config.top_k, config.temperature, config.max_new_tokens) == (5, 0.6, 3)
    assert given.max_new_tokens is None  # the caller's config is not changed
    warpers = logits_processors(resolve_generation_config(model_config, do_sample=True, temperature=1.0), prompt_len=4)
    assert [type(w).__name__ for w in warpers] == ["TopKLogitsWarper", "TopPLogitsWarper"]
    with pytest.raises(TypeError, match="unknown arguments.*'top_q'"):
        resolve_generation_config(model_config, top_q=0.9)
    with pytest.raises(ValueError, match="contrastive search"):
        resolve_generation_config(model_config, penalty_alpha=0.6, top_k=4)
    with pytest.raises(ValueError, match="given both"):
        options = resolve_generation_config(model_config, repetition_penalty=1.2)
        logits_processors(options, 4, LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)]))
    with pytest.raises(ValueError, match="need the model's tokenizer"):
        build_criteria(resolve_generation_config(model_config, stop_strings=["\n"]))


def test_a_session_continued_over_calls_sees_its_earlier_tokens(ours, reference):
    """no_repeat_ngram_size over two generate() calls of one session equals one call of both lengths:
    the processors see every token the session holds, not only the second call's."""
    span, local, model_config = ours
    want = reference.generate(PROMPT[:1], max_new_tokens=20, no_repeat_ngram_size=2)
    config = resolve_generation_config(model_config, no_repeat_ngram_size=2)
    session = LocalSession(span, 64)
    parts = [PROMPT[:1]]
    for input_ids in (PROMPT[:1], None):
        parts.append(
            generate_tokens(
                session,
                local.embed,
                local.logits,
                input_ids,
                pad_lens=None,
                max_new_tokens=10,
                chooser=lambda prompt_len: TokenChooser(logits_processors(config, prompt_len)),
                eos_token_ids=eos_ids(config),
                pad_token_id=config.pad_token_id,
            )
        )
    assert torch.equal(torch.cat(parts, dim=1), want)


BEAM_OPTIONS = [
    dict(num_beams=4),
    dict(num_beams=4, length_penalty=0.5),
    dict(num_beams=3, early_stopping=True, num_return_sequences=2),
    dict(num_beams=4, no_repeat_ngram_size=2),
    dict(num_beams=2, early_stopping="never", length_penalty=1.5),
    dict(num_beams=3, do_sample=True, top_k=20),  # beam sampling: draws without replacement
]


@pytest.mark.parametrize("options", BEAM_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_beam_search_chooses_what_transformers_chooses(ours, reference, options):
    """BeamSearch driven over transformers' own model: each step's rows are the previous rows in the
    order hypo_ids gives (what the servers do to their KV pages), run whole (no cache)."""
    from transformers import GenerationMixin

    from petals_like.client.beam_search import BeamSearch

    if options.get("do_sample") and ".sort(" not in inspect.getsource(GenerationMixin._get_top_k_continuations):
        # transformers 5.0 kept beam samples in draw order; later versions sort them, as BeamSearch does
        pytest.skip("this transformers does not sort beam samples by score")
    _, _, model_config = ours
    torch.manual_seed(5)
    want = reference.generate(PROMPT, max_new_tokens=12, **options)
    config = resolve_generation_config(model_config, max_new_tokens=12, **options)
    search = BeamSearch(
        PROMPT,
        num_beams=config.num_beams,
        max_new_tokens=12,
        eos_token_ids=eos_ids(config),
        pad_token_id=config.pad_token_id,
        processors=logits_processors(config, PROMPT.shape[1]),
        length_penalty=config.length_penalty,
        early_stopping=config.early_stopping,
        do_sample=bool(config.do_sample),
        num_return_sequences=config.num_return_sequences,
    )
    torch.manual_seed(5)
    rows = None
    with torch.no_grad():
        while search.running:
            tokens, _, hypo = search.next_inputs()
            rows = tokens if rows is None else torch.cat([rows[hypo], tokens], dim=1)
            search.accept(reference(rows).logits[:, -1])
    got, _ = search.result()
    assert torch.equal(got, want), (got, want)

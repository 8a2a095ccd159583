"""Speculative greedy generation (client/speculative.py) through a real 3-server swarm: the tokens equal
transformers' greedy generation with every kind of draft, right, wrong or partly right."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_like import AutoDistributedModelForCausalLM
from petals_like.client.speculative import Speculation, first_of, model_drafter, ngram_drafter
from petals_like.models.tiny import make_tiny_model
from tests.swarm import Swarm, running_swarm

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 250, 17, 42, 99, 7]])  # repeats itself: the n-gram drafter has material
NEW = 40


@pytest.fixture(scope="module")
def swarm(tiny_model: Path) -> Iterator[Swarm]:
    with running_swarm(tiny_model, ("0:3", "3:5", "5:8")) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def model(swarm: Swarm, tiny_model: Path):
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.peers, torch_dtype="float32")
    yield model
    model.shutdown()


@pytest.fixture(scope="module")
def expected(reference) -> torch.Tensor:
    return reference.generate(PROMPT, max_new_tokens=NEW, do_sample=False)


def test_drafts_that_are_always_right_take_a_trip_per_several_tokens(model, expected):
    truth = expected[0].tolist()
    right = Speculation(lambda sequence, k: truth[len(sequence) : len(sequence) + k])
    assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW, speculative=right), expected)
    assert right.tokens == NEW and right.accepted == right.drafted > 0
    assert right.steps < NEW / 3  # k grows to 8 while every draft is right


def test_drafts_that_are_always_wrong_change_nothing(model, expected):
    truth = expected[0].tolist()
    wrong = Speculation(lambda sequence, k: [(t + 1) % 300 for t in truth[len(sequence) : len(sequence) + k]])
    assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW, speculative=wrong), expected)
    assert wrong.accepted == 0 and wrong.drafted >= NEW - 1 and wrong.steps == NEW


def test_ngram_and_model_drafts_equal_plain_greedy(model, expected, tiny_model: Path, tmp_path_factory):
    ngram = Speculation(ngram_drafter())
    assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW, speculative=ngram), expected)
    assert ngram.drafted > 0
    # a draft model sharing the tokenizer but not the weights: its guesses are partly wrong
    other = make_tiny_model(tmp_path_factory.mktemp("draft") / "tiny-llama", family="llama", preset="tiny", seed=1)
    draft_model = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).eval()
    draft = Speculation(model_drafter(draft_model))
    assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW, speculative=draft), expected)
    assert draft.drafted > 0 and draft.tokens == NEW
    both = Speculation(first_of(ngram_drafter(), model_drafter(draft_model)))
    assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW, speculative=both), expected)
    assert both.drafted >= NEW // 2  # the model fills in wherever the n-gram lookup has nothing


def test_a_session_continues_exactly_after_speculative_calls(model, expected):
    """Rolled-back drafts leave the session where plain generation would: the next call, speculative or
    not, continues the same sequence."""
    truth = expected[0].tolist()
    half = Speculation(lambda sequence, k: truth[len(sequence) : len(sequence) + k // 2] + [3] * (k - k // 2))
    with model.inference_session(max_length=PROMPT.shape[1] + NEW) as session:
        first = model.generate(PROMPT, max_new_tokens=15, session=session, speculative=half)
        second = model.generate(None, max_new_tokens=10, session=session)
        third = model.generate(None, max_new_tokens=NEW - 25, session=session, speculative="ngram")
        assert session.position == PROMPT.shape[1] + NEW - 1  # the last token is sent by a next call
    assert torch.equal(torch.cat([first, second, third], dim=1), expected)
    assert 0 < half.accepted < half.drafted


def test_sampled_tokens_keep_the_target_distribution(model, reference):
    """With a draft for the first new token (the second most likely one, so it is both kept and
    rejected often), the first token over many seeded draws follows the model's top-5 distribution:
    a chi-square test at significance 0.001."""
    with torch.no_grad():
        logits = reference(PROMPT).logits[0, -1].float()
    top = torch.topk(logits, 5)
    expected = torch.softmax(top.values, dim=-1)  # top_k=5 keeps these five, renormalized
    draft = int(top.indices[1])
    speculation = Speculation(lambda sequence, k: [draft] * k)
    draws = 400
    counts = torch.zeros(5)
    for seed in range(draws):
        out = model.generate(
            PROMPT, max_new_tokens=2, do_sample=True, top_k=5, temperature=1.0,
            generator=torch.Generator().manual_seed(seed), speculative=speculation,
        )  # fmt: skip
        counts[(top.indices == out[0, PROMPT.shape[1]]).nonzero()[0, 0]] += 1
    assert counts.sum() == draws and 0 < speculation.accepted < speculation.drafted
    statistic = float(((counts - draws * expected) ** 2 / (draws * expected)).sum())
    p_value = float(torch.special.gammaincc(torch.tensor(2.0), torch.tensor(statistic / 2)))  # chi-square, 4 df
    assert p_value > 1e-3, (counts.tolist(), (draws * expected).tolist(), p_value)


def test_what_speculation_does_not_do_is_refused(model):
    with pytest.raises(ValueError, match="one sequence at a time"):
        model.generate(PROMPT.repeat(2, 1), max_new_tokens=4, speculative="ngram")
    with pytest.raises(ValueError, match="speculative must be 'ngram'"):
        model.generate(PROMPT, max_new_tokens=4, speculative="medusa")


def test_the_model_drafter_drafts_what_the_draft_model_generates(tiny_model: Path, reference):
    """The drafter keeps its KV cache between calls and crops it where the sequence changed (rejected
    drafts, a new sequence): its drafts stay the model's greedy continuation, as generate() gives it."""
    drafter = model_drafter(reference)

    def greedy(sequence: torch.Tensor, k: int) -> list[int]:
        out = reference.generate(
            sequence[None],
            attention_mask=torch.ones(1, sequence.numel(), dtype=torch.long),
            max_new_tokens=k,
            min_new_tokens=k,
            do_sample=False,
            eos_token_id=None,
        )
        return out[0, sequence.numel() :].tolist()

    sequence = PROMPT[0]
    for k in (4, 1, 6, 3):
        drafts = drafter(sequence, k)
        assert drafts == greedy(sequence, k)
        # the chain keeps the first half of the drafts and its own different token after them
        kept = drafts[: k // 2]
        sequence = torch.cat([sequence, torch.tensor(kept + [(drafts[len(kept)] + 1) % 300])])
    other = torch.randint(4, 300, (9,), generator=torch.Generator().manual_seed(5))  # shares nothing
    assert drafter(other, 5) == greedy(other, 5)
    assert drafter(other[:4], 2) == greedy(other[:4], 2)  # a shorter sequence: the cache is cut back

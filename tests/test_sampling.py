"""The client's sampling (SamplingParams.choose) against transformers' logits warpers: for the same
logits, the tokens that can be drawn and their probabilities equal those of TemperatureLogitsWarper,
TopKLogitsWarper and TopPLogitsWarper applied in generate()'s order (temperature, top-k, top-p)."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from petals_like.client.generation import SamplingParams


def transformers_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """The distribution transformers' generate() samples from (its _get_logits_processor, sampling part)."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    input_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return warpers(input_ids, logits.clone()).softmax(dim=-1)


def client_probs(params: SamplingParams, logits: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The distribution choose() hands to torch.multinomial (recorded on its way through)."""
    seen: list[torch.Tensor] = []
    multinomial = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.clone())
        return multinomial(probs, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "multinomial", spy)
        params.choose(logits.clone())
    assert len(seen) == 1
    return seen[0]


CASES = [
    # temperature, top_k, top_p
    (1.0, None, None),
    (0.7, None, None),
    (1.0, 5, None),
    (1.0, 1, None),
    (1.0, 1000, None),  # more than the vocabulary: keeps everything
    (1.0, None, 0.9),
    (1.0, None, 0.05),  # below the largest probability: keeps the top token only
    (1.0, None, 1.0),  # a no-op
    (0.8, 5, 0.9),  # test_swarm's settings
    (1.5, 20, 0.5),
    (0.3, 50, 0.95),
]


@pytest.mark.parametrize("temperature,top_k,top_p", CASES)
def test_choose_samples_from_the_distribution_of_transformers_warpers(temperature, top_k, top_p, monkeypatch):
    logits = torch.randn(16, 200, generator=torch.Generator().manual_seed(0)) * 3
    expected = transformers_probs(logits, temperature, top_k, top_p)
    actual = client_probs(SamplingParams(True, temperature, top_k, top_p), logits, monkeypatch)
    assert torch.equal(actual > 0, expected > 0)  # the same tokens can be drawn
    assert torch.allclose(actual, expected, rtol=1e-6, atol=1e-7)
    kept = (actual > 0).sum(dim=-1)
    if top_k is not None and top_p is None:
        assert (kept == min(top_k, logits.shape[-1])).all()  # no ties in random logits
    if top_p is not None and top_p < 1:  # top-p did cut something the other warpers kept
        assert (kept < (transformers_probs(logits, temperature, top_k, None) > 0).sum(dim=-1)).any()


def test_ties_at_the_top_k_boundary_are_kept_like_transformers(monkeypatch):
    logits = torch.tensor([[4.0, 3.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    expected = transformers_probs(logits, 1.0, 3, None)
    actual = client_probs(SamplingParams(True, top_k=3), logits, monkeypatch)
    assert (actual > 0).tolist() == [[True, True, True, True, True, False, False]]
    assert torch.allclose(actual, expected)


def test_top_p_keeps_the_smallest_set_reaching_it_like_transformers(monkeypatch):
    """Probabilities 0.5, 0.25, 0.15, 0.1: top_p 0.7 needs the first two tokens, 0.8 the first three;
    0.5 and 0.75 land exactly on a sum (the set reaching top_p is kept, nothing more)."""
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()
    for top_p, kept in ((0.4, 1), (0.5, 1), (0.7, 2), (0.75, 2), (0.8, 3), (0.95, 4)):
        expected = transformers_probs(logits, 1.0, None, top_p)
        actual = client_probs(SamplingParams(True, top_p=top_p), logits, monkeypatch)
        assert (actual > 0).tolist() == (expected > 0).tolist() == [[True] * kept + [False] * (4 - kept)], top_p
        assert torch.allclose(actual, expected), top_p


def test_ties_at_the_top_p_boundary_keep_as_many_tokens_as_transformers(monkeypatch):
    """0.5, 0.25, 0.125, 0.125 with top_p 0.8: three tokens, one of the two tied ones. Which one is
    the sort's choice and differs between the two implementations, so only the values are compared."""
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    expected = transformers_probs(logits, 1.0, None, 0.8)
    actual = client_probs(SamplingParams(True, top_p=0.8), logits, monkeypatch)
    assert int((actual > 0).sum()) == int((expected > 0).sum()) == 3
    assert torch.allclose(actual.sort().values, expected.sort().values)


def test_seeded_draws_equal_multinomial_over_transformers_distribution():
    """With the same generator seed, choose() draws exactly the tokens torch.multinomial draws from
    transformers' distribution, and only tokens inside its top-k / top-p set."""
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)) * 2
    expected_probs = transformers_probs(logits, 0.8, 5, 0.9)
    for seed in range(20):
        params = SamplingParams(True, 0.8, 5, 0.9, generator=torch.Generator().manual_seed(seed))
        tokens = params.choose(logits.clone())
        reference = torch.multinomial(expected_probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
        assert torch.equal(tokens, reference)
        assert (expected_probs.gather(1, tokens[:, None]) > 0).all()


def test_greedy_ignores_the_warpers_and_takes_the_argmax():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(False, temperature=0.5, top_k=3, top_p=0.5)
    assert torch.equal(params.choose(logits), logits.argmax(dim=-1))

"""End to end on real local swarms: distributed results equal local transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from petals_like.dht.records import default_dht_prefix
from tests.swarm import Swarm, loss_and_input_grads, start_swarm

NUM_BLOCKS = 8


@pytest.fixture(scope="module", params=[("0:3", "3:5", "5:8"), ("0:4", "4:8")], ids=["3-servers", "2-servers"])
def swarm(request, tiny_model: Path) -> Iterator[Swarm]:
    swarm = start_swarm(tiny_model, request.param)
    try:
        swarm.wait_for_blocks(default_dht_prefix(tiny_model), NUM_BLOCKS)
        yield swarm
    finally:
        swarm.shutdown()


def test_greedy_generation_equals_transformers(model, reference):
    input_ids = torch.tensor([[1, 17, 42, 99, 7, 250]])
    expected = reference.generate(input_ids, max_new_tokens=64, do_sample=False)
    actual = model.generate(input_ids, max_new_tokens=64)
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected)


def test_batch_with_left_padding_equals_transformers(model, reference):
    pad = reference.generation_config.pad_token_id
    input_ids = torch.tensor([[pad, pad, pad, 1, 33, 80], [1, 12, 230, 5, 61, 9]])
    attention_mask = (input_ids != pad).long()
    expected = reference.generate(input_ids, attention_mask=attention_mask, max_new_tokens=64, do_sample=False)
    actual = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=64)
    assert torch.equal(actual, expected)


def test_session_continued_over_three_calls(model, reference):
    input_ids = torch.tensor([[1, 5, 200, 14]])
    expected = reference.generate(input_ids, max_new_tokens=30, do_sample=False)
    with model.inference_session(max_length=64) as session:
        first = model.generate(input_ids, max_new_tokens=10, session=session)
        second = model.generate(None, max_new_tokens=10, session=session)
        third = model.generate(None, max_new_tokens=10, session=session)
    assert torch.equal(torch.cat([first, second, third], dim=1), expected)


def test_session_accepts_new_input_between_calls(model, reference):
    """A chat-like turn: generate, append user tokens, generate again, all in one server-side cache."""
    prompt, turn = torch.tensor([[1, 9, 8, 7]]), torch.tensor([[40, 41]])
    with model.inference_session(max_length=64) as session:
        first = model.generate(prompt, max_new_tokens=5, session=session)
        second = model.generate(turn, max_new_tokens=5, session=session)
    full_prefix = torch.cat([first, turn], dim=1)
    expected = reference.generate(full_prefix, max_new_tokens=5, do_sample=False)
    assert torch.equal(second, expected[:, first.shape[1] :])


def test_sampling_draws_what_transformers_warpers_allow_and_is_reproducible(model, reference):
    """Seeded sampling through the swarm equals a local loop over the reference model's logits that
    applies transformers' temperature, top-k and top-p warpers and draws with the same generator
    (tests/test_sampling.py compares the distributions themselves)."""
    input_ids = torch.tensor([[1, 2, 3]])
    settings = dict(temperature=0.8, top_k=5, top_p=0.9)
    runs = [
        model.generate(input_ids, max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(0), **settings)
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])

    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(5), TopPLogitsWarper(0.9)])
    generator, expected = torch.Generator().manual_seed(0), input_ids
    with torch.no_grad():
        for _ in range(8):
            probs = warpers(expected, reference(expected).logits[:, -1]).softmax(dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)
            expected = torch.cat([expected, token], dim=1)
    assert torch.equal(runs[0], expected)


def test_loss_and_gradients_equal_local_autograd(model, reference):
    torch.manual_seed(0)
    input_ids = torch.randint(3, 300, (2, 12))
    labels = input_ids.clone()
    labels[0, :3] = -100

    out, grad, ref, ref_grad = loss_and_input_grads(model, reference, input_ids, labels)
    assert torch.allclose(out.logits, ref.logits, atol=1e-4)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-4 * abs(ref.loss.item())
    rel = (grad - ref_grad).norm() / ref_grad.norm()
    assert rel <= 1e-4, f"relative gradient error {rel:.2e}"


def test_forward_with_left_padding_matches_transformers(model, reference):
    input_ids = torch.tensor([[0, 0, 1, 50, 60], [1, 70, 80, 90, 100]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        actual = model(input_ids, attention_mask=attention_mask).logits
        expected = reference(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    real = attention_mask.bool()
    assert torch.allclose(actual[real], expected[real], atol=1e-4)


def test_eos_stops_generation_like_transformers(model, reference):
    input_ids = torch.tensor([[1, 17, 42, 99], [1, 3, 3, 3]])
    attention_mask = torch.ones_like(input_ids)
    free_run = reference.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    eos = int(free_run[0, input_ids.shape[1] + 3])  # a token the first sequence produces early
    expected = reference.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    actual = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(actual, expected)


def test_max_length_counts_the_prompt(model):
    assert model.generate(torch.tensor([[1, 2, 3, 4, 5]]), max_length=9).shape == (1, 9)


def test_large_batch_is_streamed_in_parts(model, reference):
    """64 x 160 tokens of hidden states (2.6 MB) exceed one P2P part: forward and prefill go in parts."""
    torch.manual_seed(1)
    input_ids = torch.randint(3, 300, (64, 160))
    with torch.no_grad():
        expected = reference(input_ids).logits[:, -1]
        actual = model(input_ids).logits[:, -1]
        assert torch.allclose(actual, expected, atol=1e-4)
        with model.inference_session(max_length=161) as session:
            hidden = session.step(model.local.embed(input_ids))
        assert torch.allclose(model.local.logits(hidden[:, -1]), expected, atol=1e-4)

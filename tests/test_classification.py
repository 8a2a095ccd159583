"""DistributedModelForSequenceClassification on a real swarm, against transformers' *ForSequenceClassification
loaded from the same checkpoint with the same score weights: pooled logits, losses, gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch

from petals_like.client.classification import (
    AutoDistributedModelForSequenceClassification,
    DistributedModelForSequenceClassification,
)
from petals_like.dht.records import default_dht_prefix
from petals_like.models.tiny import PAD_ID
from tests.swarm import Swarm, running_swarm

NUM_BLOCKS = 8
ATOL = 1e-4


@pytest.fixture(scope="module")
def swarm(tiny_model: Path) -> Iterator[Swarm]:
    with running_swarm(tiny_model, ["0:4", "4:8"]) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def classifier(swarm: Swarm, tiny_model: Path) -> Iterator[DistributedModelForSequenceClassification]:
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        tiny_model, initial_peers=swarm.peers, torch_dtype="float32", num_labels=3
    )
    yield model
    model.shutdown()


def oracle(path: Path, model: DistributedModelForSequenceClassification, **kwargs):
    """transformers' classifier of the same checkpoint, float32, with the model's score weights copied in."""
    from transformers import AutoModelForSequenceClassification

    reference = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32, num_labels=model.num_labels, **kwargs
    ).eval()
    with torch.no_grad():
        reference.score.weight.copy_(model.score.weight)
    return reference


@pytest.fixture(scope="module")
def reference(tiny_model: Path, classifier):
    return oracle(tiny_model, classifier)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows: no padding, left padding, right padding (pad tokens are PAD_ID)."""
    input_ids = torch.tensor(
        [
            [1, 40, 41, 42, 43, 44, 45],
            [PAD_ID, PAD_ID, PAD_ID, 1, 50, 60, 70],
            [1, 80, 90, 100, PAD_ID, PAD_ID, PAD_ID],
        ]
    )
    return input_ids, (input_ids != PAD_ID).long()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """The positions the swarm gives left-padded rows (real tokens from 0), as generate() does."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def zero_grads(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.zero_grad(set_to_none=True)


def test_head_and_defaults(classifier, tiny_model):
    assert classifier.config.pad_token_id == PAD_ID
    assert classifier.num_labels == classifier.config.num_labels == 3
    assert classifier.score.weight.shape == (3, 64) and classifier.score.bias is None
    assert classifier.score.weight.dtype == torch.float32
    assert classifier.trainable_parameters() == [classifier.score.weight]  # embeddings and norm frozen
    assert classifier.local.lm_head is None  # an untied LM head is not kept


def test_logits_without_padding_equal_transformers(classifier, reference):
    input_ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = classifier(input_ids).logits
        want = reference(input_ids).logits
        from_embeds = classifier(inputs_embeds=classifier.local.embed(input_ids)).logits  # pools the last position
    assert got.shape == (2, 3)
    assert torch.allclose(from_embeds, want, atol=ATOL)
    assert torch.allclose(got, want, atol=ATOL), (got - want).abs().max()


def test_logits_pool_the_last_non_pad_token_like_transformers(classifier, reference):
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        got = classifier(input_ids, attention_mask=attention_mask).logits
        want = reference(input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits
        # without a mask: causal attention makes right padding harmless; the pad rule still pools each row
        got_right = classifier(input_ids[[0, 2]]).logits
        want_right = reference(input_ids[[0, 2]]).logits
    assert torch.allclose(got, want, atol=ATOL), (got - want).abs().max()
    assert torch.allclose(got_right, want_right, atol=ATOL), (got_right - want_right).abs().max()
    assert not torch.allclose(got[1], got[2], atol=ATOL)  # different rows, different logits


def test_one_training_step_gives_transformers_gradients(classifier, reference):
    input_ids, attention_mask = padded_batch()
    labels = torch.tensor([0, 2, 1])
    zero_grads(classifier, reference)
    out = classifier(input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    ref = reference(input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), labels=labels)
    ref.loss.backward()
    assert classifier.config.problem_type == reference.config.problem_type == "single_label_classification"
    assert abs(out.loss.item() - ref.loss.item()) <= ATOL
    assert torch.allclose(classifier.score.weight.grad, reference.score.weight.grad, atol=ATOL)
    assert classifier.local.embed_tokens.weight.grad is None  # frozen

    optimizer = torch.optim.SGD(classifier.trainable_parameters(), lr=0.1)
    before = classifier.score.weight.detach().clone()
    optimizer.step()
    assert torch.allclose(classifier.score.weight, before - 0.1 * reference.score.weight.grad, atol=ATOL)
    with torch.no_grad():
        classifier.score.weight.copy_(before)
    zero_grads(classifier, reference)


def test_trainable_embeddings_and_norm_get_transformers_gradients(classifier, reference):
    input_ids, attention_mask = padded_batch()
    labels = torch.tensor([1, 0, 2])
    zero_grads(classifier, reference)
    classifier.local.requires_grad_(True)
    try:
        out = classifier(input_ids, attention_mask=attention_mask, labels=labels)
        out.loss.backward()
    finally:
        classifier.local.requires_grad_(False)
    ref = reference(input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), labels=labels)
    ref.loss.backward()
    pairs = [
        (classifier.score.weight.grad, reference.score.weight.grad),
        (classifier.local.embed_tokens.weight.grad, reference.model.embed_tokens.weight.grad),
        (classifier.local.norm.weight.grad, reference.model.norm.weight.grad),
    ]
    for got, want in pairs:
        rel = (got - want).norm() / want.norm()
        assert rel <= ATOL, f"relative gradient error {rel:.2e}"
    assert not classifier.local.embed_tokens.weight.grad[PAD_ID].any()  # padding_idx, as in transformers
    zero_grads(classifier, reference)


def test_regression_with_one_label(swarm, tiny_model, classifier):
    model = DistributedModelForSequenceClassification.from_pretrained(
        tiny_model, torch_dtype="float32", num_labels=1, dht=classifier.node
    )
    try:
        reference = oracle(tiny_model, model)
        input_ids, attention_mask = padded_batch()
        labels = torch.tensor([0.5, -1.0, 2.0])
        out = model(input_ids, attention_mask=attention_mask, labels=labels)
        out.loss.backward()
        ref = reference(input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), labels=labels)
        ref.loss.backward()
        assert out.logits.shape == (3, 1)
        assert model.config.problem_type == reference.config.problem_type == "regression"
        assert abs(out.loss.item() - ref.loss.item()) <= ATOL * max(1.0, abs(ref.loss.item()))
        assert torch.allclose(model.score.weight.grad, reference.score.weight.grad, atol=ATOL)
    finally:
        model.shutdown()


def test_multi_label_loss(swarm, tiny_model, classifier):
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        tiny_model,
        torch_dtype="float32",
        num_labels=3,
        problem_type="multi_label_classification",
        dht=classifier.node,
    )
    try:
        reference = oracle(tiny_model, model, problem_type="multi_label_classification")
        input_ids, attention_mask = padded_batch()
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
        with torch.no_grad():
            out = model(input_ids, attention_mask=attention_mask, labels=labels)
            ref = reference(input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), labels=labels)
        assert abs(out.loss.item() - ref.loss.item()) <= ATOL
    finally:
        model.shutdown()


def test_score_is_loaded_from_a_classification_checkpoint(swarm, tiny_model, classifier, tmp_path):
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(tiny_model, dtype=torch.float32, num_labels=4)
    with torch.no_grad():
        saved.score.weight.normal_(generator=torch.Generator().manual_seed(1))
    saved.save_pretrained(tmp_path / "clf")
    prefix = default_dht_prefix(tiny_model)  # the blocks the swarm serves are the same
    model = DistributedModelForSequenceClassification.from_pretrained(
        tmp_path / "clf", torch_dtype="float32", dht=classifier.node, dht_prefix=prefix
    )
    try:
        assert model.num_labels == 4  # from the checkpoint's config
        assert torch.equal(model.score.weight, saved.score.weight)
        input_ids = torch.tensor([[1, 30, 31, 32, PAD_ID]])
        with torch.no_grad():
            assert torch.allclose(model(input_ids).logits, saved(input_ids).logits, atol=ATOL)
    finally:
        model.shutdown()
    with pytest.raises(ValueError, match="score.weight .* has shape"):
        DistributedModelForSequenceClassification.from_pretrained(
            tmp_path / "clf", num_labels=2, dht=classifier.node, dht_prefix=prefix
        )


def test_bad_arguments_are_refused(swarm, tiny_model, classifier):
    with pytest.raises(TypeError, match="unknown arguments"):
        AutoDistributedModelForSequenceClassification.from_pretrained(tiny_model, initial_peers=swarm.peers, bogus=1)
    with pytest.raises(ValueError, match="num_labels"):
        AutoDistributedModelForSequenceClassification.from_pretrained(tiny_model, initial_peers=swarm.peers, num_labels=0)
    with pytest.raises(ValueError, match="problem_type"):
        AutoDistributedModelForSequenceClassification.from_pretrained(
            tiny_model, initial_peers=swarm.peers, problem_type="ranking"
        )
    with pytest.raises(ValueError, match="num_labels > 1"):
        AutoDistributedModelForSequenceClassification.from_pretrained(
            tiny_model, dht=classifier.node, num_labels=1, problem_type="single_label_classification"
        )


def test_batches_need_a_pad_token_id(classifier):
    classifier.config.pad_token_id = None
    try:
        with pytest.raises(ValueError, match="needs pad_token_id"):
            classifier(torch.tensor([[1, 5], [1, 6]]))
        assert classifier(torch.tensor([[1, 5, 6]])).logits.shape == (1, 3)  # one row: its last token
    finally:
        classifier.config.pad_token_id = PAD_ID


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_families_equal_transformers(make_model, family):
    path = make_model(family=family, preset="tiny")
    with running_swarm(path, ["0:8"]) as swarm:
        model = AutoDistributedModelForSequenceClassification.from_pretrained(
            path, initial_peers=swarm.peers, torch_dtype="float32", num_labels=2
        )
        try:
            reference = oracle(path, model)
            input_ids, attention_mask = padded_batch()
            with torch.no_grad():
                got = model(input_ids, attention_mask=attention_mask).logits
                want = reference(input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits
            assert torch.allclose(got, want, atol=ATOL), (got - want).abs().max()
        finally:
            model.shutdown()


def test_prompt_tuning_trains_the_prompts_and_the_head(tiny_model, classifier):
    model = DistributedModelForSequenceClassification.from_pretrained(
        tiny_model, torch_dtype="float32", num_labels=3, tuning_mode="ptune", pre_seq_len=2, dht=classifier.node
    )
    try:
        assert {id(p) for p in model.trainable_parameters()} == {id(model.prompt_tuning.prompts), id(model.score.weight)}
        input_ids = torch.tensor([[1, 40, 41, 42], [1, 50, PAD_ID, PAD_ID]])  # right padding only with prompts
        out = model(input_ids, attention_mask=(input_ids != PAD_ID).long(), labels=torch.tensor([0, 2]))
        out.loss.backward()
        assert out.logits.shape == (2, 3)
        assert model.prompt_tuning.prompts.grad.abs().sum() > 0 and model.score.weight.grad.abs().sum() > 0
    finally:
        model.shutdown()


def test_bfloat16_head(tiny_model, classifier):
    model = DistributedModelForSequenceClassification.from_pretrained(
        tiny_model, torch_dtype="bfloat16", num_labels=3, dht=classifier.node
    )
    try:
        input_ids, attention_mask = padded_batch()
        out = model(input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 2]))
        out.loss.backward()
        assert model.score.weight.dtype == out.logits.dtype == model.score.weight.grad.dtype == torch.bfloat16
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    finally:
        model.shutdown()

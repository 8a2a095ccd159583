"""The Llama trained on the standard library (models/trained.py): far better than a unigram model on
held-out files, by numbers computed here rather than read from training.json; loadable by
transformers and by this project's own checkpoint code; and built once per folder.

On a machine without the cached model these run on conftest's quick build, which is too short to
write Python reliably; the cached model's greedy output is in docs/trained-model.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import petals_like.models.trained as trained_module
from petals_like.cli.make_tiny_model import main as make_tiny_model_cli
from petals_like.models.checkpoint import CheckpointReader
from petals_like.models.llama.block import LlamaBlock
from petals_like.models.llama.head import LocalModules
from petals_like.models.spec import ModelSpec
from petals_like.models.trained import RECORD_FILE, corpus_files, read_texts, read_training_record, token_stream

pytestmark = pytest.mark.timeout(600)  # the session's first test may wait for the quick build (~2 min, more when loaded)


@pytest.fixture(scope="module")
def reference(trained_model: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(trained_model, dtype=torch.float32).eval()


def validation_windows(trained_model: Path, tokenizer) -> torch.Tensor:
    """The scored tokens training.json names, rebuilt here: the first validation_tokens of the validation
    files, in windows of <s> and seq_len - 1 tokens."""
    record = read_training_record(trained_model)
    stream = token_stream(tokenizer, read_texts(corpus_files()[1]))
    chunks = stream[: record["validation_tokens"]].view(-1, record["seq_len"] - 1)
    return torch.cat([torch.full((len(chunks), 1), tokenizer.bos_token_id), chunks], dim=1)  # [windows, seq_len]


def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Of windows[:, 1:], each token predicted from those before it in its window (<s> is context only)."""
    log_likelihood = 0.0
    with torch.no_grad():
        for batch in windows.split(8):
            log_probs = torch.log_softmax(model(input_ids=batch).logits[:, :-1].double(), dim=-1)
            log_likelihood += log_probs.gather(-1, batch[:, 1:, None]).sum().item()
    return math.exp(-log_likelihood / windows[:, 1:].numel())


def test_validation_perplexity_is_at_most_half_the_unigram_baseline(trained_model: Path, reference) -> None:
    record = read_training_record(trained_model)
    tokenizer = AutoTokenizer.from_pretrained(trained_model)
    windows = validation_windows(trained_model, tokenizer)
    model_perplexity = perplexity(reference, windows)

    train_stream = token_stream(tokenizer, read_texts(corpus_files()[0]))
    counts = torch.bincount(train_stream, minlength=reference.config.vocab_size).double() + 1  # add-one smoothing
    unigram = math.exp(-(counts[windows[:, 1:].reshape(-1)] / counts.sum()).log().mean().item())

    assert model_perplexity <= 0.5 * unigram, (model_perplexity, unigram)
    assert model_perplexity == pytest.approx(record["validation_perplexity"], rel=2e-3)
    assert unigram == pytest.approx(record["unigram_perplexity"], rel=1e-6)


def test_the_model_reads_order_not_only_frequencies(trained_model: Path, reference) -> None:
    """Shuffling the tokens inside each window leaves a unigram model's perplexity as it was; a model
    that has learned how Python is written finds the shuffled text far less likely."""
    windows = validation_windows(trained_model, AutoTokenizer.from_pretrained(trained_model))[:16]
    generator = torch.Generator().manual_seed(0)
    shuffled = windows.clone()
    for row in shuffled:
        row[1:] = row[1:][torch.randperm(len(row) - 1, generator=generator)]
    assert perplexity(reference, shuffled) > 2 * perplexity(reference, windows)  # 1x for a unigram model


def test_the_folder_loads_offline_with_its_tokenizer_and_this_projects_checkpoint_code(trained_model: Path, reference) -> None:
    tokenizer = AutoTokenizer.from_pretrained(trained_model)
    text = "class Stack:\n    def push(self, item):\n        self._items.append(item)\n"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text) / 2  # BPE merges learned from the corpus, not bytes
    assert "assistant:" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )

    config = reference.config
    assert config.num_key_value_heads < config.num_attention_heads and not config.tie_word_embeddings
    spec = ModelSpec.from_pretrained(trained_model)
    reader = CheckpointReader(trained_model)
    assert spec.num_blocks == reader.num_blocks == config.num_hidden_layers
    for index, state_dict in enumerate(reader.load_blocks(0, spec.num_blocks, torch.float32, progress=False)):
        expected = reference.model.layers[index].state_dict()
        assert all(torch.equal(state_dict[key], expected[key]) for key in expected)
        LlamaBlock(spec, index).load_state_dict(state_dict, strict=True)
    local = LocalModules.from_state_dict(spec, reader.client_state_dict(torch.float32))
    assert local.lm_head.weight is not local.embed_tokens.weight
    assert torch.equal(local.lm_head.weight, reference.lm_head.weight)


def test_a_complete_folder_is_returned_without_training(trained_model: Path, monkeypatch, capsys) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(trained_module, "_build", no_training)
    assert trained_module.make_trained_model(trained_model, budget_s=1) == trained_model
    make_tiny_model_cli(["--trained", str(trained_model)])
    out = capsys.readouterr().out
    record = json.loads((trained_model / RECORD_FILE).read_text())
    assert str(trained_model) in out and f"{record['validation_perplexity']:.2f}" in out


def test_folders_it_did_not_make_are_left_alone(tmp_path: Path, monkeypatch, capsys) -> None:
    """Also an interrupted build's folder: without training.json, nothing marks it as ours."""
    monkeypatch.setattr(trained_module, "_build", lambda *args, **kwargs: pytest.fail("started training"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        make_tiny_model_cli(["--trained", str(tmp_path / "mine")])
    assert exit_info.value.code == 2 and "not made by make_trained_model" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget_s", "60"], "required"),
        (["out", "--budget_s", "60"], "--trained only"),
        (["--trained", "out", "--budget_s", "0"], "must be positive"),
        (["--trained", "out", "--preset", "bench"], "random-weight models only"),
    ],
)
def test_bad_flags_are_refused_with_the_reason(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        make_tiny_model_cli(argv)
    assert message in capsys.readouterr().err

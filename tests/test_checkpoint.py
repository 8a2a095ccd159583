"""Checkpoint loading, client-side modules and tiny random checkpoints: fast, offline, no swarm.

transformers' own from_pretrained is the reference: whatever we read must equal its parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

import petals_like.models.checkpoint as checkpoint_module
from petals_like.cli.make_tiny_model import main as make_tiny_model_cli
from petals_like.models.checkpoint import CheckpointReader, resolve_checkpoint
from petals_like.models.llama.block import LlamaBlock
from petals_like.models.llama.head import LocalModules
from petals_like.models.spec import ModelSpec
from petals_like.models.tiny import MARKER_FILE, _make_config, make_tiny_model

MakeModel = Callable[..., Path]


def load_reference(path: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


# ---- CheckpointReader: blocks ----


def test_span_reads_only_its_tensors(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_safe_open = checkpoint_module.safe_open

    def recording_safe_open(file, *args, **kwargs):
        opened.append(Path(file).name)
        return real_safe_open(file, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "safe_open", recording_safe_open)
    reader = CheckpointReader(tiny_model)
    assert reader.num_blocks == 8
    assert len(set(reader.weight_map.values())) > 4, "the fixture should be sharded"
    assert opened == [] and reader.tensors_read == []  # the index alone says where tensors are

    blocks = reader.load_blocks(2, 4, torch.float32, progress=False)

    span_names = {n for n in reader.weight_map if n.startswith(("model.layers.2.", "model.layers.3."))}
    assert len(span_names) == 18  # 9 tensors per Llama block
    assert sorted(reader.tensors_read) == sorted(span_names)
    assert set(opened) <= {reader.weight_map[n] for n in span_names}
    assert len(set(opened)) < len(set(reader.weight_map.values()))

    reference = load_reference(tiny_model)
    spec = ModelSpec.from_pretrained(tiny_model)
    for index, state_dict in zip((2, 3), blocks):
        expected = reference.model.layers[index].state_dict()
        assert state_dict.keys() == expected.keys()
        for key, tensor in state_dict.items():
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor, expected[key]), key
        LlamaBlock(spec, index).load_state_dict(state_dict, strict=True)  # keys are exactly the block's


def test_blocks_are_converted_to_the_requested_dtype(tiny_model: Path) -> None:
    reader = CheckpointReader(tiny_model)
    state_dict = reader.block_state_dict(5, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in state_dict.values())
    assert set(reader.tensors_read) == {f"model.layers.5.{k}" for k in state_dict}


def test_bad_block_indices_are_clear_errors(tiny_model: Path) -> None:
    reader = CheckpointReader(tiny_model)
    with pytest.raises(ValueError, match="no tensors for block 8"):
        reader.block_state_dict(8, torch.float32)
    for start, end in ((-1, 2), (3, 3), (5, 2), (6, 9)):
        with pytest.raises(ValueError, match=f"block range {start}:{end} is not within 0:8"):
            reader.load_blocks(start, end, torch.float32, progress=False)
    assert reader.tensors_read == []


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_families_load_and_match(make_model: MakeModel, family: str) -> None:
    path = make_model(family=family, max_shard_size="100KB")
    spec = ModelSpec.from_pretrained(path)
    reference = load_reference(path)
    state_dict = CheckpointReader(path).block_state_dict(1, torch.float32)
    expected = reference.model.layers[1].state_dict()
    assert state_dict.keys() == expected.keys()
    assert all(torch.equal(state_dict[k], expected[k]) for k in expected)
    LlamaBlock(spec, 1).load_state_dict(state_dict, strict=True)


# ---- CheckpointReader: client side ----


def test_client_state_dict_untied(tiny_model: Path) -> None:
    reader = CheckpointReader(tiny_model)
    state_dict = reader.client_state_dict(torch.float32)
    reference = load_reference(tiny_model)
    assert state_dict["lm_head.weight"] is not state_dict["embed_tokens.weight"]
    assert torch.equal(state_dict["embed_tokens.weight"], reference.model.embed_tokens.weight)
    assert torch.equal(state_dict["norm.weight"], reference.model.norm.weight)
    assert torch.equal(state_dict["lm_head.weight"], reference.lm_head.weight)
    assert sorted(reader.tensors_read) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]


def test_client_state_dict_tied(make_model: MakeModel) -> None:
    path = make_model(tie_word_embeddings=True)
    reader = CheckpointReader(path)
    state_dict = reader.client_state_dict(torch.float32)
    assert state_dict["lm_head.weight"] is state_dict["embed_tokens.weight"]
    assert "lm_head.weight" not in reader.tensors_read
    reference = load_reference(path)
    assert torch.equal(state_dict["lm_head.weight"], reference.lm_head.weight)


def test_unprefixed_single_file_without_lm_head(tiny_model: Path, tmp_path: Path) -> None:
    """A bare-model checkpoint (no "model." prefix, one file, no lm_head) reads the same; the head falls back."""
    tensors = {name.removeprefix("model."): t for name, t in all_tensors(tiny_model).items() if name != "lm_head.weight"}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((tiny_model / "config.json").read_text())
    reader = CheckpointReader(tmp_path)
    assert reader.prefix == "" and reader.num_blocks == 8
    state_dict = reader.client_state_dict(torch.float32)
    assert state_dict["lm_head.weight"] is state_dict["embed_tokens.weight"]
    block = reader.block_state_dict(7, torch.float32)
    assert torch.equal(block["mlp.up_proj.weight"], tensors["layers.7.mlp.up_proj.weight"])


# ---- LocalModules ----


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_local_modules_equal_transformers(make_model: MakeModel, tied: bool) -> None:
    path = make_model(max_shard_size="200KB", tie_word_embeddings=tied)
    spec = ModelSpec.from_pretrained(path)
    local = LocalModules.from_state_dict(spec, CheckpointReader(path).client_state_dict(torch.float32))
    reference = load_reference(path)
    assert (local.lm_head.weight is local.embed_tokens.weight) == tied

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, spec.vocab_size, (2, 7), generator=generator)
    hidden = torch.randn(2, 7, spec.hidden_size, generator=generator) * 3  # [batch, seq, hidden]
    with torch.no_grad():
        torch.testing.assert_close(local.embed(input_ids), reference.model.embed_tokens(input_ids), atol=1e-6, rtol=0)
        expected = reference.lm_head(reference.model.norm(hidden))
        torch.testing.assert_close(local.logits(hidden), expected, atol=1e-6, rtol=0)
        full = reference(input_ids, output_hidden_states=True)
        torch.testing.assert_close(local.logits(full.hidden_states[-1]), full.logits, atol=1e-5, rtol=0)


def test_local_modules_stay_tied_after_dtype_change(make_model: MakeModel) -> None:
    path = make_model(tie_word_embeddings=True)
    spec = ModelSpec.from_pretrained(path)
    local = LocalModules.from_state_dict(spec, CheckpointReader(path).client_state_dict(torch.float32))
    local = local.to(torch.bfloat16)
    assert local.lm_head.weight is local.embed_tokens.weight
    assert local.lm_head.weight.dtype == torch.bfloat16
    logits = local.logits(torch.randn(1, 3, spec.hidden_size))  # float32 hidden from the wire is accepted
    assert logits.shape == (1, 3, spec.vocab_size) and logits.dtype == torch.bfloat16


def test_local_modules_reject_bad_input(tiny_model: Path) -> None:
    spec = ModelSpec.from_pretrained(tiny_model)
    state_dict = CheckpointReader(tiny_model).client_state_dict(torch.float32)
    local = LocalModules.from_state_dict(spec, state_dict)
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 320\)"):
        local.embed(torch.tensor([[1, 320]]))
    with pytest.raises(TypeError, match="integer"):
        local.embed(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="norm.weight has shape"):
        LocalModules.from_state_dict(spec, {**state_dict, "norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="missing"):
        LocalModules.from_state_dict(spec, {"embed_tokens.weight": state_dict["embed_tokens.weight"]})


# ---- tiny checkpoints ----


def test_tiny_llama_config_reads_back(tiny_model: Path) -> None:
    spec = ModelSpec.from_pretrained(tiny_model)
    assert (spec.family, spec.num_blocks, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (
        "llama",
        8,
        64,
        4,
        2,
        16,
    )
    assert (spec.intermediate_size, spec.vocab_size, spec.max_position_embeddings) == (172, 320, 512)
    assert spec.rope_theta == 10000.0
    assert spec.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert (spec.bos_token_id, spec.eos_token_id, spec.pad_token_id) == (1, 2, 3)
    assert not spec.tie_word_embeddings and not spec.qkv_bias and spec.sliding_window is None
    assert spec.torch_dtype == "float32"
    generation_config = json.loads((tiny_model / "generation_config.json").read_text())
    assert (generation_config["bos_token_id"], generation_config["eos_token_id"], generation_config["pad_token_id"]) == (1, 2, 3)


def test_other_families_and_options_read_back(make_model: MakeModel) -> None:
    mistral = ModelSpec.from_pretrained(make_model(family="mistral"))
    assert mistral.family == "mistral" and mistral.rope_scaling is None and mistral.sliding_window == 128
    qwen2 = ModelSpec.from_pretrained(make_model(family="qwen2"))
    assert qwen2.family == "qwen2" and qwen2.qkv_bias and qwen2.rope_theta == 1e6 and qwen2.sliding_window is None
    assert qwen2.pad_token_id == 3
    plain = ModelSpec.from_pretrained(make_model(rope_scaling=None, num_hidden_layers=3))
    assert plain.rope_scaling is None and plain.num_blocks == 3
    linear = ModelSpec.from_pretrained(make_model(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    half = make_model(dtype=torch.bfloat16)
    assert ModelSpec.from_pretrained(half).torch_dtype == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in all_tensors(half).values())


def test_bench_preset_shape() -> None:
    """Checked on the config alone: building ~200M random parameters is for benchmarks, not unit tests."""
    spec = ModelSpec.from_hf_config(_make_config("llama", "bench", False, None, {}))
    assert (spec.num_blocks, spec.hidden_size, spec.num_heads, spec.num_kv_heads) == (16, 1024, 16, 4)
    assert (spec.intermediate_size, spec.vocab_size, spec.max_position_embeddings) == (2816, 32000, 2048)
    per_block = spec.hidden_size * spec.head_dim * (2 * spec.num_heads + 2 * spec.num_kv_heads)
    per_block += 3 * spec.hidden_size * spec.intermediate_size
    total = spec.num_blocks * per_block + 2 * spec.vocab_size * spec.hidden_size
    assert 150e6 < total < 250e6


def test_tokenizer_loads_offline_and_round_trips(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    spec = ModelSpec.from_pretrained(tiny_model)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    assert len(tokenizer) <= spec.vocab_size
    for text in ["Hello, world!", "  leading spaces\n\ttabs", "héllo wörld, 世界 🙂", ""]:
        ids = tokenizer(text).input_ids
        assert ids[0] == spec.bos_token_id
        assert max(ids) < spec.vocab_size
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    batch = tokenizer(["a", "abc"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0].item() == spec.pad_token_id  # left padding, for generation


def test_make_tiny_model_is_deterministic(tmp_path: Path) -> None:
    rng_state = torch.get_rng_state()
    a = all_tensors(make_tiny_model(tmp_path / "a", seed=7))
    b = all_tensors(make_tiny_model(tmp_path / "b", seed=7, max_shard_size="100KB"))
    c = all_tensors(make_tiny_model(tmp_path / "c", seed=8))
    assert torch.equal(torch.get_rng_state(), rng_state), "the caller's RNG must be left alone"
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])


def test_make_tiny_model_is_idempotent(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", seed=1)
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert make_tiny_model(tmp_path / "m", seed=1) == path
    assert weights.stat().st_mtime_ns == stamp  # returned as is, not rebuilt
    with pytest.raises(FileExistsError, match="other arguments.*overwrite=True"):
        make_tiny_model(tmp_path / "m", seed=2)
    make_tiny_model(tmp_path / "m", seed=2, overwrite=True)
    assert json.loads((path / MARKER_FILE).read_text())["seed"] == 2

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not made by make_tiny_model"):
        make_tiny_model(foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*tmp*")), "no staging folder may be left behind"


def test_random_tiny_model_does_not_collapse(tiny_model: Path) -> None:
    """Greedy output varies, so comparisons with transformers exercise every block, not one repeated token."""
    reference = load_reference(tiny_model)
    output = reference.generate(torch.tensor([[1, 17, 42, 99, 7, 250]]), max_new_tokens=32, do_sample=False)
    assert len(set(output[0, 6:].tolist())) >= 8


def test_cli_prints_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_tiny_model_cli([str(tmp_path / "cli"), "--family", "qwen2", "--seed", "3", "--tie_word_embeddings"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    spec = ModelSpec.from_pretrained(tmp_path / "cli")
    assert spec.family == "qwen2" and spec.tie_word_embeddings


# ---- errors and resolving ----


def test_bin_only_folder_is_a_clear_error(tmp_path: Path) -> None:
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only PyTorch \.bin weights \(pytorch_model\.bin\).*safetensors"):
        CheckpointReader(tmp_path)


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CheckpointReader(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        CheckpointReader(tmp_path)
    with pytest.raises(FileNotFoundError, match="'acme/no-such-model' not found.*Hugging Face cache"):
        resolve_checkpoint("acme/no-such-model", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_checkpoint(tmp_path / "nowhere" / "deeper", cache_dir=tmp_path)


def test_resolve_local_folder_and_hub_cache(tiny_model: Path, tmp_path: Path) -> None:
    assert resolve_checkpoint(tiny_model) == tiny_model
    assert resolve_checkpoint(str(tiny_model)) == tiny_model
    # the layout huggingface_hub writes: models--{org}--{name}/refs/main -> snapshots/{commit}/
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "config.json").write_text((tiny_model / "config.json").read_text())
    assert resolve_checkpoint("acme/tiny-llama", cache_dir=tmp_path) == snapshot

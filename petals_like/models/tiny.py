"""Random-weight checkpoints of every supported family (FAMILIES) for tests, demos and benchmarks, made offline.

The folder is a normal Hugging Face checkpoint (config.json, generation_config.json, safetensors
weights, a byte-level tokenizer), so transformers' own `from_pretrained` is the reference that
the swarm is compared against. Weights are drawn with a scale large enough that every block
changes the output: with the usual 0.02 a tiny model's greedy output collapses to repeating one
token, and a bug in block math could go unnoticed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from petals_like.models.spec import SUPPORTED_FAMILIES

logger = logging.getLogger(__name__)

MARKER_FILE = "petals_like_tiny.json"  # the parameters a folder was made with; makes rebuilding idempotent
MARKER_VERSION = 1  # bump when the layout or the weight recipe changes, so stale test caches are rebuilt
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3; byte b is id 4 + b
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
# a plain-text chat format (the tokenizer has no special tokens for roles): "<s>user: hi\n...assistant:"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
FAMILIES = SUPPORTED_FAMILIES  # every family the servers run
# what the mixture-of-experts families add to a preset: 8 experts, top 2 (Mixtral's shape), each expert
# as wide as the dense MLP for Mixtral and narrower for Qwen-MoE; Qwen2-MoE with a shared expert and
# its second block dense (mlp_only_layers), so both kinds of block are served
MOE_CONFIG: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1]),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=172,
        vocab_size=320,
        max_position_embeddings=512,
        initializer_range=0.2,
    ),
    # the per-token overhead anchor (hidden 512 x 8 blocks, GQA): compute is a few ms per token, so
    # what the network path adds shows (bench (t))
    "anchor": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1376,
        vocab_size=32000,
        max_position_embeddings=2048,
        initializer_range=0.05,
    ),
    # ~200M parameters: big enough for throughput numbers to mean something on one GPU
    "bench": dict(
        hidden_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=2816,
        vocab_size=32000,
        max_position_embeddings=2048,
        initializer_range=0.05,
    ),
}
# Llama-3-style scaling with a short original context, so positions < 512 cross all three bands
TINY_LLAMA3_ROPE: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
ROPE_THETA = {
    "llama": 10000.0,
    "mistral": 10000.0,
    "qwen2": 1e6,
    "qwen3": 1e6,
    "mixtral": 1e6,
    "qwen2_moe": 1e6,
    "qwen3_moe": 1e6,
}
TINY_MISTRAL_SLIDING_WINDOW = 128  # shorter than max_position_embeddings, so long tests exercise the window


def make_tiny_model(
    path: str | Path,
    *,
    family: str = "llama",
    preset: str = "tiny",
    seed: int = 0,
    max_shard_size: Optional[str] = None,
    tie_word_embeddings: bool = False,
    rope_scaling: Optional[dict[str, Any]] | str = "preset",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight checkpoint to `path` and return it; deterministic in its arguments.

    rope_scaling: "preset" = Llama-3 scaling for the tiny llama preset, none otherwise; None = plain
    RoPE; a dict = that scaling. config_overrides go to the transformers config (e.g. rope_theta,
    sliding_window, num_hidden_layers). If `path` already holds a model made with the same
    arguments it is returned as is; a folder made with other arguments is rebuilt only with
    overwrite=True, and a folder this function did not make is never deleted.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} not supported (choose from {', '.join(FAMILIES)})")
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} not supported (choose from {', '.join(PRESETS)})")
    if rope_scaling == "preset":
        rope_scaling = dict(TINY_LLAMA3_ROPE) if (family, preset) == ("llama", "tiny") else None
    elif rope_scaling is not None and not isinstance(rope_scaling, dict):
        raise TypeError(f"rope_scaling must be a dict, None or 'preset', got {rope_scaling!r}")

    path = Path(path)
    params = {
        "version": MARKER_VERSION,
        "family": family,
        "preset": preset,
        "seed": seed,
        "max_shard_size": max_shard_size,
        "tie_word_embeddings": tie_word_embeddings,
        "rope_scaling": rope_scaling,
        "dtype": str(dtype).replace("torch.", ""),
        "config_overrides": config_overrides,
    }
    params = json.loads(json.dumps(params, sort_keys=True, default=str))  # the form it takes once stored
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder for a checkpoint")
    if path.exists():
        existing = _read_marker(path)
        if existing == params and not overwrite:
            return path
        if existing is None and any(path.iterdir()):
            raise FileExistsError(f"{path} exists and was not made by make_tiny_model; refusing to write into it")
        if existing is not None and not overwrite:
            differ = {k: (existing.get(k), params[k]) for k in params if existing.get(k) != params[k]}
            raise FileExistsError(
                f"{path} holds a tiny model made with other arguments (stored, asked: {differ}); "
                f"pass overwrite=True to rebuild it"
            )

    # build next to the target and rename: an interrupted build never leaves a folder that looks complete
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        config = _make_config(family, preset, tie_word_embeddings, rope_scaling, config_overrides)
        _save_model(config, staging, seed=seed, dtype=dtype, max_shard_size=max_shard_size)
        _save_tokenizer(
            staging, getattr(config, "max_position_embeddings", PRESETS[preset]["max_position_embeddings"])
        )  # (BLOOM: none)
        (staging / MARKER_FILE).write_text(json.dumps(params, indent=2, sort_keys=True))
        if path.exists():
            shutil.rmtree(path)  # only reached for an empty folder or one of ours with overwrite=True
        try:
            os.replace(staging, path)
        except OSError:
            if _read_marker(path) != params:  # else a concurrent caller (another test worker) made the same model
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"Made a random {family} ({preset}) checkpoint in {path}")
    return path


def _read_marker(path: Path) -> Optional[dict[str, Any]]:
    marker = path / MARKER_FILE
    if not marker.is_file() or not (path / "config.json").is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None


def _make_config(
    family: str, preset: str, tie_word_embeddings: bool, rope_scaling: Optional[dict[str, Any]], overrides: dict[str, Any]
) -> Any:
    from transformers import AutoConfig

    overrides = dict(overrides)
    rope_theta = float(overrides.pop("rope_theta", ROPE_THETA.get(family, 1e6)))  # (Qwen, Mixtral: 1e6)
    if rope_scaling is None:
        rope = {"rope_type": "default", "rope_theta": rope_theta}
    else:
        rope = {k: v for k, v in rope_scaling.items() if k != "type"}
        rope.setdefault("rope_type", rope_scaling.get("type", "default"))
        rope["rope_theta"] = rope_theta  # transformers >= 5 keeps theta inside rope_parameters
    kwargs: dict[str, Any] = dict(PRESETS[preset])
    kwargs.update(
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters=rope,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if family == "mistral":
        kwargs["sliding_window"] = TINY_MISTRAL_SLIDING_WINDOW if preset == "tiny" else None
    if family in ("gemma", "gemma2"):  # (their configs' default head_dim is 256)
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    if family == "gemma2":  # queries scaled by head_dim ** -0.5 as usual; a window short enough to bind in tests
        kwargs["query_pre_attn_scalar"] = kwargs["head_dim"]
        kwargs["sliding_window"] = TINY_MISTRAL_SLIDING_WINDOW if preset == "tiny" else 4096
    if family == "falcon":  # Falcon-40B/180B's layout: grouped KV heads, two norms, parallel attention and MLP
        kwargs.update(
            ffn_hidden_size=kwargs.pop("intermediate_size"),
            num_kv_heads=kwargs.pop("num_key_value_heads"),
            layer_norm_epsilon=kwargs.pop("rms_norm_eps"),
            new_decoder_architecture=True,
        )
    if family == "bloom":  # (no rotary embedding: ALiBi; no KV grouping; a 4x MLP)
        for key in ("num_key_value_heads", "intermediate_size", "rope_parameters", "max_position_embeddings"):
            kwargs.pop(key)
        kwargs.update(n_head=kwargs.pop("num_attention_heads"), n_layer=kwargs.pop("num_hidden_layers"))
        kwargs["layer_norm_epsilon"] = kwargs.pop("rms_norm_eps")
    if family in MOE_CONFIG:
        kwargs.update(MOE_CONFIG[family])
        if family != "mixtral":  # Qwen-MoE experts: narrower than the dense MLP of its dense blocks
            kwargs["moe_intermediate_size"] = kwargs["intermediate_size"] // 32 * 16  # (16-byte rows: grouped_mm)
        if family == "qwen2_moe":
            kwargs["shared_expert_intermediate_size"] = kwargs["intermediate_size"]
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def _save_model(config: Any, folder: Path, *, seed: int, dtype: torch.dtype, max_shard_size: Optional[str]) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    with torch.random.fork_rng(devices=[]):  # seed locally: the caller's RNG stream is left untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).float()
    model = model.to(dtype)  # drawn in float32 then cast: the same seed gives the same weights in any dtype
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    with _quiet_transformers():
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(folder, **kwargs)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' "Writing model shards" bar; restore the caller's setting after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _byte_to_char() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's), which tokenizers' ByteLevel expects.

    Printable Latin-1 bytes stand for themselves; the rest are shifted past 255 in order, so no
    token is whitespace or a control character.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def _save_tokenizer(folder: Path, max_length: int) -> None:
    """A byte-level tokenizer (4 special tokens + 256 bytes, no merges): any text round-trips exactly."""
    from tokenizers import Tokenizer, models

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: len(SPECIAL_TOKENS) + byte for byte, char in _byte_to_char().items()})
    save_byte_level_tokenizer(Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")), folder, max_length)


def save_byte_level_tokenizer(tokenizer: Any, folder: Path, max_length: int) -> None:
    """Save a `tokenizers` BPE over byte-level characters, with SPECIAL_TOKENS as ids 0..3, as a
    PreTrainedTokenizerFast with this project's conventions: <s> prepended, left padding, CHAT_TEMPLATE.

    Shared by the random-weight models and the trained one (models/trained.py), so both load with
    `AutoTokenizer.from_pretrained(folder)` offline and format chats the same way.
    """
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # prepend <s> like Llama tokenizers do, so prompts look like those the model family expects
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",  # decoder-only batches are left-padded so every row ends at its last token
        model_max_length=max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)

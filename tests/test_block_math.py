"""Block math against transformers: tiny random models of each family, no network.

The reference is transformers' own forward (eager attention); our span is built from the same
layer state dicts, so any difference is a difference in the math.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import Tensor
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from petals_like.models.attention import RotaryEmbedding, make_attention_context
from petals_like.models.checkpoint import CheckpointReader
from petals_like.models.llama.block import LlamaBlock
from petals_like.models.span import BlockSpan
from petals_like.models.spec import ModelSpec
from petals_like.server.batched_span import PagedRunner

ATOL = 1e-4
VOCAB = 128
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    attn_implementation="eager",
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _llama() -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, **COMMON))


def _llama3_rope() -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, rope_parameters=LLAMA3_ROPE, **COMMON))


def _mistral() -> PreTrainedModel:
    # head_dim 32 != hidden / heads, and a window shorter than the test sequences
    return MistralForCausalLM(MistralConfig(num_hidden_layers=4, sliding_window=5, head_dim=32, **COMMON))


def _qwen2() -> PreTrainedModel:
    rope = {"rope_type": "default", "rope_theta": 1e6}
    return Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=3, rope_parameters=rope, **COMMON))


def _qwen3() -> PreTrainedModel:
    return Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=3, head_dim=24, **COMMON))  # q/k norms over head_dim


def _phi3() -> PreTrainedModel:
    return Phi3ForCausalLM(Phi3Config(num_hidden_layers=3, pad_token_id=0, **COMMON))  # fused qkv / gate_up weights


def _gemma() -> PreTrainedModel:
    # (1 + weight) norms, GeGLU, embeddings scaled by sqrt(hidden) on the client
    return GemmaForCausalLM(GemmaConfig(num_hidden_layers=3, head_dim=16, **COMMON))


def _gemma2() -> PreTrainedModel:
    # four norms per block, soft-capped attention (a low cap, so it binds) and logits, a query scale that
    # is not head_dim's, a window of 5 on blocks 0 and 2 only
    config = Gemma2Config(
        num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, sliding_window=5, **COMMON,
    )  # fmt: skip
    return Gemma2ForCausalLM(config)


FALCON = {k: v for k, v in COMMON.items() if k not in ("intermediate_size", "num_key_value_heads", "rms_norm_eps")}


def _falcon_grouped() -> PreTrainedModel:
    # the new decoder architecture (Falcon-40B/180B): q/k/v grouped per KV head, ln_attn and ln_mlp, biases
    config = FalconConfig(
        num_hidden_layers=3, new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=96, bias=True, **FALCON
    )
    return FalconForCausalLM(config)


def _falcon_multi_query() -> PreTrainedModel:
    # Falcon-7B's: one KV head, one norm for the parallel attention and MLP
    return FalconForCausalLM(FalconConfig(num_hidden_layers=3, multi_query=True, ffn_hidden_size=96, **FALCON))


def _falcon_sequential() -> PreTrainedModel:
    # per-head q/k/v, attention then MLP (parallel_attn=False: two norms, one after the other)
    config = FalconConfig(num_hidden_layers=3, multi_query=False, parallel_attn=False, ffn_hidden_size=96, **FALCON)
    return FalconForCausalLM(config)


def _bloom() -> PreTrainedModel:
    # ALiBi instead of rotations (6 heads: slopes of a power of two and beyond), per-head q/k/v, LayerNorms
    config = BloomConfig(n_layer=3, n_head=6, hidden_size=96, vocab_size=VOCAB, attn_implementation="eager")
    return BloomForCausalLM(config)


# mixtures of experts: 6 experts, top 2, so a batch of tokens leaves some experts idle and shares others
def _mixtral() -> PreTrainedModel:
    return MixtralForCausalLM(MixtralConfig(num_hidden_layers=3, num_local_experts=6, num_experts_per_tok=2, **COMMON))


def _qwen2_moe() -> PreTrainedModel:
    # a shared expert, top-k probabilities not renormalized, and block 1 dense (mlp_only_layers)
    config = Qwen2MoeConfig(
        num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48,
        shared_expert_intermediate_size=80, mlp_only_layers=[1], norm_topk_prob=False, **COMMON,
    )  # fmt: skip
    return Qwen2MoeForCausalLM(config)


def _qwen3_moe() -> PreTrainedModel:
    config = Qwen3MoeConfig(
        num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True, **COMMON
    )
    return Qwen3MoeForCausalLM(config)


FAMILIES: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": _llama,
    "llama3_rope": _llama3_rope,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "phi3": _phi3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "falcon": _falcon_grouped,
    "falcon_multi_query": _falcon_multi_query,
    "falcon_sequential": _falcon_sequential,
    "bloom": _bloom,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
}


# transformers' modules by the names each layout gives them (Llama's `model.*`, Falcon's `transformer.*`)
def _layers(hf: PreTrainedModel):
    return hf.model.layers if hasattr(hf, "model") else hf.transformer.h


def _embeddings(hf: PreTrainedModel):
    if hasattr(hf, "model"):
        return hf.model.embed_tokens
    norm = getattr(hf.transformer, "word_embeddings_layernorm", None)  # BLOOM's (our client: LocalModules.embed)
    return hf.transformer.word_embeddings if norm is None else lambda ids: norm(hf.transformer.word_embeddings(ids))


def _final_norm(hf: PreTrainedModel):
    return hf.model.norm if hasattr(hf, "model") else hf.transformer.ln_f


@dataclass
class Pair:
    hf: PreTrainedModel
    span: BlockSpan
    spec: ModelSpec

    def embed(self, ids: Tensor) -> Tensor:
        return _embeddings(self.hf)(ids)  # [batch, seq, hidden] (Gemma's scaled inside the module)

    def logits(self, hidden: Tensor) -> Tensor:
        logits = self.hf.lm_head(_final_norm(self.hf)(hidden))
        cap = self.spec.final_softcap  # Gemma 2 (our client: LocalModules.logits)
        return logits if cap is None else torch.tanh(logits / cap) * cap


def _build(name: str, start: int = 0, end: int | None = None) -> Pair:
    torch.manual_seed(0)
    hf = FAMILIES[name]().eval()
    with torch.no_grad():
        # default init leaves norms at 1 and biases at 0, which would hide loading mistakes
        for param_name, param in hf.named_parameters():
            if param_name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif param_name.endswith("bias"):
                param.copy_(0.2 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    spec = ModelSpec.from_hf_config(hf.config)
    end = spec.num_blocks if end is None else end
    if spec.num_experts:
        # transformers keeps experts fused in memory ([experts, ...] tensors) and saves them one by
        # one, as checkpoints on the hub hold them: read the saved blocks, as servers do
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            states = list(CheckpointReader(folder).load_blocks(start, end, torch.float32, progress=False))
    else:
        states = [_layers(hf)[i].state_dict() for i in range(start, end)]
    blocks = []
    for i, state in zip(range(start, end), states):
        block = LlamaBlock(spec, i)
        block.load_state_dict(state)  # strict: names must match HF exactly
        blocks.append(block)
    return Pair(hf, BlockSpan(spec, start, end, blocks).eval(), spec)


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request: pytest.FixtureRequest) -> Pair:
    return _build(request.param)


def _ids(batch: int, seq: int, seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hf_states(pair: Pair, ids: Tensor, mask: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
    """([embeddings, output of block 0, ..., output of the last block], logits) from transformers.

    Block outputs come from hooks: transformers' hidden_states[-1] is taken after the final norm.
    """
    kwargs: dict[str, Any] = {}
    if mask is not None:
        kwargs["attention_mask"] = mask
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate() passes
    states: list[Tensor] = []

    def keep(_module, _inputs, out) -> None:
        states.append(out[0] if isinstance(out, tuple) else out)

    hooks = [layer.register_forward_hook(keep) for layer in _layers(pair.hf)]
    try:
        logits = pair.hf(ids, **kwargs).logits
    finally:
        for hook in hooks:
            hook.remove()
    return [pair.embed(ids), *states], logits


def _hf_hidden(pair: Pair, ids: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(hidden after the last block, before the final norm; logits) from transformers."""
    states, logits = _hf_states(pair, ids, mask)
    return states[-1], logits


def _close(ours: Tensor, ref: Tensor) -> None:
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"max abs diff {diff:.3g} > {ATOL}"


@torch.no_grad()
def test_full_forward_matches_transformers(pair: Pair) -> None:
    ids = _ids(2, 24)  # longer than the llama3 original context (16) and the mistral window (5)
    ref_hidden, ref_logits = _hf_hidden(pair, ids)
    ours = pair.span(pair.embed(ids))
    _close(ours, ref_hidden)
    _close(pair.logits(ours), ref_logits)


@torch.no_grad()
def test_sub_range_of_span(pair: Pair) -> None:
    ids = _ids(2, 12)
    states, _ = _hf_states(pair, ids)
    _close(pair.span(states[1], first=1, last=3), states[3])
    _close(pair.span(states[0], first=0, last=1), states[1])


@torch.no_grad()
def test_stepwise_with_cache_matches_full(pair: Pair) -> None:
    """Incremental inference as servers run it (paged pool, batched span) against transformers."""
    ids = _ids(2, 22)
    ref_hidden, ref_logits = _hf_hidden(pair, ids)
    embeds = pair.embed(ids)
    session = PagedRunner(pair.span, batch_size=2, max_length=22, page_size=4)
    chunks = [(0, 7)] + [(i, i + 1) for i in range(7, 15)] + [(15, 19), (19, 22)]
    outs = []
    for a, b in chunks:
        outs.append(session.step(embeds[:, a:b]))
        assert session.length == b
    ours = torch.cat(outs, dim=1)
    _close(ours, ref_hidden)
    _close(pair.logits(ours), ref_logits)


@torch.no_grad()
def test_stepwise_on_sub_range(pair: Pair) -> None:
    ids = _ids(1, 10)
    states, _ = _hf_states(pair, ids)
    session = PagedRunner(pair.span, 1, 10, first=1, last=3, page_size=4)
    outs = [session.step(states[1][:, a:b]) for a, b in [(0, 4), (4, 5), (5, 10)]]
    _close(torch.cat(outs, dim=1), states[3])


def _left_padded(seq: int, pads: list[int]) -> tuple[Tensor, Tensor]:
    ids = _ids(len(pads), seq, seed=2)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


@torch.no_grad()
def test_left_padding_matches_transformers(pair: Pair) -> None:
    pads = [0, 6]
    ids, mask = _left_padded(20, pads)
    ref_hidden, ref_logits = _hf_hidden(pair, ids, mask)
    ours = pair.span(pair.embed(ids), pad_lens=torch.tensor(pads))
    assert torch.isfinite(ours).all()
    real = mask.bool()
    _close(ours[real], ref_hidden[real])
    _close(pair.logits(ours)[real], ref_logits[real])


@torch.no_grad()
def test_left_padding_stepwise(pair: Pair) -> None:
    pads = [3, 0]
    ids, mask = _left_padded(16, pads)
    ref_hidden, _ = _hf_hidden(pair, ids, mask)
    session = PagedRunner(pair.span, 2, 16, pad_lens=pads, page_size=4)
    outs = [session.step(pair.embed(ids)[:, a:b]) for a, b in [(0, 9), (9, 10), (10, 11), (11, 16)]]
    assert all(torch.isfinite(o).all() for o in outs)
    real = mask.bool()
    _close(torch.cat(outs, dim=1)[real], ref_hidden[real])


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_gradients_match_transformers(name: str) -> None:
    pair = _build(name)
    ids = _ids(2, 12)
    weights = torch.randn(2, 12, VOCAB, generator=torch.Generator().manual_seed(3))

    ref_in = pair.embed(ids).detach().requires_grad_(True)
    (pair.hf(inputs_embeds=ref_in).logits * weights).sum().backward()
    ours_in = ref_in.detach().clone().requires_grad_(True)
    (pair.logits(pair.span(ours_in)) * weights).sum().backward()

    def rel_err(a: Tensor, b: Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    assert rel_err(ours_in.grad, ref_in.grad) <= 1e-4
    ours_q = pair.span.blocks[0].self_attn.q_proj.weight.grad
    assert rel_err(ours_q, pair.hf.model.layers[0].self_attn.q_proj.weight.grad) <= 1e-4
    ours_norm = pair.span.blocks[-1].post_attention_layernorm.weight.grad
    assert rel_err(ours_norm, pair.hf.model.layers[-1].post_attention_layernorm.weight.grad) <= 1e-4


def test_partial_span_loads_and_runs() -> None:
    pair = _build("llama", start=1, end=3)
    ids = _ids(2, 8)
    with torch.no_grad():
        states, _ = _hf_states(pair, ids)
        _close(pair.span(states[1]), states[3])


def test_paged_session_refuses_overflow_and_a_wrong_batch() -> None:
    pair = _build("llama")
    hidden = torch.randn(1, 5, pair.spec.hidden_size)
    session = PagedRunner(pair.span, 1, 8)
    with torch.no_grad():
        session.step(hidden)
        with pytest.raises(ValueError, match="exceed max_length=8"):
            session.step(hidden)
        assert session.length == 5  # a refused step leaves the session as it was
        with pytest.raises(ValueError, match="batch size 2"):
            session.step(torch.randn(2, 1, pair.spec.hidden_size))


def test_no_mask_built_for_plain_prefill() -> None:
    spec = ModelSpec.from_hf_config(LlamaConfig(num_hidden_layers=1, **COMMON))
    rotary = RotaryEmbedding(spec)
    prefill = make_attention_context(rotary, batch_size=2, seq_len=6, dtype=torch.float32, device="cpu")
    assert prefill.mask is None and prefill.is_causal
    one = make_attention_context(rotary, batch_size=2, seq_len=1, dtype=torch.float32, device="cpu")
    assert one.mask is None and not one.is_causal
    windowed = make_attention_context(rotary, batch_size=1, seq_len=6, dtype=torch.float32, device="cpu", sliding_window=4)
    assert windowed.mask is not None and not windowed.mask[0, 0, 5, :2].any() and windowed.mask[0, 0, 5, 2:].all()


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 16,
            "mscale": 2,
            "mscale_all_dim": 1,
        },
        LLAMA3_ROPE,
    ],
)
def test_rotary_tables_match_transformers(rope: dict[str, Any]) -> None:
    config = LlamaConfig(
        num_hidden_layers=1, rope_parameters={"rope_theta": 10000.0, **rope}, **{**COMMON, "max_position_embeddings": 64}
    )
    ref = LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(ModelSpec.from_hf_config(config))
    positions = torch.arange(100).repeat(2, 1)  # past max_position_embeddings, so dynamic rescales
    ref_cos, ref_sin = ref(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = ours.cos_sin(positions, torch.float32)
    _close(cos, ref_cos)
    _close(sin, ref_sin)


def test_unsupported_rope_type_is_a_clear_error() -> None:
    spec = ModelSpec.from_hf_config(LlamaConfig(num_hidden_layers=1, **COMMON))
    bad = ModelSpec(**{**spec.__dict__, "rope_scaling": {"rope_type": "longrope"}})
    with pytest.raises(ValueError, match="longrope"):
        RotaryEmbedding(bad)

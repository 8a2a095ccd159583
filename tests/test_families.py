"""The families beyond Llama, Mistral and Qwen2 (Qwen3, Phi-3, Gemma, Gemma 2, Falcon, BLOOM, and the
mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE) on real local swarms, against local transformers
on the same checkpoint: greedy generation, batching by expert, LoRA, offloaded experts.
(Block math per family: tests/test_block_math.py.)"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from petals_like import AutoDistributedModelForCausalLM
from petals_like.models.checkpoint import CheckpointReader
from petals_like.models.llama.block import LlamaBlock
from petals_like.models.lora import BlockLora, read_peft_adapter, target_shape
from petals_like.models.span import BlockRange
from petals_like.models.spec import ModelSpec
from petals_like.protocol import ErrorCode, ProtocolError
from petals_like.quant.weights import linear_weight_bytes
from petals_like.server.adapters import AdapterStore
from petals_like.server.loading import load_span
from petals_like.wire import LoraRef, TuningRef
from tests.conftest import TINY_SHARD_SIZE
from tests.swarm import Swarm, running_swarm, wait_until
from tests.test_finetune import assert_lora_matches_peft, randomize_b

NEW_FAMILIES = ["qwen3", "phi3", "gemma", "gemma2", "falcon", "bloom", "mixtral", "qwen2_moe", "qwen3_moe"]


class FamilySwarm:
    def __init__(self, path: Path, swarm: Swarm):
        self.path, self.swarm = path, swarm
        self.spec = ModelSpec.from_pretrained(path)
        self.reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.peers, torch_dtype="float32")


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def family(request, make_model) -> Iterator[FamilySwarm]:
    path = make_model(family=request.param, max_shard_size=TINY_SHARD_SIZE)
    with running_swarm(path, ("0:4", "4:8"), max_lora_rank=8) as swarm:
        setup = FamilySwarm(path, swarm)
        try:
            yield setup
        finally:
            setup.model.shutdown()


def test_greedy_generation_through_two_servers_equals_transformers(family: FamilySwarm):
    for input_ids in (torch.tensor([[1, 17, 42, 99, 7, 250]]), torch.tensor([[1, 80, 90, 100, 110]])):
        expected = family.reference.generate(input_ids, max_new_tokens=64, do_sample=False)
        actual = family.model.generate(input_ids, max_new_tokens=64)
        assert actual.shape == expected.shape and torch.equal(actual, expected), (
            f"differs from position {(actual != expected).nonzero()[:1].tolist()}"
        )


def test_moe_sessions_batched_by_expert_give_the_tokens_each_gives_alone(family: FamilySwarm):
    """8 sessions queued into one iteration: each gets exactly its tokens alone, and in that iteration
    every block ran each expert at most once for all of their tokens."""
    if not family.spec.num_experts:
        pytest.skip("a dense family")
    model, spec = family.model, family.spec
    prompts = [torch.randint(4, 300, (1, n), generator=torch.Generator().manual_seed(n)) for n in range(3, 19, 2)]
    alone = [model.generate(p, max_new_tokens=16, eos_token_id=[]) for p in prompts]
    outputs: list = [None] * len(prompts)

    def run(i: int) -> None:
        with model.inference_session(max_length=64, reuse_prefix=False) as session:
            outputs[i] = model.generate(prompts[i], max_new_tokens=16, session=session, eos_token_id=[])

    server = family.swarm.servers[0]
    scheduler = server.scheduler
    experts = [block.moe for block in scheduler.span.blocks if block.moe is not None]
    for moe in experts:
        moe.busiest_call = (0, 0)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    with scheduler.hold():  # the 8 prompts queue up: the first iteration takes them all
        for t in threads:
            t.start()
        wait_until(lambda: scheduler.num_pending == len(prompts), 60, message="every prompt queued")
    for t in threads:
        t.join(120)
    for i, (out, exp) in enumerate(zip(outputs, alone)):
        assert torch.equal(out, exp), f"session {i} differs from position {(out != exp).nonzero()[:1].tolist()}"
    prompt_tokens = sum(p.shape[1] for p in prompts)
    assert experts and len(experts) == sum(spec.is_moe_block(i) for i in range(0, 4))
    for moe in experts:
        routed, products = moe.busiest_call
        assert routed == prompt_tokens * spec.experts_per_token  # the first iteration: every prompt at once
        assert 0 < products <= spec.num_experts < routed


LORA_TARGETS = {  # PEFT's names: Falcon and BLOOM adapt their fused q/k/v as one projection
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],  # (experts: refused, below)
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def test_lora_through_remote_blocks_equals_peft(family: FamilySwarm, tmp_path: Path):
    """Client-held LoRA trained through remote blocks: loss, logits and every gradient as PEFT on
    transformers (through the experts and the router for Mixtral; Falcon's and BLOOM's fused q/k/v in
    the checkpoint's row order), and the saved adapter is one PEFT loads."""
    if family.spec.family not in LORA_TARGETS:
        pytest.skip("one family of each kind")
    model = AutoDistributedModelForCausalLM.from_pretrained(family.path, initial_peers=family.swarm.peers, torch_dtype="float32")
    try:
        lora = model.add_lora(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[family.spec.family]))
        randomize_b(lora)
        input_ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
        assert_lora_matches_peft(model, family.path, tmp_path, input_ids)
    finally:
        model.shutdown()


def test_lora_on_the_experts_is_refused_clearly(family: FamilySwarm):
    if family.spec.family != "mixtral":
        pytest.skip("the refusal is the same for every MoE family")
    model = AutoDistributedModelForCausalLM.from_pretrained(family.path, initial_peers=family.swarm.peers, torch_dtype="float32")
    try:
        with pytest.raises(ValueError, match="'gate_proj': this mixtral model's feed-forward is a mixture of experts"):
            model.add_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"]))
        # a client that sends one anyway gets a bad_request refusal (no server is to blame)
        store = AdapterStore(family.spec, 0, 4, dtype=torch.float32, device=torch.device("cpu"), max_rank=8)
        ref = TuningRef(lora=LoraRef(id="x", version=1, weights=True, rank=2, scaling=1.0, targets=("q_proj", "gate_proj")))
        with pytest.raises(ProtocolError, match="mixture of experts") as refusal:
            store.resolve(ref, [], BlockRange(0, 4), "peer", batch=1, seq=4)
        assert refusal.value.code is ErrorCode.BAD_REQUEST
        assert torch.equal(
            family.model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4),
            family.reference.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False),
        )
    finally:
        model.shutdown()


def test_lora_on_parts_of_a_fused_projection_is_refused(make_model):
    """Phi-3 holds q/k/v (and gate/up) as one projection; PEFT adapts it whole, so a LoRA on a part would
    save an adapter no PEFT model of it can load."""
    spec = ModelSpec.from_pretrained(make_model(family="phi3", max_shard_size=TINY_SHARD_SIZE))
    assert target_shape(spec, "o_proj") == (spec.num_heads * spec.head_dim, spec.hidden_size)
    for target in ("q_proj", "gate_proj"):
        with pytest.raises(ValueError, match=f"'{target}': this phi3 model holds q/k/v and gate/up as one projection"):
            target_shape(spec, target)
    falcon = ModelSpec.from_pretrained(make_model(family="falcon", max_shard_size=TINY_SHARD_SIZE))
    with pytest.raises(ValueError, match="'o_proj' is not a projection of this falcon model; choose among"):
        target_shape(falcon, "o_proj")


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_quantized_experts(make_model, quant_type: str):
    """Every expert's matrices are held quantized (the router is not), and a span's output stays near
    float32's (random weights: a token whose top-2 flips moves further than rounding alone)."""
    path = make_model(family="mixtral", max_shard_size=TINY_SHARD_SIZE)
    spec = ModelSpec.from_pretrained(path)
    exact = load_span(path, spec, 0, 2, torch.float32, torch.device("cpu"), progress=False)
    quantized = load_span(path, spec, 0, 2, torch.float32, torch.device("cpu"), progress=False, quant_type=quant_type)
    weights = quantized.blocks[0].linear_weights()
    assert len(weights) == 2 + 2 * spec.num_experts and not any(isinstance(w, torch.Tensor) for w, _ in weights.values())
    assert isinstance(quantized.blocks[0].moe.gate.weight, torch.Tensor)
    ratio = linear_weight_bytes(quantized.blocks[0]) / linear_weight_bytes(exact.blocks[0])
    assert ratio <= {"int8": 0.28, "nf4": 0.15}[quant_type]  # of float32: 0.55x / 0.3x of bfloat16
    x = torch.randn(2, 12, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        error = float((quantized(x) - exact(x)).norm() / exact(x).norm())
    assert error <= {"int8": 0.1, "nf4": 0.7}[quant_type], error  # two blocks of test_quant.py's BLOCK_BOUND


def test_offloaded_experts_give_the_same_tokens(make_model):
    """--offload_experts 0.25: a quarter of each server's experts resident, the rest read on demand; greedy
    tokens as transformers' (= as with every expert resident), and the store stays within its capacity."""
    path = make_model(family="mixtral", max_shard_size=TINY_SHARD_SIZE)
    spec = ModelSpec.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with running_swarm(path, ("0:4", "4:8"), offload_experts=0.25) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.peers, torch_dtype="float32")
        try:
            for input_ids in (torch.tensor([[1, 17, 42, 99, 7, 250]]), torch.tensor([[1, 80, 90, 100, 110], [1, 5, 6, 7, 8]])):
                expected = reference.generate(input_ids, max_new_tokens=32, do_sample=False, eos_token_id=None)
                assert torch.equal(model.generate(input_ids, max_new_tokens=32, eos_token_id=[]), expected)
        finally:
            model.shutdown()
        for server in swarm.servers:
            span = server.scheduler.span
            store = span.expert_store
            assert store.capacity == round(0.25 * 4 * spec.num_experts)
            assert all(len(block.moe.experts) == 0 for block in span.blocks)  # nothing routed held by the blocks
            expert_bytes = 3 * spec.hidden_size * spec.moe_intermediate_size * 4
            assert 0 < store.resident_bytes <= store.capacity * expert_bytes
            stats = store.stats
            # a quarter resident: some experts were read on demand, and the guesses made some reads ahead
            assert stats.misses > 0 and stats.predicted > 0 and stats.reads >= stats.misses


def test_offload_refuses_what_it_cannot_do(make_model, tiny_model):
    spec = ModelSpec.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match="needs a mixture-of-experts model; this llama model has no experts"):
        load_span(tiny_model, spec, 0, 2, torch.float32, torch.device("cpu"), progress=False, resident_experts=0.5)
    path = make_model(family="mixtral", max_shard_size=TINY_SHARD_SIZE)
    moe_spec = ModelSpec.from_pretrained(path)
    with pytest.raises(ValueError, match="use it with --quant_type none"):
        load_span(
            path, moe_spec, 0, 2, torch.float32, torch.device("cpu"), progress=False, quant_type="int8", resident_experts=0.5
        )
    with pytest.raises(ValueError, match=r"fraction of experts kept resident, in \(0, 1\], got 1.5"):
        load_span(path, moe_spec, 0, 2, torch.float32, torch.device("cpu"), progress=False, resident_experts=1.5)


def test_expert_store_keeps_its_capacity_and_counts_its_guesses(make_model):
    """In one process: the LRU never holds more than its capacity, a guess for the next block is read
    ahead and counted as used when that block runs the guessed experts, and outputs equal all-resident."""
    path = make_model(family="mixtral", max_shard_size=TINY_SHARD_SIZE)
    spec = ModelSpec.from_pretrained(path)
    full = load_span(path, spec, 0, 4, torch.float32, torch.device("cpu"), progress=False)
    offloaded = load_span(path, spec, 0, 4, torch.float32, torch.device("cpu"), progress=False, resident_experts=0.125)
    store = offloaded.expert_store
    assert store.capacity == 4
    x = torch.randn(1, 6, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(offloaded(x), full(x), rtol=1e-4, atol=1e-4)
        assert len(store._resident) <= store.capacity
        for step in range(6):  # one token at a time: two experts per block, guessed from the block before
            offloaded(x[:, step : step + 1])
            assert len(store._resident) <= store.capacity
    stats = store.stats
    # guesses are made for blocks 1..3 of each call (block 0 has no block before it in the span)
    assert stats.predicted > 0 and stats.next_block_uses > 0
    assert 0 < stats.predicted_used <= min(stats.predicted, stats.next_block_uses)
    assert stats.resident_hits > 0  # some of those guesses were read ahead and found resident
    store.close()


def test_a_peft_made_falcon_adapter_loads_for_hosting(make_model, tmp_path: Path):
    """run_server --adapters reads PEFT's own Falcon adapter (transformer.h.{i}.self_attention.query_key_value...)."""
    from peft import get_peft_model

    path = make_model(family="falcon", max_shard_size=TINY_SHARD_SIZE)
    spec = ModelSpec.from_pretrained(path)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS["falcon"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    config, blocks = read_peft_adapter(tmp_path / "adapter", spec, range(0, 2))
    assert sorted(blocks) == [0, 1] and set(blocks[0].weights) == set(LORA_TARGETS["falcon"])
    a, b = blocks[1].weights["query_key_value"]
    assert a.shape == (2, spec.hidden_size) and b.shape == ((spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim, 2)


def test_falcon_lora_is_the_same_through_fused_and_separate_projections(make_model):
    """The fused query_key_value LoRA lands on the same rows whether a block multiplies q/k/v as one
    matrix (servers) or one by one (a block never fused), and it changes the output."""
    path = make_model(family="falcon", max_shard_size=TINY_SHARD_SIZE)
    spec = ModelSpec.from_pretrained(path)
    state = CheckpointReader(path).block_state_dict(0, torch.float32)
    separate, fused = LlamaBlock(spec, 0), LlamaBlock(spec, 0)
    separate.load_state_dict(state)
    fused.load_state_dict(state)
    fused.fuse_projections()
    generator = torch.Generator().manual_seed(4)
    weights = {}
    for target in LORA_TARGETS["falcon"]:
        fan_in, fan_out = target_shape(spec, target)
        weights[target] = (torch.randn(2, fan_in, generator=generator), torch.randn(fan_out, 2, generator=generator))
    rows = [(None, BlockLora(0.5, weights))]
    x = torch.randn(5, spec.hidden_size, generator=generator)
    cos, sin = torch.ones(5, spec.head_dim), torch.zeros(5, spec.head_dim)  # (no rotation: the q/k/v rows compared as they are)
    with torch.no_grad():
        for got, want in zip(separate.attention_input(x, cos, sin, rows), fused.attention_input(x, cos, sin, rows)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        plain = fused.attention_input(x, cos, sin, None)
        assert all((a - b).abs().max() > 1e-3 for a, b in zip(plain, fused.attention_input(x, cos, sin, rows)))
        torch.testing.assert_close(separate._mlp(x, rows), fused._mlp(x, rows), rtol=1e-5, atol=1e-5)


def test_offloaded_experts_read_during_inference_serve_a_backward_pass(make_model):
    """An expert read while serving an inference step stays in the store; a training pass that finds it
    there computes input gradients through it (an inference-mode tensor would refuse that)."""
    path = make_model(family="mixtral", max_shard_size=TINY_SHARD_SIZE)
    spec = ModelSpec.from_pretrained(path)
    full = load_span(path, spec, 0, 2, torch.float32, torch.device("cpu"), progress=False)
    offloaded = load_span(path, spec, 0, 2, torch.float32, torch.device("cpu"), progress=False, resident_experts=1.0)
    x = torch.randn(1, 4, spec.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        offloaded(x)  # reads every expert these tokens use, inside inference mode
    grads = []
    for span in (offloaded, full):
        inputs = x.clone().requires_grad_(True)
        span(inputs).sum().backward()
        grads.append(inputs.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)
    offloaded.expert_store.close()

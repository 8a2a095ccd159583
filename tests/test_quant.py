"""Quantized spans: error bounds against float32, memory per block, NF4 exactly as bitsandbytes stores it,
formats refused rather than swapped, and a mixed int8 / nf4 swarm."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from petals_like.dht.records import default_dht_prefix
from petals_like.models.llama.block import LlamaBlock
from petals_like.models.spec import ModelSpec
from petals_like.models.tiny import PRESETS
from petals_like.quant import native
from petals_like.quant.nf4 import BLOCK_SIZE, FUSED_MAX_ROWS, NF4_CODE, NF4Weight, decode_blocks_torch, quantize_nf4
from petals_like.quant.weights import QuantizedWeight, linear_weight_bytes, quantize, quantize_block
from petals_like.server.batched_span import PagedRunner
from petals_like.server.loading import load_span
from tests.swarm import loss_and_input_grads, start_swarm

# documented bounds (docs/quantization.md, quant/weights.py): relative error of one matmul on Gaussian weights,
# and of one block's output on the random-weight tiny model (random networks amplify noise; a
# trained model's are far smaller)
MATMUL_BOUND = {"int8": 0.015, "int4": 0.11, "nf4": 0.11}
BLOCK_BOUND = {"int8": 0.05, "int4": 0.35, "nf4": 0.35}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def whole_and_steps(exact, quantized, hidden_size: int, tokens: int, prefill: int) -> tuple[torch.Tensor, ...]:
    """Outputs for one random sequence: the exact span's, the quantized span's all at once, and the
    quantized span's as a `prefill`-token prompt followed by one step per remaining token."""
    x = torch.randn(1, tokens, hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, full = exact(x), quantized(x)
        session = PagedRunner(quantized, 1, tokens)  # the serving path: paged pool, batched span
        outputs = [session.step(x[:, :prefill])]
        outputs += [session.step(x[:, i : i + 1]) for i in range(prefill, tokens)]
    return want, full, torch.cat(outputs, dim=1)


@pytest.mark.parametrize("quant_type", ["int8", "int4", "nf4"])
def test_matmul_error_and_dequantize(quant_type: str):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=generator) * 0.02
    x = torch.randn(8, 512, generator=generator)
    q = quantize(w, quant_type)
    assert q.quant_type == quant_type
    with torch.inference_mode():
        assert rel(q.linear(x), x @ w.t()) <= MATMUL_BOUND[quant_type]
    assert rel(q.dequantize(), w) <= MATMUL_BOUND[quant_type]
    # autograd through a quantized layer reaches its input
    xg = x.clone().requires_grad_(True)
    q.linear(xg).sum().backward()
    assert rel(xg.grad, w.sum(0).expand(8, 512)) <= MATMUL_BOUND[quant_type]


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_quantized_span_forward_and_steps_stay_within_bounds(tiny_model: Path, quant_type: str):
    spec = ModelSpec.from_pretrained(tiny_model)
    exact = load_span(tiny_model, spec, 0, 1, torch.float32, torch.device("cpu"), progress=False)
    quantized = load_span(tiny_model, spec, 0, 1, torch.float32, torch.device("cpu"), progress=False, quant_type=quant_type)
    want, full, steps = whole_and_steps(exact, quantized, spec.hidden_size, tokens=20, prefill=12)
    assert rel(full, want) <= BLOCK_BOUND[quant_type]
    assert rel(steps, full) <= 0.02  # step by step = all at once, up to bfloat16 rounding of activations


def test_a_format_that_cannot_take_a_matrix_is_refused_at_load(tiny_model: Path):
    """int4 groups 64 input features; the tiny model's down projection has 172. The span refuses to
    load, naming the formats that take it, instead of holding that matrix in another format while
    announcing int4 (nf4, which takes any shape, holds every matrix in NF4)."""
    spec = ModelSpec.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match=r"int4 needs in_features divisible by 64.*\[64, 172\].*nf4 or int8"):
        load_span(tiny_model, spec, 0, 1, torch.float32, torch.device("cpu"), progress=False, quant_type="int4")
    span = load_span(tiny_model, spec, 0, 1, torch.float32, torch.device("cpu"), progress=False, quant_type="nf4")
    matrices = [weight for weight, _ in span.blocks[0].linear_weights().values()]
    assert len(matrices) == 4 and all(isinstance(w, NF4Weight) for w in matrices)


def test_nf4_is_qloras_code_with_an_absmax_per_block_of_64():
    """Every value is the nearest of the 16 NF4 code values times its block's absolute maximum, the
    blocks running over the flat weight (so any shape, a last partial block included)."""
    code = torch.tensor(NF4_CODE)
    assert code.shape == (16,) and code[7] == 0 and code[0] == -1 and code[-1] == 1
    assert torch.all(code[1:] > code[:-1])
    generator = torch.Generator().manual_seed(3)
    for shape in [(256, 512), (172, 64), (3, 7)]:
        w = torch.randn(*shape, generator=generator) * 0.02
        packed, absmax = quantize_nf4(w)
        flat = w.reshape(-1)
        blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK_SIZE)).view(-1, BLOCK_SIZE)
        assert torch.equal(absmax, blocks.abs().amax(dim=1))
        nearest = (blocks.reshape(-1, 1) / absmax.repeat_interleave(BLOCK_SIZE)[:, None] - code).abs().argmin(dim=1)
        expected = (code[nearest] * absmax.repeat_interleave(BLOCK_SIZE))[: flat.numel()].view(shape)
        q = NF4Weight(w)
        assert torch.equal(q.dequantize(), expected)
        assert packed.numel() == -(-flat.numel() // 2)
        assert q.nbytes <= 0.3 * w.numel() * 2 or w.numel() < BLOCK_SIZE  # vs bfloat16 (a lone block's absmax weighs)
        rows = shape[0] // 3 or 1
        assert torch.equal(q.float32_rows(rows, 2 * rows)[0], expected[rows : 2 * rows])


def test_nf4_equals_bitsandbytes():
    """The same packed bytes (first value in the high four bits), the same absmax and the same
    dequantized values as bitsandbytes' own NF4 (its CPU implementation)."""
    functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(functional.get_4bit_type("nf4", device="cpu").float(), torch.tensor(NF4_CODE))
    generator = torch.Generator().manual_seed(4)
    for shape in [(256, 512), (172, 64), (3, 7)]:
        w = torch.randn(*shape, generator=generator) * 0.02
        theirs, state = functional.quantize_4bit(w, blocksize=BLOCK_SIZE, quant_type="nf4")
        packed, absmax = quantize_nf4(w)
        assert torch.equal(theirs.view(-1), packed) and torch.equal(state.absmax, absmax)
        assert torch.equal(functional.dequantize_4bit(theirs, state), NF4Weight(w).dequantize())


@pytest.mark.parametrize("in_features", [96, 128])  # 128: products of up to 8 rows through the C kernel
def test_nf4_products_and_gradients(in_features: int):
    generator = torch.Generator().manual_seed(6)
    w = torch.randn(160, in_features, generator=generator) * 0.02
    q = NF4Weight(w)
    assert (q.fused is not None) == (in_features % BLOCK_SIZE == 0 and native.nf4_kernel() is not None)
    bias = torch.randn(160, generator=generator)
    for rows in (1, 5, 8, 40):  # a decode step, a few rows, a prefill chunk
        x = torch.randn(rows, in_features, generator=generator)
        with torch.inference_mode():
            torch.testing.assert_close(q.linear(x, bias), x @ q.dequantize().t() + bias, rtol=1e-5, atol=1e-5)
            in_bf16 = q.linear(x[None].bfloat16(), bias.bfloat16())
        assert in_bf16.dtype == torch.bfloat16 and in_bf16.shape == (1, rows, 160)
        assert rel(in_bf16.float(), x @ q.dequantize().t() + bias) < 0.01
    xg = torch.randn(3, in_features, generator=generator).requires_grad_(True)
    q.linear(xg).sum().backward()
    torch.testing.assert_close(xg.grad, q.dequantize().sum(0).expand(3, in_features))


@pytest.fixture(scope="module")
def compiled_kernels(tmp_path_factory) -> dict[str, native.NF4Kernel]:
    """The C kernel built for each instruction set this CPU runs: plain C, AVX2 and AVX-512 where present."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("no C compiler (.ci/run installs gcc)")
    directory = tmp_path_factory.mktemp("native")
    kernels = {"native": native.load(native.build(directory))}
    if platform.machine() in ("x86_64", "AMD64"):
        kernels["baseline"] = native.load(native.build(directory, ()))
        if kernels["native"].isa == "avx512":
            kernels["avx2"] = native.load(native.build(directory, ("-mavx2", "-mfma")))
    return kernels


def test_the_c_kernel_of_each_instruction_set_equals_the_torch_path(compiled_kernels):
    """Values bit for bit as the byte-pair gather decodes them; products of 1..8 rows within float32
    rounding of x @ W.T; the machine's own build is the one the servers load."""
    expected_isa = {"native": None, "baseline": "c", "avx2": "avx2"}
    generator = torch.Generator().manual_seed(9)
    w = torch.randn(200, 320, generator=generator) * 0.02
    packed, absmax = quantize_nf4(w)
    values = decode_blocks_torch(packed, absmax, 0, absmax.numel())
    for name, kernel in compiled_kernels.items():
        assert expected_isa[name] in (None, kernel.isa)
        assert FUSED_MAX_ROWS <= kernel.max_rows
        assert torch.equal(kernel.dequantize(packed, absmax, 0, absmax.numel()), values)
        assert torch.equal(kernel.dequantize(packed, absmax, 7, 30), values[7 * 64 : 37 * 64])
        for rows in range(1, kernel.max_rows + 1):
            x = torch.randn(rows, 320, generator=generator)
            got = kernel.linear(x, packed, absmax, 200)
            torch.testing.assert_close(got, x @ values.view(200, 320).T, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="refused"):
            kernel.linear(torch.randn(kernel.max_rows + 1, 320), packed, absmax, 200)
    assert native.nf4_kernel() is not None and native.nf4_kernel().isa == compiled_kernels["native"].isa


def test_without_the_c_kernel_nf4_keeps_working(monkeypatch, caplog):
    """No compiler (or PETALS_LIKE_NATIVE=0): a warning (a note) says why, and NF4 products go through torch ops."""
    monkeypatch.setattr(native, "cache_dir", lambda: Path("/nonexistent-cache"))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    native.nf4_kernel.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=native.__name__):
            q = NF4Weight(torch.randn(64, 128, generator=torch.Generator().manual_seed(2)))
        assert q.fused is None and q.float32_min_rows == 1
        assert "no C compiler ('no-such-compiler-here' not found" in caplog.text
        x = torch.randn(2, 128)
        with torch.inference_mode():
            torch.testing.assert_close(q.linear(x), x @ q.dequantize().t(), rtol=1e-5, atol=1e-5)
        monkeypatch.setenv("PETALS_LIKE_NATIVE", "0")
        native.nf4_kernel.cache_clear()
        assert native.nf4_kernel() is None
    finally:
        native.nf4_kernel.cache_clear()


def test_span_with_every_matrix_in_4_bits(make_model, int4_unpacked, float32_products: list[int]):
    """On shapes the 4-bit kernel takes (the tiny preset's are too small for some matrices), every
    matrix is held in 4 bits; a 132-token prefill (float32 products of unpacked slices) followed by
    steps (the kernel) agrees with the whole sequence at once, and both stay within the bound of
    float32."""
    model = make_model(preset="tiny", hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    spec = ModelSpec.from_pretrained(model)
    exact = load_span(model, spec, 0, 2, torch.float32, torch.device("cpu"), progress=False)
    quantized = load_span(model, spec, 0, 2, torch.float32, torch.device("cpu"), progress=False, quant_type="int4")
    for block in quantized.blocks:
        matrices = [weight for weight, _ in block.linear_weights().values()]
        assert all(isinstance(w, QuantizedWeight) and w.quant_type == "int4" for w in matrices)
    want, full, steps = whole_and_steps(exact, quantized, spec.hidden_size, tokens=140, prefill=132)
    assert rel(full, want) <= 2 * BLOCK_BOUND["int4"]  # two blocks
    assert rel(steps, full) <= 0.02
    # the whole sequence, then the prefill, through each block's four matrices; no step
    assert float32_products == [140] * 8 + [132] * 8


def test_weight_memory_per_block_of_the_bench_model():
    config = LlamaConfig(**PRESETS["bench"])
    spec = ModelSpec.from_hf_config(config)
    sizes = {}
    for quant_type in ("none", "int8", "int4", "nf4"):
        block = LlamaBlock(spec, 0).to(torch.bfloat16)
        block.requires_grad_(False)
        block.fuse_projections()
        quantize_block(block, quant_type)
        sizes[quant_type] = linear_weight_bytes(block)
    assert sizes["int8"] <= 0.55 * sizes["none"]
    assert sizes["int4"] <= 0.3 * sizes["none"] and sizes["nf4"] <= 0.3 * sizes["none"]


def test_swarm_with_an_int8_and_an_nf4_server(tiny_model: Path, reference):
    from petals_like import AutoDistributedModelForCausalLM

    swarm = start_swarm()
    try:
        swarm.add_server(tiny_model, "0:4", quant_type="int8")
        swarm.add_server(tiny_model, "4:8", quant_type="nf4")
        swarm.wait_for_blocks(default_dht_prefix(tiny_model), 8)
        spans = swarm.spans(default_dht_prefix(tiny_model), 8)
        assert sorted(s.server_info.quant_type for s in spans.values()) == ["int8", "nf4"]
        model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.peers, torch_dtype="float32")
        try:
            input_ids = torch.randint(4, 300, (2, 10), generator=torch.Generator().manual_seed(2))
            out = model.generate(input_ids, max_new_tokens=8)
            assert out.shape == (2, 18) and torch.equal(out[:, :10], input_ids)
            result, grad, ref, ref_grad = loss_and_input_grads(model, reference, input_ids, input_ids)
            assert torch.isfinite(grad).all()
            assert abs(result.loss.item() - ref.loss.item()) <= 0.2 * ref.loss.item()
            cosine = torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)
            assert cosine > 0.5, f"gradient direction off: cosine {cosine:.2f}"
        finally:
            model.shutdown()
    finally:
        swarm.shutdown()


def test_wire_formats_shrink_steps_and_keep_outputs_close(tiny_model: Path):
    from petals_like import AutoDistributedModelForCausalLM

    swarm = start_swarm(tiny_model, ("0:4",))
    swarm.add_server(tiny_model, "4:8", wire_formats=("float32",))  # an operator who allows no compression
    try:
        swarm.wait_for_blocks(default_dht_prefix(tiny_model), 8)
        hidden = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(3))
        outputs, sent = {}, {}
        for wire in (None, "float16", "int8"):
            # no retries: with them the client would look for another server of 4:8 that takes the format
            model = AutoDistributedModelForCausalLM.from_pretrained(
                tiny_model, initial_peers=swarm.peers, torch_dtype="float32", wire=wire, max_retries=0, connect_timeout=5
            )
            try:
                if wire is not None:  # the second server refuses: a clear error names the formats it takes
                    with pytest.raises(RuntimeError, match=f"wire format '{wire}' is not supported.*float32"):
                        with model.inference_session(max_length=8) as session:
                            session.step(hidden)
                # blocks 0:4 alone, on the server that accepts every format
                with model.inference_session(max_length=8) as session:
                    session.num_blocks = 4
                    outputs[wire] = session.step(hidden)
                    sent[wire] = session._chain[0].stream.bytes_sent
            finally:
                model.shutdown()
        assert outputs[None].dtype == outputs["int8"].dtype == torch.float32
        assert rel(outputs["float16"], outputs[None]) <= 0.01
        assert rel(outputs["int8"], outputs[None]) <= 0.05
        assert sent["float16"] <= 0.5 * sent[None] and sent["int8"] <= 0.3 * sent[None]
    finally:
        swarm.shutdown()


def test_4bit_weights_unpack_to_what_the_kernel_multiplies_by(int4_unpacked):
    """The kernel's 4-bit layout is torch's private one, checked at first use: where it is the one
    read, the unpacked weight is what the kernel's product with the identity gives (up to its
    bfloat16 rounding), a slice of whole 32-row blocks at a time as well as whole."""
    generator = torch.Generator().manual_seed(2)
    q = QuantizedWeight(torch.randn(96, 192, generator=generator) * 0.02, "int4")
    assert q.kernel_layout and q.unpacks_to_float32
    with torch.inference_mode():
        from_kernel = q.kernel_weight()
        whole = q.dequantize()
        middle, row_scale = q.float32_rows(32, 64)
    assert row_scale is None and middle.shape == (32, 192)
    torch.testing.assert_close(whole, from_kernel, rtol=2**-8, atol=1e-6)
    assert torch.equal(middle, whole[32:64])
    with pytest.raises(ValueError, match="whole blocks"):
        q.float32_rows(16, 48)  # would read halves of two blocks


def test_4bit_weights_without_the_cpu_kernel_pack_two_per_byte(monkeypatch):
    """CUDA's path (and that of a CPU build without the 4-bit kernel): the same levels and scales,
    packed two per byte in order, dequantized before each matmul; same bytes, same weight."""
    from petals_like.quant import weights

    generator = torch.Generator().manual_seed(5)
    w = torch.randn(48, 256, generator=generator) * 0.02
    with_kernel = QuantizedWeight(w, "int4")
    monkeypatch.setattr(weights, "_int4_kernel_available", lambda: False)
    portable = QuantizedWeight(w, "int4")
    assert not portable.kernel_layout and portable.unpacks_to_float32 and portable.row_multiple == 1
    assert portable.nbytes == with_kernel.nbytes
    torch.testing.assert_close(portable.dequantize(), with_kernel.dequantize(), rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(portable.float32_rows(5, 9)[0], portable.dequantize()[5:9])
    x = torch.randn(3, 256, generator=generator)
    with torch.inference_mode():
        assert rel(portable.linear(x), x @ w.t()) <= MATMUL_BOUND["int4"]
        torch.testing.assert_close(portable.linear(x), x @ portable.dequantize().t())
    xg = x.clone().requires_grad_(True)
    portable.linear(xg).sum().backward()
    torch.testing.assert_close(xg.grad, portable.dequantize().sum(0).expand(3, 256))


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_cuda_path_through_bitsandbytes(monkeypatch, quant_type: str):
    """The bitsandbytes path that CUDA servers take (LLM.int8() with its outlier threshold, NF4's
    4-bit matmul), run here on bitsandbytes' CPU backend: what it stores, its products and gradients.
    Its CUDA kernels themselves are checked only where a GPU is."""
    pytest.importorskip("bitsandbytes")
    from petals_like.quant import bnb

    monkeypatch.setattr(bnb, "applies", lambda device: True)
    generator = torch.Generator().manual_seed(7)
    w = torch.randn(128, 256, generator=generator) * 0.02
    q = quantize(w, quant_type)
    assert q.kernel is not None and not q.unpacks_to_float32
    assert q.nbytes <= (0.55 if quant_type == "int8" else 0.3) * w.numel() * 2
    assert rel(q.dequantize(), w) <= MATMUL_BOUND[quant_type]
    if quant_type == "nf4":  # bitsandbytes' NF4 bytes are the ones quant/nf4.py writes
        packed, absmax = quantize_nf4(w)
        assert torch.equal(q.data.view(-1), packed) and torch.equal(q.absmax, absmax)
    x = torch.randn(4, 256, generator=generator)
    bias = torch.randn(128, generator=generator)
    with torch.inference_mode():
        out = q.linear(x, bias)
    assert out.dtype == x.dtype and out.shape == (4, 128)
    assert rel(out, x @ w.t() + bias) <= MATMUL_BOUND[quant_type]
    xg = x.clone().requires_grad_(True)
    q.linear(xg).sum().backward()
    torch.testing.assert_close(xg.grad, q.dequantize().sum(0).expand(4, 256))

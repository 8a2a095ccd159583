"""Quantization workloads of the benchmark: quantized servers and compressed hidden states.

(k) servers in float32, bfloat16, int8, int4 and nf4 (a swarm each): linear-weight bytes per block,
    one session's tokens/s and p50 per token, 16 sessions' aggregate tokens/s and p50 per decode
    step, the seconds of a 512-token prefill, and the relative error of the final hidden states
    and of the logits of a 16-token prompt vs float32
(l) one float32 swarm, the client's wire format float32, float16, bfloat16 or int8 (8-bit
    blocks): bytes the client sends per decode step and per 512-token prefill (every hop of the
    chain carries the same), the logits' relative error, how far one hop moves a hidden state (the
    client's embeddings), and the amplification: logits error / one hop's error, every hop using
    the format, as a session's wire does. From it, the fewest bits per value that any codec used on
    every hop needs to keep the logits within 1% (the rate-distortion bound of a Gaussian source,
    which the random-weight model's embeddings are)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from petals_like.bench.harness import BenchSwarm, TokenTimer, prompt, sessions_at_once, summarize

SETUPS = {
    "float32": [],
    "bfloat16": ["--torch_dtype", "bfloat16"],
    "int8": ["--quant_type", "int8"],
    "int4": ["--quant_type", "int4"],
    "nf4": ["--quant_type", "nf4"],
}


def _rel(a: torch.Tensor, b: torch.Tensor, digits: int = 5) -> float:
    a, b = a.detach().float(), b.detach().float()
    return round(float((a - b).norm() / b.norm()), digits)


def weight_bytes_of(model_dir: Path, setup: str) -> int:
    from petals_like.models.spec import ModelSpec
    from petals_like.quant.weights import linear_weight_bytes
    from petals_like.server.loading import load_span

    spec = ModelSpec.from_pretrained(model_dir)
    dtype = torch.bfloat16 if setup == "bfloat16" else torch.float32
    quant = setup if setup in ("int8", "int4", "nf4") else "none"
    span = load_span(model_dir, spec, 0, 1, dtype, torch.device("cpu"), progress=False, quant_type=quant)
    return linear_weight_bytes(span.blocks[0])


def _prompt_outputs(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with model.inference_session(max_length=input_ids.shape[1] + 1, reuse_prefix=False) as session:
        hidden = session.step(model.local.embed(input_ids))
    return hidden, model.local.logits(hidden)


def quantized_servers(model_dir: Path, server_args: list[str], new_tokens: int = 64) -> dict:
    """(k)"""
    input_ids = prompt(16, 5)
    results: dict = {}
    reference = None
    for setup, args in SETUPS.items():
        try:
            weight_bytes = weight_bytes_of(model_dir, setup)
        except ValueError as e:  # a format this model's matrices cannot take (int4 on odd widths): servers refuse it too
            results[setup] = {"refused": str(e)}
            continue
        with BenchSwarm(model_dir, server_args + args) as swarm:
            model = swarm.model
            hidden, logits = _prompt_outputs(model, input_ids)
            if reference is None:
                reference = (hidden, logits)
            timer = TokenTimer()
            model.generate(input_ids, max_new_tokens=new_tokens, eos_token_id=[], streamer=timer)
            one = summarize(timer.latencies())
            many = sessions_at_once(model, 16, new_tokens=32)
            prefill_s = swarm.prefill(512)
            results[setup] = {
                "weight_bytes_per_block": weight_bytes,
                "one_session_tokens_per_s": one["tokens_per_s"],
                "one_session_p50_ms": one["p50_ms"],
                "sessions_16_tokens_per_s": many["aggregate_tokens_per_s"],
                "sessions_16_p50_ms": many["p50_ms"],
                "prefill_512_s": round(prefill_s, 3),
                "hidden_rel_error": _rel(hidden, reference[0]),
                "logits_rel_error": _rel(logits, reference[1]),
                "server_rss_mib": [s["rss_mib"] for s in swarm.footprint],
            }
    base = results["bfloat16"]["weight_bytes_per_block"]
    bf16 = results["bfloat16"]["one_session_tokens_per_s"]
    for entry in results.values():
        if "refused" in entry:
            continue
        entry["weight_bytes_vs_bfloat16"] = round(entry["weight_bytes_per_block"] / base, 3)
        entry["one_session_vs_bfloat16"] = round(entry["one_session_tokens_per_s"] / bf16, 3)
    return results


def _round_trip(tensor: torch.Tensor, wire: str) -> torch.Tensor:
    """The tensor as a server receives it in this wire format (one message, as the protocol packs it)."""
    from petals_like.protocol import pack_message, unpack_message

    size = 2 * tensor.numel() * tensor.element_size() + (1 << 20)
    (part,) = pack_message([tensor.detach()], max_part_bytes=size, wire=wire)
    return unpack_message(part, max_bytes=size).tensors[0].float()


def prefill_and_step(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """A prompt and one greedy step in the model's wire format: (prompt outputs, step output, bytes
    the client sent for the prompt and for the step, hops of the chain)."""
    with model.inference_session(max_length=input_ids.shape[1] + 2, reuse_prefix=False) as session:
        first = session.step(model.local.embed(input_ids))
        prefill_bytes = session._chain[0].stream.bytes_sent
        token = model.local.logits(first[:, -1:]).argmax(-1)
        step = session.step(model.local.embed(token))
        step_bytes = session._chain[0].stream.bytes_sent - prefill_bytes
        hops = len(session._chain) + 1  # client -> each span -> client (spans push to the next)
    return first, step, prefill_bytes, step_bytes, hops


def wire_formats(model_dir: Path, server_args: list[str], prefill_len: int = 512) -> dict:
    """(l)"""
    input_ids = prompt(prefill_len, 6)
    results: dict = {}
    with BenchSwarm(model_dir, server_args) as swarm:
        model = swarm.model
        reference = None
        for wire in ("float32", "float16", "bfloat16", "int8"):
            model.config.wire = wire
            first, step, prefill_bytes, step_bytes, hops = prefill_and_step(model, input_ids)
            embedded = model.local.embed(input_ids)
            logits = model.local.logits(torch.cat([first[:, -1:], step], dim=1))
            if reference is None:
                reference = logits
            results[wire] = {
                "bytes_per_decode_step": step_bytes,
                "bytes_per_prefill": prefill_bytes,
                "logits_rel_error": _rel(logits, reference),
                "hops": hops,
                "one_hop_hidden_rel_error": _rel(_round_trip(embedded, wire), embedded, 7),
            }
        model.config.wire = None
    base = results["float32"]
    for entry in results.values():
        entry["step_bytes_vs_float32"] = round(entry["bytes_per_decode_step"] / base["bytes_per_decode_step"], 3)
        if entry["one_hop_hidden_rel_error"] > 0:
            entry["amplification"] = round(entry["logits_rel_error"] / entry["one_hop_hidden_rel_error"], 1)
    # Measured where the perturbation is smallest, so the chain is closest to linear
    amplification = results["float16"]["amplification"]
    bits = math.log2(amplification / 0.01)  # rms error of a Gaussian at R bits/value >= 2**-R of its rms
    results["bound_for_1pct_logits"] = {
        "amplification": amplification,
        "min_bits_per_value": round(bits, 2),
        "min_bytes_vs_float32": round(bits / 32, 3),
    }
    return results

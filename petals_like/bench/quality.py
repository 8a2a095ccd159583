"""(q) Quality of the lossy formats, as perplexity on the trained reference model (models/trained.py).

A random-weight model amplifies rounding errors many times over, so its logits errors say little
about a format; perplexity on held-out text of a trained model is what quantization is judged by.
Every number here is through a real swarm of two servers, on the same validation windows:

- servers in float32, bfloat16, int8, int4 and nf4 (a swarm each), and, on the float32 swarm, the
  client's wire formats float32, float16, bfloat16 and int8;
- for each: validation perplexity, its change vs float32 servers with the float32 wire, the noise of
  that change (twice the standard error of the paired per-window log-likelihood differences: the
  same windows are scored by both, so the noise is that of the difference, not of the perplexity),
  the share of positions whose most likely next token is float32's (on the same text: each position
  on its own), and the share of greedy tokens equal to float32's over `count` continuations of
  `new_tokens` tokens (position by position, and the mean length of the equal prefix: there one
  changed choice near a tie changes the rest of the continuation);
- local transformers in float32 on the same windows and prompts, against the swarm's float32: the
  floor of these measures (summation order only), and the recorded perplexity of training.json;
- a sanity row the benchmark must flag: the model's weights rounded to 2-bit groups of 64, scored
  locally with transformers (a format this bad is not served).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from petals_like.bench import quant
from petals_like.bench.harness import BenchSwarm

WIRES = ("float32", "float16", "bfloat16", "int8")
SANITY_BITS = 2


def trained_model_dir() -> Path:
    """The cached trained reference model; FileNotFoundError saying how to build it where there is none."""
    from petals_like.models import trained

    path = trained.default_trained_path()
    if not trained.is_complete(path):
        raise FileNotFoundError(
            f"(q) needs the trained reference model in {path}: build it once with "
            "`python -m petals_like.cli.make_tiny_model --trained` (~13 minutes on 2 cores)"
        )
    return path


def validation(model_dir: Path, max_tokens: int) -> torch.Tensor:
    """The trained model's validation windows [n, seq_len] (the files it was not trained on)."""
    from transformers import AutoTokenizer

    from petals_like.models import trained

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seq_len = trained.read_training_record(model_dir)["seq_len"]
    _, files = trained.corpus_files()
    stream = trained.token_stream(tokenizer, trained.read_texts(files))
    return trained.validation_windows(stream, seq_len, max_tokens)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean negative log-likelihood of tokens 1.. of each window [n] (float64), and the most likely
    next token at every position but the last [n, seq_len - 1]. A distributed model
    runs the windows through inference sessions, the path generation takes (and the one where the
    client's wire format applies); a local transformers model through its forward."""
    out, best = [], []
    for batch in windows.split(batch_size):
        if hasattr(model, "inference_session"):
            with model.inference_session(max_length=batch.shape[1], reuse_prefix=False) as session:
                logits = model.local.logits(session.step(model.local.embed(batch)))
        else:
            logits = model(input_ids=batch).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].double().transpose(1, 2), batch[:, 1:], reduction="none")
        out.append(nll.mean(dim=1))
        best.append(logits[:, :-1].argmax(dim=-1))
    return torch.cat(out), torch.cat(best)


@torch.no_grad()
def continuations(model, windows: torch.Tensor, count: int, prompt_len: int, new_tokens: int) -> torch.Tensor:
    """Greedy continuations [count, new_tokens] of the first prompt_len tokens of `count` windows, in one batch."""
    prompts = windows[:count, :prompt_len]
    out = model.generate(prompts, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
    return out[:, prompt_len:]


def compare(measured: tuple[torch.Tensor, torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, ...]) -> dict:
    """One format's (window NLL, top-1 tokens, greedy continuations) against float32's."""
    (nll, best, tokens), (ref_nll, ref_best, ref_tokens) = measured, reference
    diff = nll - ref_nll
    stderr = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else float("nan")
    equal = tokens == ref_tokens
    prefix = equal.long().cumprod(dim=1).sum(dim=1).float()
    return {
        "perplexity": round(math.exp(float(nll.mean())), 4),
        "vs_float32_pct": round(100 * math.expm1(float(diff.mean())), 4),
        "noise_pct": round(100 * 2 * stderr, 4),
        "top1_equal_share": round(float((best == ref_best).float().mean()), 5),
        "greedy_equal_share": round(float(equal.float().mean()), 4),
        "greedy_equal_prefix_mean": round(float(prefix.mean()), 2),
    }


def _rounded_to_groups(model, bits: int, group: int = 64) -> None:
    """Round every block's weight matrix to `bits`-bit uniform groups (min/max per group), in place."""
    levels = 2**bits - 1
    for name, param in model.named_parameters():
        if param.dim() != 2 or "layers." not in name or param.shape[1] % group:
            continue
        g = param.data.view(param.shape[0], -1, group)
        low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        step = (high - low).clamp(min=1e-12) / levels
        g.copy_(torch.round((g - low) / step) * step + low)


def quality(
    model_dir: Path,
    server_args: list[str],
    max_tokens: Optional[int] = None,
    count: int = 64,
    new_tokens: int = 64,
    setups: tuple[str, ...] = tuple(quant.SETUPS),
    wires: tuple[str, ...] = WIRES,
) -> dict:
    """(q) on the trained model at model_dir (setups: server formats, float32 first; wires: the
    client's formats, on the float32 servers; max_tokens: of the validation text, by default the
    tokens its recorded perplexity is over)."""
    from transformers import AutoModelForCausalLM

    from petals_like.models import trained

    record = trained.read_training_record(model_dir)
    windows = validation(model_dir, max_tokens or record["validation_tokens"])
    prompt_len = min(64, windows.shape[1] - new_tokens)

    def measure(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return *window_nll(model, windows), continuations(model, windows, count, prompt_len, new_tokens)

    measured: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    servers: dict = {}
    step_bytes: dict[str, int] = {}  # bytes the client sends per decode step, by wire format
    for setup in setups:
        args = quant.SETUPS[setup]
        try:
            quant.weight_bytes_of(model_dir, setup)
        except ValueError as e:
            servers[setup] = {"refused": str(e)}
            continue
        with BenchSwarm(model_dir, server_args + args) as swarm:
            if setup == "float32":
                for wire in wires:
                    swarm.model.config.wire = wire
                    measured[f"wire_{wire}"] = measure(swarm.model)
                    step_bytes[wire] = quant.prefill_and_step(swarm.model, windows[:1, :prompt_len])[3]
                swarm.model.config.wire = None
            measured[setup] = measure(swarm.model)
    reference = measured["float32"]
    for setup in setups:
        if setup in measured:
            servers[setup] = compare(measured[setup], reference)
    wire_results = {wire: compare(measured[f"wire_{wire}"], reference) for wire in wires}
    for wire, entry in wire_results.items():
        entry["bytes_per_decode_step"] = step_bytes[wire]
        entry["step_bytes_vs_float32"] = round(step_bytes[wire] / step_bytes["float32"], 3)

    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    exact = measure(local)
    floor = compare(exact, reference)  # the same model and weights, another program
    _rounded_to_groups(local, SANITY_BITS)
    sanity = compare(measure(local), exact)
    return {
        "model": str(model_dir),
        "validation_tokens": int(windows[:, 1:].numel()),
        "windows": list(windows.shape),
        "continuations": {"count": count, "prompt_tokens": prompt_len, "new_tokens": new_tokens},
        "servers": servers,
        "wires": wire_results,
        "recorded_validation_perplexity": round(record["validation_perplexity"], 4),
        "local_float32": floor,
        f"sanity_{SANITY_BITS}bit_groups_local": sanity,
    }

"""The baseline workloads of the benchmark: one session and one prefill through the bench swarm, and the
same model in one process.

(a) one session through the 2-server swarm: tokens/s, p50 / p90 per-token latency (BenchSwarm.one_session)
(b) prefill of a prompt through the swarm: seconds (BenchSwarm.prefill, median and best over rounds)
(c) the same model in one process: transformers generate(), and this project's block math without any
    network: tokens/s
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

import torch

from petals_like.bench.harness import BenchSwarm, LocalSession, TokenTimer, summarize


def swarm_prefill(swarm: BenchSwarm, prefill_len: int, rounds: int) -> dict:
    """(b): the first prefill warms up (routes, streams); the median and best of the next `rounds`."""
    times = [swarm.prefill(prefill_len) for _ in range(rounds + 1)][1:]
    return {
        "tokens": prefill_len,
        "seconds": round(statistics.median(times), 3),
        "best_seconds": round(min(times), 3),
    }


def local_runners(model_dir: Path, prompt: torch.Tensor, new_tokens: int) -> dict[str, Callable[[], dict]]:
    """(c): transformers generate() and this project's block math, both in this process, no network."""
    from transformers import AutoModelForCausalLM

    from petals_like.client.generation import TokenChooser, generate_tokens
    from petals_like.models.checkpoint import CheckpointReader
    from petals_like.models.llama.head import LocalModules
    from petals_like.models.spec import ModelSpec
    from petals_like.server.loading import load_span

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    spec = ModelSpec.from_pretrained(model_dir)
    span = load_span(model_dir, spec, 0, spec.num_blocks, torch.float32, torch.device("cpu"), progress=False)
    local = LocalModules.from_state_dict(spec, CheckpointReader(model_dir).client_state_dict(torch.float32)).eval()

    def run_hf() -> dict:
        timer = TokenTimer()
        with torch.inference_mode():
            hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=timer)
        return summarize(timer.latencies()[1:])  # transformers' streamer also receives the prompt first

    def run_ours() -> dict:
        timer = TokenTimer()
        session = LocalSession(span, prompt.shape[1] + new_tokens)
        with torch.inference_mode():
            generate_tokens(
                session,
                local.embed,
                local.logits,
                prompt,
                pad_lens=None,
                max_new_tokens=new_tokens,
                chooser=lambda _: TokenChooser(),  # greedy
                eos_token_ids=[],
                pad_token_id=0,
                streamer=timer,
            )
        return summarize(timer.latencies())

    return {"transformers_generate": run_hf, "block_math_no_network": run_ours}

"""Fine-tuning workload of the benchmark: LoRA training steps through the swarm vs. local PEFT.

(m) seconds per training step (batch 4 x 128 tokens, LoRA rank 8 on q_proj and v_proj, AdamW):
    forward with labels, backward, optimizer step. Through the bench swarm (2 servers, 1 chain),
    through a swarm of 4 servers (two per half of the blocks) with 1 and with 2 chains at once
    (num_chains), and with transformers + peft in this process; the ratios distributed / local.
    Local steps run in the same rounds as each swarm's steps, and each ratio uses those.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from petals_like.bench.harness import BenchSwarm

BATCH, SEQ_LEN = 4, 128
LR = 1e-4


def _lora_config() -> Any:
    """A peft.LoraConfig; the same for the swarm and the local model."""
    import peft

    return peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def _batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(4, vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(7))


def _trainer(model: torch.nn.Module, params: list[torch.nn.Parameter], input_ids: torch.Tensor) -> Callable[[], float]:
    """A function running one training step and returning its seconds; the same code for the swarm
    and the local model, so the two differ only in what model() does."""
    optimizer = torch.optim.AdamW(params, lr=LR)

    def step() -> float:
        started = time.perf_counter()
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - started

    return step


def _stats(times: list[float]) -> dict:
    return {
        "median_s": round(statistics.median(times), 3),
        "mean_s": round(statistics.mean(times), 3),
        "min_s": round(min(times), 3),
        "steps": len(times),
    }


def _local_trainer(model_dir: Path, input_ids: torch.Tensor) -> tuple[Callable[[], float], int]:
    """transformers + peft in this process: (step, number of trainable parameters)."""
    import peft
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), _lora_config())
    params = [p for p in model.parameters() if p.requires_grad]
    return _trainer(model, params, input_ids), sum(p.numel() for p in params)


def _swarm_steps(
    swarm: BenchSwarm, input_ids: torch.Tensor, steps: int, chains: tuple[int, ...], local_step: Callable[[], float]
) -> dict:
    """Steps with each num_chains in `chains` and local steps, interleaved in rounds, so that machine
    noise (other processes, the servers' background work) hits every setting alike."""
    model = swarm.model
    model.add_lora(_lora_config())
    step = _trainer(model, model.trainable_parameters(), input_ids)
    local_times: list[float] = []
    times: dict[int, list[float]] = {n: [] for n in chains}
    used: dict[int, int] = {}
    uploads: dict[int, list[int]] = {n: [] for n in chains}
    for round_index in range(steps + 1):
        local_seconds = local_step()
        if round_index > 0:  # round 0 is the warm-up: routes found, connections opened, optimizer state made
            local_times.append(local_seconds)
        for n in chains:
            model.config.num_chains = n
            before = model.remote.lora_uploads, model.remote.lora_upload_bytes
            seconds = step()
            used[n] = model.remote.last_chains
            if round_index > 0:
                times[n].append(seconds)
                uploads[n].append((model.remote.lora_uploads - before[0], model.remote.lora_upload_bytes - before[1]))
    local = statistics.median(local_times)
    result: dict = {"local_peft": _stats(local_times)}
    for n in chains:
        result[f"{n}_chain" + ("s" if n > 1 else "")] = dict(
            _stats(times[n]),
            vs_local=round(statistics.median(times[n]) / local, 3),
            last_chains=used[n],
            lora_uploads_per_step=round(statistics.mean(u for u, _ in uploads[n]), 2),
            lora_bytes_sent_per_step=int(statistics.mean(b for _, b in uploads[n])),
        )
    return result


def training_steps(model_dir: Path, server_args: list[str], steps: int = 3) -> dict:
    """(m)"""
    from petals_like.models.spec import ModelSpec

    spec = ModelSpec.from_pretrained(model_dir)
    half = spec.num_blocks // 2
    input_ids = _batch(spec.vocab_size)
    local_step, local_params = _local_trainer(model_dir, input_ids)
    result: dict = {
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "optimizer": "AdamW",
        "lora": {"r": 8, "lora_alpha": 16, "targets": ["q_proj", "v_proj"], "trainable_params": local_params},
    }
    with BenchSwarm(model_dir, server_args) as swarm:
        result["swarm_2_servers"] = _swarm_steps(swarm, input_ids, steps, (1,), local_step)
        result["lora"]["weight_bytes"] = sum(p.nbytes for p in swarm.model.lora.parameters())
    spans = [f"0:{half}", f"{half}:{spec.num_blocks}"] * 2
    with BenchSwarm(model_dir, server_args, spans=spans, client_args={"num_chains": 2}) as swarm:
        result["swarm_4_servers"] = _swarm_steps(swarm, input_ids, steps, (1, 2), local_step)
    result["vs_local"] = {  # distributed / local seconds per step, each vs. the local steps of the same rounds
        "2_servers_1_chain": result["swarm_2_servers"]["1_chain"]["vs_local"],
        "4_servers_1_chain": result["swarm_4_servers"]["1_chain"]["vs_local"],
        "4_servers_2_chains": result["swarm_4_servers"]["2_chains"]["vs_local"],
    }
    return result

"""The benchmark's workloads as a table, WORKLOADS (letter -> Workload), that `python -m petals_like.cli.bench`
loops over.

A Workload names its letter, the key of its result in the report, what it needs, and the function to call
with the run's settings (a Bench):
- SHARED_SWARM: the bench swarm (2 servers, half of the blocks each) that the CLI starts once for every
  workload that needs it, as Bench.swarm; they run while it is up, in the table's order;
- OWN_SWARM: starts and stops swarms of its own (or a network test bed), after the shared one is stopped;
- NOTHING: runs in this process.
`rounds` marks (a) and (c): their function returns runners (one, or a dict of named ones) that the CLI runs
in interleaved rounds after a warm-up, reporting each runner's median round; the others return their result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from petals_like.bench import api, baseline, engine, finetune, moe, network, overhead, quality, quant, routing, speculative
from petals_like.bench.harness import BenchSwarm

SHARED_SWARM, OWN_SWARM, NOTHING = "shared_swarm", "own_swarm", "nothing"


@dataclass
class Bench:
    """One run's settings, and the shared swarm while it is up."""

    preset: str
    model_dir: Path  # the checkpoint the workloads use (made before they run)
    asked_model_dir: Optional[Path]  # --model_dir as given: without it, (n) makes a 6-block model of the preset
    server_args: list[str]  # extra run_server arguments for every swarm
    prompt: torch.Tensor
    new_tokens: int
    prefill_len: int
    repeats: int
    swarm: Optional[BenchSwarm] = None


@dataclass(frozen=True)
class Workload:
    letter: str
    key: str  # the report's key for its result
    needs: str  # SHARED_SWARM, OWN_SWARM or NOTHING
    run: Callable[[Bench], Any]
    rounds: bool = False


def _sessions_in_small_pool(b: Bench) -> dict:
    with BenchSwarm(b.model_dir, b.server_args + ["--kv_cache_tokens", "4096"]) as small:
        return engine.sessions_in_pool(small.model)


_TABLE = [
    Workload(
        "a", "a_swarm_one_session", SHARED_SWARM, lambda b: lambda: b.swarm.one_session(b.prompt, b.new_tokens), rounds=True
    ),
    Workload("b", "b_swarm_prefill", SHARED_SWARM, lambda b: baseline.swarm_prefill(b.swarm, b.prefill_len, b.repeats)),
    Workload("c", "c_local", NOTHING, lambda b: baseline.local_runners(b.model_dir, b.prompt, b.new_tokens), rounds=True),
    Workload("d", "d_concurrent_sessions", SHARED_SWARM, lambda b: engine.concurrent_sessions(b.swarm.model, rounds=b.repeats)),
    Workload("e", "e_decode_during_prefill", SHARED_SWARM, lambda b: engine.decode_during_prefill(b.swarm.model)),
    Workload("f", "f_shared_prefix", SHARED_SWARM, lambda b: engine.shared_prefix(b.swarm.model)),
    Workload("p", "p_multiplexed_sessions", SHARED_SWARM, lambda b: engine.multiplexed_sessions(b.swarm, rounds=b.repeats)),
    Workload("g", "g_sessions_in_4096_token_pool", OWN_SWARM, _sessions_in_small_pool),
    Workload("h", "h_push_latency", OWN_SWARM, lambda b: routing.push_latency(b.model_dir, b.server_args)),
    Workload("i", "i_failover_recovery", OWN_SWARM, lambda b: routing.failover_recovery(b.model_dir, b.server_args)),
    Workload("j", "j_forward_spread", OWN_SWARM, lambda b: routing.forward_spread(b.model_dir, b.server_args)),
    Workload("k", "k_quantized_servers", OWN_SWARM, lambda b: quant.quantized_servers(b.model_dir, b.server_args)),
    Workload("l", "l_wire_formats", OWN_SWARM, lambda b: quant.wire_formats(b.model_dir, b.server_args)),
    Workload("q", "q_quality", OWN_SWARM, lambda b: quality.quality(quality.trained_model_dir(), b.server_args)),
    Workload("r", "r_mixture_of_experts", OWN_SWARM, lambda b: moe.moe_servers(b.preset, b.server_args)),
    Workload("t", "t_per_token_overhead", OWN_SWARM, lambda b: overhead.per_token_overhead(b.server_args, rounds=b.repeats)),
    Workload("s", "s_speculative", OWN_SWARM, lambda b: speculative.speculative_chain(b.server_args)),
    Workload("m", "m_training_step", OWN_SWARM, lambda b: finetune.training_steps(b.model_dir, b.server_args)),
    Workload(
        "o", "o_openai_api", SHARED_SWARM, lambda b: api.api_vs_python(b.swarm.model, b.model_dir, rounds=max(b.repeats, 3))
    ),
    Workload(
        "n",
        "n_network_chains",
        OWN_SWARM,
        lambda b: network.network_chains(
            b.preset, b.server_args, model_dir=b.asked_model_dir, prefill_len=b.prefill_len, rounds=b.repeats
        ),
    ),
]
WORKLOADS: dict[str, Workload] = {w.letter: w for w in _TABLE}

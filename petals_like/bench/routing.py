"""Routing workloads of the benchmark (push, fail-over, load spreading), each on its own swarm.

(h) one session on a 3-server chain (blocks 0:5, 5:10, 10:16): p50 / p90 per-token latency with
    push (servers pass outputs on directly) and without (the client relays every hop), on
    loopback and with the client behind an emulated 20 ms round trip (10 ms added to each
    message between the client and a server, in the client's transport; servers stay close)
(i) a session on 0:5, 5:10 (+ a replica), 10:16 whose middle server is killed (SIGKILL, with
    its p2p daemon) mid-generation: the extra time of the step that fails over, vs. a normal step
(j) 8 clients each running forward passes over 2 equal replicas of all blocks: the share of
    requests each replica serves
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from pathlib import Path

import torch

from petals_like.bench.harness import BenchSwarm, TokenTimer, percentile, prompt
from petals_like.client.transport import InferenceStream
from petals_like.models.spec import ModelSpec


def _latencies(model, new_tokens: int, seed: int) -> list[float]:
    timer = TokenTimer()
    with model.inference_session(max_length=16 + new_tokens, reuse_prefix=False) as session:
        model.generate(prompt(16, seed), max_new_tokens=new_tokens, session=session, eos_token_id=[], streamer=timer)
    return timer.latencies()[1:]


def _thirds(model_dir: Path) -> tuple[str, str, str]:
    """A 3-server chain: 0:5, 5:10, 10:16 on the 16-block bench model, in proportion on others."""
    n = ModelSpec.from_pretrained(model_dir).num_blocks
    a, b = round(n * 5 / 16), round(n * 10 / 16)
    return f"0:{a}", f"{a}:{b}", f"{b}:{n}"


def _whole(model_dir: Path) -> str:
    return f"0:{ModelSpec.from_pretrained(model_dir).num_blocks}"


class _ClientLinkDelay:
    """Adds `delay` seconds to every step the client's inference streams send (on their own stream
    or on the mux) and to every answer they read."""

    def __init__(self) -> None:
        self.delay = 0.0
        self._send, self._read = InferenceStream.send_step, InferenceStream.read_step

    def __enter__(self) -> _ClientLinkDelay:
        link = self

        async def send(stream, hidden, step):
            if link.delay:
                await asyncio.sleep(link.delay)
            return await link._send(stream, hidden, step)

        async def read_step(stream, position, *, timeout):
            message = await link._read(stream, position, timeout=timeout)
            if link.delay:
                await asyncio.sleep(link.delay)
            return message

        InferenceStream.send_step, InferenceStream.read_step = send, read_step
        return self

    def __exit__(self, *exc) -> None:
        InferenceStream.send_step, InferenceStream.read_step = self._send, self._read


def push_latency(model_dir: Path, server_args: list[str], new_tokens: int = 48, rounds: int = 3) -> dict:
    """(h)"""
    with BenchSwarm(model_dir, server_args, spans=list(_thirds(model_dir))) as swarm, _ClientLinkDelay() as link:
        model = swarm.model
        _latencies(model, 8, 0)  # warm-up: routes, pings, streams
        result = {}
        for delay_ms in (0, 10):
            link.delay = delay_ms / 1000
            samples: dict[bool, list[float]] = {True: [], False: []}
            for round_index in range(rounds):  # interleaved, so machine noise hits both alike
                for push in (True, False):
                    model.config.use_push = push
                    samples[push] += _latencies(model, new_tokens, round_index)
            entry = {}
            for push, name in ((True, "push"), (False, "client_relays")):
                lat = samples[push]
                entry[name] = {"p50_ms": round(1000 * statistics.median(lat), 2), "p90_ms": round(1000 * percentile(lat, 0.9), 2)}
            entry["p50_ratio_push_vs_relay"] = round(entry["push"]["p50_ms"] / entry["client_relays"]["p50_ms"], 3)
            result["loopback" if delay_ms == 0 else f"client_rtt_{2 * delay_ms}ms"] = entry
        return result


def failover_recovery(model_dir: Path, server_args: list[str], new_tokens: int = 48, kill_after: int = 16) -> dict:
    """(i)"""
    first, middle, last = _thirds(model_dir)
    with BenchSwarm(model_dir, server_args, spans=[first, middle, middle, last], client_args={"ban_timeout": 600}) as swarm:
        model = swarm.model
        _latencies(model, 8, 0)

        def kill_middle(session) -> None:
            victim = session._chain[1].span.peer_id
            swarm.kill(swarm.servers[swarm.server_peer_ids.index(victim)])

        class KillingTimer(TokenTimer):
            def put(self, tokens: torch.Tensor) -> None:
                super().put(tokens)
                if len(self.times) == kill_after + 1:
                    kill_middle(session)

        timer = KillingTimer()
        with model.inference_session(max_length=16 + new_tokens, reuse_prefix=False) as session:
            model.generate(prompt(16, 1), max_new_tokens=new_tokens, session=session, eos_token_id=[], streamer=timer)
            failovers = session.num_failovers
            # the replacement of the killed span got its input history replayed as its first step
            replayed = session._chain[1].history[0].shape[1] if failovers else 0
        lat = timer.latencies()
        failed_step = lat[kill_after + 1]
        normal = statistics.median(lat[1 : kill_after + 1] + lat[kill_after + 3 :])
        return {
            "failovers": failovers,
            "failover_step_ms": round(1000 * failed_step, 1),
            "normal_step_ms": round(1000 * normal, 1),
            "recovery_s": round(failed_step - normal, 3),
            "tokens_replayed": replayed,
        }


def forward_spread(model_dir: Path, server_args: list[str], clients: int = 8, calls: int = 10) -> dict:
    """(j)"""
    from petals_like import AutoDistributedModelForCausalLM
    from petals_like.wire import call_info

    # equal by construction: a measured throughput differs between two starts by machine noise
    with BenchSwarm(model_dir, server_args + ["--throughput", "100"], spans=[_whole(model_dir)] * 2) as swarm:
        models = [
            AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.peers, torch_dtype="float32")
            for _ in range(clients - 1)
        ]
        models.append(swarm.model)
        try:

            def counts() -> list[int]:
                model = swarm.model
                return [
                    model.node.run(call_info(model.node.p2p, peer, timeout=10), timeout=20).forward_calls
                    for peer in swarm.server_peer_ids
                ]

            before = counts()
            input_ids = prompt(16, 2)

            def run(model) -> None:
                with torch.no_grad():
                    for _ in range(calls):
                        model(input_ids)

            threads = [threading.Thread(target=run, args=(m,)) for m in models]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - started
            served = [b - a for a, b in zip(before, counts())]
        finally:
            for model in models[:-1]:
                model.shutdown()
        total = sum(served)
        return {
            "requests": total,
            "per_replica": served,
            "shares": [round(s / total, 3) for s in served],
            "seconds": round(wall, 2),
        }

"""Self-balancing on real local swarms: join choices, moves after servers leave, throughput caching."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from petals_like import AutoDistributedModelForCausalLM
from petals_like.dht.records import default_dht_prefix
from petals_like.server import throughput as throughput_module
from tests.swarm import start_swarm, wait_until

NUM_BLOCKS = 8


def servers_per_block(swarm, tiny_model: Path) -> list[int]:
    spans = swarm.spans(default_dht_prefix(tiny_model), NUM_BLOCKS)
    return [sum(1 for s in spans.values() if s.start <= b < s.end) for b in range(NUM_BLOCKS)]


def test_servers_joining_one_after_another_cover_every_block_twice(tiny_model: Path):
    swarm = start_swarm()
    try:
        for _ in range(4):
            swarm.add_server(tiny_model, None, num_blocks=4, join_delay=0.0)
        assert sorted((s.start_block, s.end_block) for s in swarm.servers) == [(0, 4), (0, 4), (4, 8), (4, 8)]
        wait_until(
            lambda: servers_per_block(swarm, tiny_model) == [2] * NUM_BLOCKS,
            30,
            message="every block announced by exactly 2 servers",
        )
    finally:
        swarm.shutdown()


def test_servers_move_to_cover_a_half_that_lost_its_servers(tiny_model: Path, reference):
    swarm = start_swarm()
    model = None
    try:
        for span in ("0:4", "0:4"):  # pinned: they never move
            swarm.add_server(tiny_model, span)
        movers = [
            swarm.add_server(
                tiny_model, None, num_blocks=4, join_delay=0.0, balance_period=1.0, expiration=10.0, announce_period=2.0
            )
            for _ in range(2)
        ]
        assert all((s.start_block, s.end_block) == (4, 8) for s in movers)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            tiny_model, initial_peers=swarm.peers, torch_dtype="float32", connect_timeout=60
        )
        input_ids = torch.tensor([[1, 80, 81, 82]])
        expected = reference.generate(input_ids, max_new_tokens=48, do_sample=False)
        result: dict = {}

        def generate() -> None:
            try:
                result["tokens"] = model.generate(input_ids, max_new_tokens=48)
            except BaseException as e:  # reported by the main thread
                result["error"] = e

        pinned = swarm.servers[:2]
        # swap roles: the pinned servers leave 0:4, the movers (on 4:8) must cover it again
        thread = threading.Thread(target=generate)
        thread.start()
        for server in pinned:
            server.shutdown()
        wait_until(
            lambda: all(n >= 1 for n in servers_per_block(swarm, tiny_model)),
            30,
            message="every block served again after the re-balancing",
        )
        thread.join(120)
        assert "error" not in result, result.get("error")
        assert torch.equal(result["tokens"], expected)
        wait_until(
            lambda: sorted((s.start_block, s.end_block) for s in movers) == [(0, 4), (4, 8)], 30, message="one mover on each half"
        )
        assert sum(s.balancer.moves for s in movers) >= 1
    finally:
        if model is not None:
            model.shutdown()
        swarm.shutdown()


def test_throughput_is_measured_once_cached_and_refreshed_by_eval(tiny_model: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(throughput_module, "CACHE_DIR", tmp_path)
    calls = []
    real_measure = throughput_module.measure

    def counting_measure(span, **kwargs):
        calls.append(len(span.blocks))
        return real_measure(span, **kwargs)

    monkeypatch.setattr(throughput_module, "measure", counting_measure)
    swarm = start_swarm()
    try:
        first = swarm.add_server(tiny_model, "0:4", throughput="auto")
        cache = json.loads((tmp_path / throughput_module.CACHE_FILE).read_text())
        assert len(calls) == 1 and len(cache) == 1
        (rates,) = cache.values()
        assert set(rates) == {"inference_block_steps", "forward_block_tokens"}
        # the announced throughput comes from the cached rates (compute or network, whichever is slower)
        expected = throughput_module.Rates(**rates).throughput(4, first.spec.hidden_size, first.config.network_mbps)
        assert first.throughput == pytest.approx(expected)
        second = swarm.add_server(tiny_model, "4:8", throughput="auto")  # same setup: the cached rates
        assert len(calls) == 1 and second.throughput == pytest.approx(first.throughput)
        swarm.add_server(tiny_model, "0:8", throughput="eval")  # measured again, cache overwritten
        assert len(calls) == 2
        assert json.loads((tmp_path / throughput_module.CACHE_FILE).read_text()) != cache
    finally:
        swarm.shutdown()

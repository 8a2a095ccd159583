"""What a flood of fake servers costs a client and the dashboard: `python -m tests.flood_cost` prints JSON.

A local swarm of the tiny model (two servers, 0:4 and 4:8): three fresh clients in turn generate 16
tokens and refresh their view once, and a dashboard reader reads twice; then the hostile node of
tests/hostile.py stores 1,000 fake servers claiming every block, and the same runs again.
docs/security.md has the numbers. Not a test: it asserts nothing, it measures.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hivemind.utils.timed_storage import get_dht_time

from petals_like import AutoDistributedModelForCausalLM
from petals_like.dashboard.reader import SwarmReader
from petals_like.data_structures import ServerInfo, ServerState
from petals_like.dht.node import SwarmNode
from petals_like.dht.records import MODELS_KEY, ModelInfo, block_key, model_record
from petals_like.models.tiny import make_tiny_model
from petals_like.testing.local_swarm import LocalSwarm
from tests.hostile import LOCALHOST, HostileNode, make_fake_servers

NUM_FAKES = 1000
ROUNDS = 3


def client_round(model_dir: Path, peers: list[str]) -> dict[str, float]:
    started = time.perf_counter()
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=peers, torch_dtype="float32")
    try:
        joined = time.perf_counter()
        model.generate(torch.tensor([[1, 17, 42, 99]]), max_new_tokens=16)
        generated = time.perf_counter()
        model.node.run(model.routes.refresh(force=True))
        return {
            "join_s": joined - started,
            "first_generate_s": generated - joined,
            "refresh_s": time.perf_counter() - generated,
            "pings_sent": model.routes.pings.sent,
            "servers_seen": len(model.routes.spans),
            "banned": len(model.routes.banned()),
        }
    finally:
        model.shutdown()


def dashboard_reads(peers: list[str]) -> dict[str, Any]:
    node = SwarmNode(peers, host_maddrs=LOCALHOST, client_mode=True, name="dashboard")
    try:
        reader, seconds = SwarmReader(node, rpc_timeout=2.0), []
        for _ in range(2):
            started = time.perf_counter()
            state = reader.read()
            seconds.append(time.perf_counter() - started)
    finally:
        node.shutdown()
    (view,) = [m for m in state["models"] if m["dht_prefix"] == "tiny-llama"]
    return {"read_s": seconds, "servers_by_status": view["servers_by_status"], "healthy": view["healthy"]}


def measure(model_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with LocalSwarm(model_dir, spans=["0:4", "4:8"], server_args=["--throughput", "1"]) as swarm:
        result["clean"] = [client_round(model_dir, swarm.peers) for _ in range(ROUNDS)]
        result["clean_dashboard"] = dashboard_reads(swarm.peers)
        hostile = HostileNode(swarm.peers)
        try:
            record = ServerInfo(ServerState.ONLINE, 0, 8, throughput=1e6, cache_tokens_left=10**6).to_record()
            records = {block_key("tiny-llama", i): record for i in range(8)}
            records[MODELS_KEY] = model_record("tiny-llama", ModelInfo(8))
            started = time.perf_counter()
            fakes = make_fake_servers(NUM_FAKES, records, get_dht_time() + 1200)
            result["attacker_identities_s"] = time.perf_counter() - started
            entries = [entry for _, signed in fakes for entry in signed]
            honest = [swarm.peers[0].rsplit("/p2p/", 1)[1], *swarm.server_peer_ids]
            started = time.perf_counter()
            for start in range(0, len(entries), 500):
                hostile.store_many(honest, entries[start : start + 500])
            result["attacker_store_s"] = time.perf_counter() - started
            result["flooded"] = [client_round(model_dir, swarm.peers) for _ in range(ROUNDS)]
            result["flooded_dashboard"] = dashboard_reads(swarm.peers)
        finally:
            hostile.shutdown()
    for name in ("clean", "flooded"):
        rounds = result[name]
        result[f"{name}_median"] = {field: statistics.median(r[field] for r in rounds) for field in rounds[0]}
    return result


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure(make_tiny_model(Path(tmp) / "tiny-llama")), indent=1))


if __name__ == "__main__":
    main()

"""Helpers that start real swarms on 127.0.0.1 for tests and clean up everything they started: servers in
this process (start_swarm); run_server processes are started with petals_like.testing.local_swarm.LocalSwarm."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from petals_like.client.transport import call_forward
from petals_like.config import ServerConfig
from petals_like.data_structures import RemoteSpanInfo
from petals_like.dht.announce import get_block_infos
from petals_like.dht.node import SwarmNode
from petals_like.dht.records import compute_spans
from petals_like.server.server import Server
from petals_like.testing.processes import live_descendants, p2pd_children, reap  # noqa: F401 (p2pd_children: for tests)

LOCALHOST = ["/ip4/127.0.0.1/tcp/0"]
HIDDEN = 64  # hidden size of the tiny preset


def forward(client: SwarmNode, span: RemoteSpanInfo, hidden: torch.Tensor, pad_lens=None) -> torch.Tensor:
    """One rpc_forward of `hidden` through `span`, from a client node."""
    return client.run(call_forward(client.p2p, span, hidden, pad_lens, timeout=30))


def assert_still_serves(client: SwarmNode, span: RemoteSpanInfo) -> None:
    """After whatever a test sent it, the server still answers a good forward call."""
    out = forward(client, span, torch.randn(1, 3, HIDDEN))
    assert out.shape == (1, 3, HIDDEN) and torch.isfinite(out).all()


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout} s: {message or condition}")
        time.sleep(interval)


def kill_new_descendants(before: set[int]) -> list[int]:
    """Kill (by PID) every live process below this one that is not in `before` and has not exited
    within a few seconds; returns their PIDs (empty: whatever was started was also stopped)."""
    return reap([p for p in live_descendants() if p.pid not in before], grace=5)


@dataclass
class Swarm:
    dht: SwarmNode
    servers: list[Server] = field(default_factory=list)

    @property
    def peers(self) -> list[str]:
        return self.dht.visible_maddrs()

    def spans(self, dht_prefix: str, num_blocks: int) -> dict:
        infos = self.dht.run(get_block_infos(self.dht.dht, dht_prefix, range(num_blocks)))
        return compute_spans(infos)

    def add_server(self, model: Path, block_indices: str, **kwargs) -> Server:
        kwargs.setdefault("host_maddrs", LOCALHOST)
        config = ServerConfig(
            model=model,
            initial_peers=self.peers,
            block_indices=block_indices,
            device="cpu",
            progress=False,
            throughput=kwargs.pop("throughput", 1.0),
            **kwargs,
        )
        server = Server(config).start()
        self.servers.append(server)
        return server

    def wait_for_blocks(self, dht_prefix: str, num_blocks: int, timeout: float = 30) -> None:
        def covered() -> bool:
            spans = self.spans(dht_prefix, num_blocks)
            return all(any(s.start <= b < s.end for s in spans.values()) for b in range(num_blocks))

        wait_until(covered, timeout, message=f"all {num_blocks} blocks of {dht_prefix} announced")

    def shutdown(self) -> None:
        for server in self.servers:
            server.shutdown()
        self.dht.shutdown()


def start_swarm(model: Optional[Path] = None, ranges: Sequence[str] = (), **server_kwargs) -> Swarm:
    swarm = Swarm(SwarmNode(host_maddrs=LOCALHOST, name="test-dht"))
    try:
        for block_indices in ranges:
            swarm.add_server(model, block_indices, **server_kwargs)
    except BaseException:
        swarm.shutdown()
        raise
    return swarm


@contextlib.contextmanager
def running_swarm(model: Path, ranges: Sequence[str], **server_kwargs) -> Iterator[Swarm]:
    """start_swarm, wait until every block of the model is announced, and shut it all down after,
    also when the test fails."""
    from petals_like.dht.records import default_dht_prefix
    from petals_like.models.spec import ModelSpec

    swarm = start_swarm(model, ranges, **server_kwargs)
    try:
        swarm.wait_for_blocks(default_dht_prefix(model), ModelSpec.from_pretrained(model).num_blocks)
        yield swarm
    finally:
        swarm.shutdown()


def loss_and_input_grads(model, reference, input_ids, labels):
    """(distributed output, its input-embedding gradient, oracle output, the oracle's gradient)."""
    embeds = model.local.embed(input_ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=labels)
    out.loss.backward()
    ref_embeds = reference.model.embed_tokens(input_ids).detach().requires_grad_(True)
    ref = reference(inputs_embeds=ref_embeds, labels=labels)
    ref.loss.backward()
    return out, embeds.grad, ref, ref_embeds.grad

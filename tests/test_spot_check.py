"""Spot checks: a server that corrupts its outputs is caught and banned; honest ones, quantized or not, never are."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Iterator

import pytest
import torch

from petals_like import AutoDistributedModelForCausalLM
from petals_like.client.spot_check import SpotChecker, SpotCheckFailed, tolerance
from petals_like.config import ClientConfig
from petals_like.data_structures import RemoteSpanInfo, ServerInfo, ServerState
from petals_like.dht.records import default_dht_prefix
from tests.swarm import Swarm, start_swarm

NUM_BLOCKS = 8
CORRUPTION = 1.5  # the liar scales its last block's output: 50% relative error


# ---- the verdict logic, without a network ----


class FakeRoutes:
    def __init__(self, spans: dict[str, RemoteSpanInfo]):
        self.spans = spans
        self.bans: dict[str, float] = {}

    def banned(self) -> set[str]:
        return set(self.bans)

    def ban(self, peer_id: str, reason: str, duration: float | None = None) -> None:
        self.bans[peer_id] = duration


def span(peer: str, start: int = 0, end: int = 4, quant_type: str = "none") -> RemoteSpanInfo:
    return RemoteSpanInfo(peer, start, end, ServerInfo(ServerState.ONLINE, start, end, quant_type=quant_type))


def checker(*spans: RemoteSpanInfo) -> tuple[SpotChecker, FakeRoutes]:
    routes = FakeRoutes({s.peer_id: s for s in spans})
    return SpotChecker(routes, ClientConfig(spot_check=1.0), random.Random(0)), routes  # type: ignore[arg-type]


def answers(truth: torch.Tensor, liars: set[str], asked: list[str]):
    async def run_on(other: RemoteSpanInfo) -> torch.Tensor:
        asked.append(other.peer_id)
        return truth * CORRUPTION if other.peer_id in liars else truth

    return run_on


def verify(spot: SpotChecker, checked: RemoteSpanInfo, answer: torch.Tensor, run_on) -> None:
    asyncio.run(spot.verify(checked, answer, run_on))


def test_an_honest_answer_is_confirmed_by_one_other_server():
    truth = torch.randn(1, 3, 16)
    spot, routes = checker(span("a"), span("b"), span("c"))
    asked: list[str] = []
    verify(spot, span("a"), truth + 1e-7, answers(truth, set(), asked))
    assert len(asked) == 1 and not routes.bans and not spot.reports and spot.checks == 1


def test_a_lying_server_is_outvoted_banned_and_reported():
    truth = torch.randn(1, 3, 16)
    spot, routes = checker(span("liar"), span("b"), span("c"))
    with pytest.raises(SpotCheckFailed, match="spot check"):
        verify(spot, span("liar"), truth * CORRUPTION, answers(truth, set(), []))
    assert set(routes.bans) == {"liar"} and routes.bans["liar"] == ClientConfig().spot_check_ban
    (report,) = spot.reports
    assert report["peer_id"] == "liar" and report["relative_error"] > report["tolerance"]


def test_a_lying_verifier_is_banned_and_the_answer_stands():
    truth = torch.randn(1, 3, 16)
    spot, routes = checker(span("a"), span("liar"), span("c"))
    spot.rng = random.Random(1)  # seeded: the same verifier orders on every run
    for _ in range(20):  # whichever order the verifiers come in
        routes.bans.clear()
        verify(spot, span("a"), truth, answers(truth, {"liar"}, []))  # no SpotCheckFailed: the answer is right
        assert set(routes.bans) <= {"liar"}
    assert any(r["peer_id"] == "liar" for r in spot.reports)


def test_two_servers_that_disagree_with_no_third_blame_the_checked_one():
    truth = torch.randn(1, 3, 16)
    spot, routes = checker(span("a"), span("b"))
    with pytest.raises(SpotCheckFailed):
        verify(spot, span("a"), truth * CORRUPTION, answers(truth, set(), []))
    assert set(routes.bans) == {"a"}


def test_only_servers_hosting_every_checked_block_verify():
    truth = torch.randn(1, 3, 16)
    spot, routes = checker(span("a", 0, 4), span("part", 2, 8), span("wide", 0, 8))
    asked: list[str] = []
    verify(spot, span("a", 0, 4), truth, answers(truth, set(), asked))
    assert asked == ["wide"]
    spot, _ = checker(span("a", 0, 4), span("part", 2, 8))
    verify(spot, span("a", 0, 4), truth, answers(truth, set(), asked))
    assert spot.unverifiable == 1 and spot.checks == 0


def test_tolerance_follows_the_announced_formats():
    exact, int8, nf4 = (ServerInfo(ServerState.ONLINE, 0, 8, quant_type=q) for q in ("none", "int8", "nf4"))
    assert tolerance(exact, exact, 8) < 1e-3 < tolerance(exact, int8, 8) < 0.5 * (CORRUPTION - 1) < tolerance(exact, nf4, 8)
    assert tolerance(exact, exact, 8, wire="int8") > tolerance(exact, exact, 8)


# ---- real servers ----


@pytest.fixture(scope="module")
def swarm(tiny_model: Path) -> Iterator[Swarm]:
    """Two honest float32 servers, an honest int8 one, and a float32 one whose outputs can be corrupted."""
    swarm = start_swarm(tiny_model, ["0:8", "0:8"])
    try:
        swarm.add_server(tiny_model, "0:8", quant_type="int8")
        liar = swarm.add_server(tiny_model, "0:8")
        block = liar.handlers.backend.span.blocks[-1]
        honest = block.mlp_residual
        liar.corrupt = False

        def mlp_residual(*args, **kwargs):
            out = honest(*args, **kwargs)
            return out * CORRUPTION if liar.corrupt else out

        block.mlp_residual = mlp_residual
        swarm.wait_for_blocks(default_dht_prefix(tiny_model), NUM_BLOCKS)
        yield swarm
    finally:
        swarm.shutdown()


def peers(swarm: Swarm) -> tuple[str, str]:
    """(the int8 server, the corruptible one)"""
    return swarm.servers[2].node.peer_id, swarm.servers[3].node.peer_id


def client(tiny_model: Path, swarm: Swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_model, initial_peers=swarm.peers, torch_dtype="float32", spot_check=1.0
    )
    model.node.run(model.routes.refresh(force=True), timeout=30)
    return model


def test_honest_servers_with_different_formats_are_never_banned(swarm, tiny_model):
    int8_peer, _ = peers(swarm)
    model = client(tiny_model, swarm)
    spot = model.remote.spot_checker
    involved: list[bool] = []
    verify = spot.verify

    async def watched(checked, answer, run_on, **kwargs):
        async def run_and_note(other):
            involved.append(int8_peer in (checked.peer_id, other.peer_id))
            return await run_on(other)

        return await verify(checked, answer, run_and_note, **kwargs)

    spot.verify = watched
    try:
        for seed in range(3):
            ids = torch.randint(4, 300, (1, 6), generator=torch.Generator().manual_seed(seed))
            model.generate(ids, max_new_tokens=8)
            model(ids, labels=ids).loss.backward()
    finally:
        model.shutdown()
    assert spot.checks >= 3 * 9 and not spot.reports, spot.reports
    assert any(involved), "the int8 server never took part in a check"


def test_a_corrupting_server_is_caught_and_outputs_stay_exact(swarm, tiny_model, reference):
    int8_peer, liar_peer = peers(swarm)
    swarm.servers[3].corrupt = True
    model = client(tiny_model, swarm)
    spot = model.remote.spot_checker
    # the int8 server rounds: keep it out, so that every output can be compared token for token
    model.routes.ban(int8_peer, "kept out of this test", duration=3600)
    try:
        # a forward pass sent to the liar on purpose: caught on its first answer, then done elsewhere
        ids = torch.randint(4, 300, (2, 7), generator=torch.Generator().manual_seed(0))
        hidden = model.local.embed(ids)
        route = [model.routes.spans[liar_peer]]
        out, trace = model.node.run(model.remote.forward_range(0, NUM_BLOCKS, hidden, None, route=route), timeout=120)
        assert [r["peer_id"] for r in spot.reports] == [liar_peer]
        assert liar_peer not in [s.peer_id for s, _ in trace]
        with torch.no_grad():
            want = reference.model(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
            assert torch.allclose(reference.model.norm(out), want, atol=1e-4)

        # a fresh client meets the liar in generation: every output is still exact
        other = client(tiny_model, swarm)
        other.routes.ban(int8_peer, "kept out of this test", duration=3600)
        try:
            for seed in range(2):
                ids = torch.randint(4, 300, (1, 5), generator=torch.Generator().manual_seed(10 + seed))
                expected = reference.generate(ids, max_new_tokens=16, do_sample=False)
                assert torch.equal(other.generate(ids, max_new_tokens=16), expected)
            found = other.remote.spot_checker.reports
            assert [r["peer_id"] for r in found] == [liar_peer], found
            assert liar_peer in other.routes.banned()
        finally:
            other.shutdown()
    finally:
        swarm.servers[3].corrupt = False
        model.shutdown()

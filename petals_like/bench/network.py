"""Network workload of the benchmark: one swarm on a test bed of network namespaces (testing/netbed.py).

  (n) Hosts: a public bootstrap (DHT, the only relay), public servers s1, s2, s3, a server `home`
      behind NAT, a client behind NAT. Every access link adds LINK_DELAY_MS one way in each
      direction, so host to host is 2 x 10 = 20 ms one way (40 ms ping); the NAT hosts' uplinks
      (home, client) send at most 20 Mbit/s, public hosts are not capped. Model: the bench preset
      cut to 6 blocks, a third per server (0:2 on s1, 2:4 on s2 and on home, 4:6 on s3). Two chains,
      chosen with the client's allowed_servers: direct (s1, s2, s3) and relayed (s1, home, s3: the
      step is pushed s1 -> bootstrap -> home, and the client reads home's answers through the
      bootstrap). For each chain and wire format (float32, float16, int8), interleaved over rounds,
      one session per round: a 1-token step opens the chain, then a 512-token prefill step (seconds,
      median over rounds), then 32 decode steps (client embedding + chain + LM head: p50 / p90 over
      all rounds' steps). Then every delay and rate limit is taken off the same bed and processes,
      and the runs are repeated: "loopback", the compute and software floor.
      Targets: direct p50 / (one-way path delay of client -> s1 -> s2 -> s3 -> client, from pings,
      + loopback p50) <= 1.3; relayed minus direct p50 <= one round trip to the relay; int8 prefill
      >= 3x faster than float32 over the 20 Mbit/s uplink (given end to end and for the part above
      loopback, which is what the links cost). Beside the path, `last_answer` is the floor of this
      protocol: the client waits for every server's answer, and a server answers once its push is
      acknowledged, a round trip to the next server later (see _floors).

Each client runs in the client host: `python -m petals_like.cli.bench_network MODEL --initial_peers
... --servers ID ID ID` prints one line "RESULT {json}".
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from petals_like.bench.harness import BENCH_DIR, percentile

LINK_DELAY_MS = 10.0  # one way, each direction of every host's access link: 20 ms host to host
HOME_UPLINK_MBIT = 20.0  # what a host behind NAT (its router) may send
WIRES = ("float32", "float16", "int8")
SERVERS = {"s1": (False, "0:2"), "s2": (False, "2:4"), "home": (True, "2:4"), "s3": (False, "4:6")}  # name: (nat, span)
CHAINS = {"direct": ("s1", "s2", "s3"), "relayed": ("s1", "home", "s3")}


def network_chains(
    preset: str,
    server_args: list[str],
    *,
    model_dir: Optional[Path] = None,
    prefill_len: int = 512,
    new_tokens: int = 32,
    rounds: int = 3,
) -> dict:
    """(n)"""
    from petals_like.models.tiny import make_tiny_model
    from petals_like.testing.netbed import NetBed

    started = time.perf_counter()
    if model_dir is None:
        model_dir = make_tiny_model(BENCH_DIR / f"{preset}-llama-6layers", family="llama", preset=preset, num_hidden_layers=6)
    with NetBed() as bed:
        boot = bed.add_host("boot", delay_ms=LINK_DELAY_MS)
        hosts = {
            name: bed.add_host(name, nat=nat, delay_ms=LINK_DELAY_MS, uplink_mbit=HOME_UPLINK_MBIT if nat else None)
            for name, (nat, _) in SERVERS.items()
        }
        client = bed.add_host("client", nat=True, delay_ms=LINK_DELAY_MS, uplink_mbit=HOME_UPLINK_MBIT)
        dht = boot.start("dht", ["petals_like.cli.run_dht", "--port", "31337", "--log_level", "WARNING"])
        peers = dht.wait_for_line("--initial_peers", 60).split()[1:]
        procs = {}
        for name, (nat, span) in SERVERS.items():  # public servers do not relay: home's relay is the bootstrap
            extra = [] if nat else ["--no_relay"]
            procs[name] = hosts[name].start(
                "server",
                [
                    "petals_like.cli.run_server",
                    str(model_dir),
                    "--block_indices",
                    span,
                    "--initial_peers",
                    *peers,
                    "--no_progress",
                    "--throughput",
                    "10",
                    "--log_level",
                    "WARNING",
                    *extra,
                    *server_args,
                ],
            )
        ids = {name: proc.wait_for_line("SERVER READY", 300).split()[2] for name, proc in procs.items()}
        setup_s = time.perf_counter() - started
        pairs = [
            ("client", "s1"),
            ("client", "s2"),
            ("client", "s3"),
            ("client", "boot"),
            ("s1", "s2"),
            ("s2", "s3"),
            ("s1", "boot"),
            ("home", "boot"),
            ("home", "s3"),
        ]
        ping = {f"{a}-{b}": _ping(bed.hosts[a], bed.hosts[b]) for a, b in pairs}
        runs: dict = {"shaped": {}, "loopback": {}}
        for network in runs:
            if network == "loopback":
                bed.unshape()
            for chain, names in CHAINS.items():
                cmd = [
                    "petals_like.cli.bench_network",
                    str(model_dir),
                    "--initial_peers",
                    *peers,
                    "--servers",
                    *(ids[n] for n in names),
                    "--prefill_len",
                    str(prefill_len),
                    "--new_tokens",
                    str(new_tokens),
                    "--rounds",
                    str(rounds),
                ]
                proc = client.start(f"client-{network}-{chain}", cmd)
                runs[network][chain] = json.loads(proc.wait_for_line("RESULT ", 600).split(" ", 1)[1])
                proc.process.wait(timeout=60)
    floors = _floors(ping)
    report: dict = {
        "setup": {
            "model": str(model_dir),
            "servers": {name: {"nat": nat, "blocks": span} for name, (nat, span) in SERVERS.items()},
            "chains": CHAINS,
            "access_link_one_way_ms": LINK_DELAY_MS,
            "host_to_host_one_way_ms": 2 * LINK_DELAY_MS,
            "nat_uplink_mbit": HOME_UPLINK_MBIT,
            "relay": "boot",
            "prefill_len": prefill_len,
            "new_tokens": new_tokens,
            "rounds": rounds,
            "bed_and_servers_start_s": round(setup_s, 1),
        },
        "ping_rtt_ms": {key: round(v, 2) for key, v in ping.items()},
        "floors_ms": {chain: {key: round(v, 2) for key, v in f.items()} for chain, f in floors.items()},
        **runs,
    }
    report["targets"] = _targets(runs, floors, relay_rtt=ping["home-boot"])
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report


def _floors(rtt: dict) -> dict:
    """Per chain, without compute: path = one way along client -> servers -> client (what a step must
    cross); last_answer = when the client has every server's answer, which it reads for its input history:
    a server answers only after the next one acknowledged its push (server/handler.py), so a server
    that pushes answers a push round trip later. Hops to or from home go through the bootstrap."""

    def hop(a: str, b: str) -> float:
        other = b if a == "home" else a if b == "home" else None
        if other in ("s1", "client"):  # they reach home through the bootstrap
            return hop(other, "boot") + hop("home", "boot")
        return rtt.get(f"{a}-{b}", rtt.get(f"{b}-{a}")) / 2  # links are symmetric

    floors = {}
    for chain, names in CHAINS.items():
        stops, reached, answers = ["client", *names, "client"], 0.0, []
        for i, name in enumerate(names):
            reached += hop(stops[i], name)
            answers.append(reached + 2 * hop(name, stops[i + 2]) * (i + 1 < len(names)) + hop(name, "client"))
        floors[chain] = {"path_one_way": reached + hop(names[-1], "client"), "last_answer": max(answers)}
    return floors


def _targets(runs: dict, floors: dict, relay_rtt: float) -> dict:
    shaped, loop = runs["shaped"], runs["loopback"]
    floor = {w: floors["direct"]["path_one_way"] + loop["direct"][w]["p50_ms"] for w in WIRES}
    ratio = {w: round(shaped["direct"][w]["p50_ms"] / floor[w], 3) for w in WIRES}
    answers = {
        w: round(
            shaped["direct"][w]["p50_ms"] / (floor[w] - floors["direct"]["path_one_way"] + floors["direct"]["last_answer"]), 3
        )
        for w in WIRES
    }
    extra = {w: round(shaped["relayed"][w]["p50_ms"] - shaped["direct"][w]["p50_ms"], 2) for w in WIRES}
    protocol_extra = floors["relayed"]["last_answer"] - floors["direct"]["last_answer"]

    def speedup(network: str, chain: str, above_loopback: bool = False) -> float:
        base = loop[chain] if above_loopback else {w: {"prefill_s": 0.0} for w in WIRES}
        cost = {w: runs[network][chain][w]["prefill_s"] - base[w]["prefill_s"] for w in WIRES}
        return round(cost["float32"] / cost["int8"], 2)

    return {
        "direct_p50_over_floor": {
            "floor_ms": {w: round(v, 2) for w, v in floor.items()},
            "ratio": ratio,
            "target": "<= 1.3",
            "met": all(r <= 1.3 for r in ratio.values()),
            "ratio_to_last_answer_floor": answers,
        },
        "relayed_extra_ms_per_step": {
            "extra_ms": extra,
            "relay_rtt_ms": round(relay_rtt, 2),
            "target": "<= relay_rtt_ms",
            "met": all(e <= relay_rtt for e in extra.values()),
            "last_answer_extra_ms": round(protocol_extra, 2),
        },
        "int8_prefill_speedup_vs_float32": {
            "direct": speedup("shaped", "direct"),
            "relayed": speedup("shaped", "relayed"),
            "direct_above_loopback": speedup("shaped", "direct", True),
            "relayed_above_loopback": speedup("shaped", "relayed", True),
            "loopback_direct": speedup("loopback", "direct"),
            "target": ">= 3 (over the 20 Mbit/s uplink)",
        },
    }


def _ping(src, dst, count: int = 5) -> float:
    """Least round trip in ms from host src to host dst's address (a NAT host can only be the source): the
    time a TCP connection to a closed port takes to be refused (SYN, then RST), so no ping tool is needed.
    The least, because a first packet also waits for ARP across the delayed links."""
    probe = (
        "import socket, time\nbest = 1e9\nfor _ in range(%d):\n    t = time.perf_counter()\n    try:\n"
        "        socket.create_connection((%r, 9), timeout=5).close()\n    except OSError:\n        pass\n"
        "    best = min(best, time.perf_counter() - t)\n    time.sleep(0.2)\nprint(best * 1000)"
    ) % (count, dst.ip)
    return float(src.run(sys.executable, "-c", probe))


# ---- the client, inside the client host


def _session(model, wire: str, prompt: torch.Tensor, new_tokens: int) -> dict:
    """One session: open the chain with the first token, prefill the rest, then greedy decode steps."""
    model.config.wire = wire
    embed, logits = model.local.embed, model.local.logits
    with torch.inference_mode(), model.inference_session(max_length=prompt.shape[1] + new_tokens, reuse_prefix=False) as session:
        started = time.perf_counter()
        session.step(embed(prompt[:, :1]))
        opened, sent = time.perf_counter(), [link.stream.bytes_sent for link in session._chain]
        out = session.step(embed(prompt[:, 1:]))
        prefilled = time.perf_counter()
        # what the client sent each server: only the first, unless a push failed and the client relayed
        prefill_bytes = [link.stream.bytes_sent - before for link, before in zip(session._chain, sent)]
        token = logits(out[:, -1:]).argmax(-1)
        steps = []
        for _ in range(new_tokens):
            begin = time.perf_counter()
            token = logits(session.step(embed(token))).argmax(-1)
            steps.append(time.perf_counter() - begin)
        chain = [str(link.span.peer_id) for link in session._chain]
    return {
        "open_s": opened - started,
        "prefill_s": prefilled - opened,
        "steps": steps,
        "chain": chain,
        "prefill_bytes_to_each_server": prefill_bytes,
    }


def run_client(
    model_dir: str, initial_peers: list[str], servers: list[str], *, prefill_len: int = 512, new_tokens: int = 32, rounds: int = 3
) -> dict:
    """(n)'s client, in the client host: sessions over the chain of `servers` (peer ids, in order), each
    wire format once per round; what it returns is the "RESULT" line that network_chains reads."""
    from petals_like import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers, torch_dtype="float32", allowed_servers=servers, request_timeout=60.0
    )
    try:
        vocab = model.spec.vocab_size
        prompts = torch.randint(3, vocab, (rounds + 1, 1, prefill_len + 1), generator=torch.Generator().manual_seed(2))
        _session(model, "float32", prompts[0][:, :17], 4)  # warm-up: routes, pings, connections
        runs: dict[str, list[dict]] = {w: [] for w in WIRES}
        for r in range(rounds):  # interleaved, so that a noisy moment hits every format alike
            for wire in WIRES:
                runs[wire].append(_session(model, wire, prompts[r + 1], new_tokens))
        result = {}
        for wire, sessions in runs.items():
            steps = [s for session in sessions for s in session["steps"]]
            result[wire] = {
                "p50_ms": round(1000 * statistics.median(steps), 2),
                "p90_ms": round(1000 * percentile(steps, 0.9), 2),
                "prefill_s": round(statistics.median(s["prefill_s"] for s in sessions), 3),
                "prefill_runs_s": [round(s["prefill_s"], 3) for s in sessions],
                "open_s": round(statistics.median(s["open_s"] for s in sessions), 3),
                "prefill_bytes_to_each_server": sessions[-1]["prefill_bytes_to_each_server"],
                "chain_as_asked": all(s["chain"] == servers for s in sessions),
            }
        result["relayed_calls"] = dict(model.node.routes.relayed_calls)
        return result
    finally:
        model.shutdown()

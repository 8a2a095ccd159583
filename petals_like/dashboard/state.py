"""The dashboard's view of the swarm as one JSON-ready dict, built without any I/O.

build_state() turns what one read of the swarm found (each model's block records and the result of
an rpc_info probe of each online server) into everything the page, the JSON API, the metrics and
the terminal view show. Its input is already validated (parse_block_entries, parse_model_entries);
what it adds is the verdict per model:

- a server counts for a block when its record there says ONLINE and its probe did not fail;
- a model is healthy when every block has at least one server that counts, broken otherwise;
- its bottleneck throughput is the smallest, over blocks, sum of the throughput of those servers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from petals_like.data_structures import ServerInfo, ServerState
from petals_like.dht.records import ModelInfo

STATE_VERSION = 1  # bumped when a field of the JSON API changes meaning or goes away
STATUSES = ("online", "unreachable", "joining", "offline")  # how a server is drawn, best first
MAX_ERROR = 200  # characters of a probe's error kept in the state


@dataclass(frozen=True)
class Probe:
    """The result of one short rpc_info call to a server."""

    reachable: bool
    rtt: Optional[float] = None  # seconds the call took; None when it failed
    error: str = ""
    live: Optional[ServerInfo] = None  # the server's current numbers from its answer, when they were valid


def short_id(peer_id: str) -> str:
    """The tail of a peer id, as in logs (RemoteSpanInfo's repr)."""
    return peer_id[-6:]


def block_ranges(blocks: Sequence[int]) -> list[list[int]]:
    """Sorted block indices -> [[start, end), ...] runs of consecutive blocks."""
    runs: list[list[int]] = []
    for block in blocks:
        if runs and runs[-1][1] == block:
            runs[-1][1] = block + 1
        else:
            runs.append([block, block + 1])
    return runs


def _status(info: ServerInfo, probe: Optional[Probe]) -> str:
    if info.state == ServerState.ONLINE:
        return "unreachable" if probe is not None and not probe.reachable else "online"
    return "joining" if info.state == ServerState.JOINING else "offline"


def _counts(info: ServerInfo, probe: Optional[Probe]) -> bool:
    """Whether this server's record makes its blocks usable: ONLINE and not known to be unreachable."""
    return _status(info, probe) == "online"


def _server_row(peer_id: str, info: ServerInfo, blocks_seen: int, probe: Optional[Probe]) -> dict[str, Any]:
    live = probe.live if probe is not None else None
    return {
        "peer_id": peer_id,
        "short_id": short_id(peer_id),
        "public_name": info.public_name,
        "state": info.state.name.lower(),
        "status": _status(info, probe),
        "reachable": None if probe is None else probe.reachable,
        "rpc_rtt": None if probe is None else probe.rtt,
        "error": "" if probe is None else probe.error[:MAX_ERROR],
        "start_block": info.start_block,
        "end_block": info.end_block,
        "blocks_seen": blocks_seen,
        "throughput": info.throughput,
        "inference_rps": info.inference_rps,
        "forward_rps": info.forward_rps,
        # the server's answer is fresher than its last announcement
        "cache_tokens_left": (live or info).cache_tokens_left,
        "open_sessions": (live or info).open_sessions,
        "load": (live or info).load,
        "version": info.version,
        "torch_dtype": info.torch_dtype,
        "quant_type": info.quant_type,
        "adapters": list(info.adapters),
        "next_pings": dict(info.next_pings),
        "using_relay": info.using_relay,  # behind NAT: clients reach it through a relay
    }


def build_model(
    dht_prefix: str, model: ModelInfo, block_infos: Sequence[Mapping[str, ServerInfo]], probes: Mapping[str, Probe]
) -> dict[str, Any]:
    """One model's verdict, per-block coverage and servers table.

    block_infos[i] holds the records found under block i. A server is one row per span it announces
    (a server that moved has records for its old span too: an OFFLINE one, hidden once it serves elsewhere).
    """
    num_blocks = model.num_blocks
    blocks = []
    rows: dict[tuple[str, int, int], tuple[ServerInfo, int]] = {}
    for index in range(num_blocks):
        servers = block_infos[index] if index < len(block_infos) else {}
        counted = [info for peer_id, info in servers.items() if _counts(info, probes.get(peer_id))]
        blocks.append(
            {
                "index": index,
                "servers": len(counted),
                "throughput": sum((info.throughput for info in counted), 0.0),
                "joining": sum(info.state == ServerState.JOINING for info in servers.values()),
            }
        )
        for peer_id, info in servers.items():
            key = (peer_id, info.start_block, info.end_block)
            seen = rows.get(key)
            if seen is None:
                rows[key] = (info, 1)
            else:  # records of one span written at different times: show the most advanced state
                rows[key] = (info if info.state > seen[0].state else seen[0], seen[1] + 1)

    active_peers = {peer for (peer, _, _), (info, _) in rows.items() if info.state != ServerState.OFFLINE}
    servers = [
        _server_row(peer, info, seen, probes.get(peer))
        for (peer, _, _), (info, seen) in rows.items()
        if info.state != ServerState.OFFLINE or peer not in active_peers
    ]
    servers.sort(key=lambda s: (s["start_block"], s["end_block"], STATUSES.index(s["status"]), s["peer_id"]))

    uncovered = [b["index"] for b in blocks if b["servers"] == 0]
    by_status = _count_peers_by_status(servers)
    return {
        "dht_prefix": dht_prefix,
        "name": model.name,
        "num_blocks": num_blocks,
        "healthy": num_blocks > 0 and not uncovered,
        "bottleneck_throughput": min((b["throughput"] for b in blocks), default=0.0),
        "servers_by_status": by_status,
        "online_servers": by_status["online"],
        "uncovered_blocks": uncovered,
        "uncovered_ranges": block_ranges(uncovered),
        "blocks": blocks,
        "servers": servers,
    }


def _count_peers_by_status(servers: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Distinct peer ids per status over server rows (a peer with two spans counts once)."""
    peers: dict[str, set] = {status: set() for status in STATUSES}
    for server in servers:
        peers[server["status"]].add(server["peer_id"])
    return {status: len(ids) for status, ids in peers.items()}


def build_state(
    models: Mapping[str, ModelInfo],
    block_infos: Mapping[str, Sequence[Mapping[str, ServerInfo]]],
    probes: Mapping[str, Probe],
    *,
    now: Optional[float],
    read_seconds: Optional[float] = 0.0,
    errors: Sequence[str] = (),
) -> dict[str, Any]:
    """The whole view: every model (those with servers first), and a summary over the swarm.

    models: {dht_prefix: ModelInfo}; block_infos: {dht_prefix: records of each block} (a model
    missing here had no records read); probes: {peer id: Probe} of the servers that were probed.
    """
    views = [build_model(prefix, model, block_infos.get(prefix, ()), probes) for prefix, model in models.items()]
    views.sort(key=lambda view: not view["servers"])  # models someone serves first, otherwise in `models` order
    return {
        "version": STATE_VERSION,
        "generated_at": now,
        "read_seconds": read_seconds,
        "summary": {
            "models": len(views),
            "healthy_models": sum(view["healthy"] for view in views),
            # a peer serving several models counts once
            "servers_by_status": _count_peers_by_status(server for view in views for server in view["servers"]),
        },
        "models": views,
        "errors": list(errors),
    }

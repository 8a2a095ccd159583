"""The dashboard's view as Prometheus text (exposition format 0.0.4), for /metrics.

Label values come from strangers' records (public names, versions): they are escaped as the format
requires, so a hostile record can at worst show a strange label, never break the whole scrape.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "petals_like"

# (name, type, help, per-server field) of the gauges reported for each server
SERVER_GAUGES = (
    ("server_throughput", "announced tokens/s for one block, used by routing", "throughput"),
    ("server_inference_rps", "announced decode steps/s over the span at batch 1", "inference_rps"),
    ("server_forward_rps", "announced forward tokens/s over the span", "forward_rps"),
    ("server_cache_tokens_left", "free KV cache tokens", "cache_tokens_left"),
    ("server_open_sessions", "open inference sessions", "open_sessions"),
    ("server_load", "fraction of time spent computing (0..1)", "load"),
)


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: Any) -> str:
    if value is None:
        return "NaN"
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class _Family:
    def __init__(self, name: str, kind: str, help_text: str):
        self.name, self.kind, self.help = f"{PREFIX}_{name}", kind, help_text
        self.samples: list[str] = []

    def add(self, value: Any, labels: Optional[Mapping[str, Any]] = None) -> None:
        text = ",".join(f'{key}="{_escape(v)}"' for key, v in (labels or {}).items())
        self.samples.append(f"{self.name}{{{text}}} {_number(value)}" if text else f"{self.name} {_number(value)}")

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        yield from self.samples


def render_metrics(state: Mapping[str, Any], reads: Mapping[str, Any]) -> str:
    """state: build_state()'s dict (or the service's, with no models before the first read);
    reads: the service's counters (total, failures, last_success, last_seconds)."""
    families: dict[str, _Family] = {}

    def family(name: str, kind: str, help_text: str) -> _Family:
        if name not in families:
            families[name] = _Family(name, kind, help_text)
        return families[name]

    family("dashboard_reads_total", "counter", "reads of the swarm attempted").add(reads["total"])
    family("dashboard_read_failures_total", "counter", "reads of the swarm that failed").add(reads["failures"])
    family("dashboard_last_read_timestamp_seconds", "gauge", "unix time of the last successful read").add(reads["last_success"])
    family("dashboard_read_seconds", "gauge", "duration of the last successful read").add(reads["last_seconds"])

    for model in state.get("models", ()):
        m = {"model": model["dht_prefix"]}
        family("model_healthy", "gauge", "1 if every block has an online, reachable server").add(int(model["healthy"]), m)
        family("model_blocks", "gauge", "transformer blocks of the model").add(model["num_blocks"], m)
        family("model_uncovered_blocks", "gauge", "blocks without an online, reachable server").add(
            len(model["uncovered_blocks"]), m
        )
        family("model_bottleneck_throughput", "gauge", "min over blocks of the summed throughput of usable servers").add(
            model["bottleneck_throughput"], m
        )
        servers = family("model_servers", "gauge", "servers of the model by status")
        for status, count in model["servers_by_status"].items():
            servers.add(count, {**m, "status": status})
        for block in model["blocks"]:
            b = {**m, "block": block["index"]}
            family("block_servers", "gauge", "online, reachable servers of the block").add(block["servers"], b)
            family("block_throughput", "gauge", "summed throughput of the block's usable servers").add(block["throughput"], b)
        for server in model["servers"]:
            s = {**m, "peer_id": server["peer_id"], "span": f"{server['start_block']}:{server['end_block']}"}
            family("server_info", "gauge", "1 per server span, with what it announces as labels").add(
                1,
                {
                    **s,
                    "status": server["status"],
                    "name": server["public_name"],
                    "version": server["version"],
                    "torch_dtype": server["torch_dtype"],
                    "quant_type": server["quant_type"],
                },
            )
            for name, help_text, field in SERVER_GAUGES:
                family(name, "gauge", help_text).add(server[field], s)
            if server["reachable"] is not None:
                family("server_reachable", "gauge", "1 if the server answered rpc_info in time").add(int(server["reachable"]), s)
            if server["rpc_rtt"] is not None:
                family("server_rpc_info_seconds", "gauge", "round trip of the dashboard's rpc_info call").add(
                    server["rpc_rtt"], s
                )
    return "\n".join(line for f in families.values() for line in f.lines()) + "\n"

"""The dashboard's view drawn with rich, for `python -m petals_like.cli.health`.

Per model: the verdict, a one-line coverage strip (one character per block: the number of usable
servers, '·' where there is none) and the servers table; the same fields as the page.
"""

from __future__ import annotations

from typing import Any, Mapping

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

STATUS_STYLES = {"online": "green", "unreachable": "red", "joining": "blue", "offline": "bright_black"}


def _num(value: Any, digits: int | None = None) -> str:
    if value is None:
        return "–"
    if digits is None:
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:,.{digits}f}"


def _ranges(ranges: list[list[int]]) -> str:
    return ", ".join(str(a) if b - a == 1 else f"{a}:{b}" for a, b in ranges)


def coverage_strip(model: Mapping[str, Any]) -> Text:
    """One character per block: the count of usable servers (9+ for more), '·' in red where there is none."""
    strip = Text()
    for block in model["blocks"]:
        servers = block["servers"]
        if servers == 0:
            strip.append("·", style="bold red")
        else:
            strip.append(str(min(servers, 9)), style="yellow" if servers == 1 else "green")
    return strip


def servers_table(model: Mapping[str, Any]) -> Table:
    table = Table(expand=False, show_edge=False, pad_edge=False, header_style="bold", box=None)
    for name, justify in (
        ("server", "left"),
        ("span", "left"),
        ("state", "left"),
        ("rpc_info", "right"),
        ("tput", "right"),
        ("steps/s", "right"),
        ("fwd tok/s", "right"),
        ("free cache", "right"),
        ("sess", "right"),
        ("load", "right"),
        ("version", "left"),
        ("dtype/quant", "left"),
        ("adapters", "left"),
        ("pings to next", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name in ("server", "span", "state", "rpc_info"))
    for s in model["servers"]:
        name = Text(s["short_id"])
        if s["public_name"]:
            name.append(f" {s['public_name']}", style="dim")
        if s["using_relay"]:
            name.append(" relayed", style="yellow")
        if s["reachable"] is None:
            reach = "–"
        else:
            reach = f"{s['rpc_rtt'] * 1000:.0f} ms" if s["reachable"] else "no answer"
        pings = ", ".join(f"{peer[-6:]} {rtt * 1000:.0f} ms" for peer, rtt in sorted(s["next_pings"].items(), key=lambda p: p[1]))
        table.add_row(
            name,
            f"{s['start_block']}:{s['end_block']}",
            Text(s["status"], style=STATUS_STYLES[s["status"]]),
            reach,
            _num(s["throughput"]),
            _num(s["inference_rps"]),
            _num(s["forward_rps"]),
            f"{s['cache_tokens_left']:,}",
            str(s["open_sessions"]),
            f"{s['load'] * 100:.0f}%",
            Text(s["version"] or "–"),
            Text(f"{s['torch_dtype']}/{s['quant_type']}"),
            Text(", ".join(s["adapters"]) or "–"),
            Text(pings or "–"),
        )
    return table


def render_model(model: Mapping[str, Any]) -> RenderableType:
    verdict = Text(" HEALTHY ", style="bold white on green") if model["healthy"] else Text(" BROKEN ", style="bold white on red")
    title = Text.assemble(verdict, " ", (model["dht_prefix"], "bold"))
    if model["name"] and model["name"] != model["dht_prefix"]:
        title.append(f" {model['name']}", style="dim")
    facts = Text.assemble(
        f"{model['num_blocks']} blocks · {model['online_servers']} online servers · bottleneck ",
        (_num(model["bottleneck_throughput"]), "bold"),
        " tokens/s",
    )
    if model["uncovered_blocks"]:
        facts.append(f" · uncovered blocks: {_ranges(model['uncovered_ranges'])}", style="bold red")
    body: list[RenderableType] = [Text(""), title, facts, Text.assemble("blocks ", coverage_strip(model))]
    body.append(
        servers_table(model) if model["servers"] else Text("no server has announced blocks of this model", style="italic")
    )
    return Group(*body)


def render_state(state: Mapping[str, Any]) -> RenderableType:
    summary = state["summary"]
    by = summary["servers_by_status"]
    head = Text(f"{summary['models']} models, {summary['healthy_models']} healthy · {by.get('online', 0)} servers online")
    for status in ("unreachable", "joining"):
        if by.get(status):
            head.append(f" · {by[status]} {status}", style=STATUS_STYLES[status])
    parts: list[RenderableType] = [head]
    parts.extend(Text(error, style="red") for error in state["errors"])
    parts.extend(render_model(model) for model in state["models"])
    if not state["models"]:
        parts.append(Text("no models found in the swarm", style="italic"))
    return Group(*parts)

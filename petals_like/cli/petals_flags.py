"""Petals' run_server flag names, accepted by run_server so a Petals volunteer's command line works here.

One table, PETALS_FLAGS: each Petals flag either maps to a flag here (same meaning, maybe another name or
unit), is ignored with a logged warning (it tunes something this server does not have, and leaving it
out changes nothing a user relies on), or is refused with an argparse error (ignoring it would quietly
serve something other than what was asked for). Defaults and help stay with the flags they map to
(ServerConfig fields); the help section "Petals flag names" only says where each one goes.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from petals_like.dht.records import MAX_LIFETIME

logger = logging.getLogger(__name__)

MAP, IGNORE, REFUSE = "map", "ignore", "refuse"
USED = "_petals_flags_used"  # namespace attribute: the Petals flags given, in order


def _follow_update_period(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """Petals' records expire after 2 x --update_period unless --expiration is given: keep that when
    the period outgrows our default expiration (which would otherwise be refused as shorter than it)."""
    default = parser.get_default("expiration")
    if ns.expiration == default and 2 * ns.announce_period > default:
        ns.expiration = min(2 * ns.announce_period, MAX_LIFETIME)


def _load_in_8bit(text: str) -> str:
    return "int8" if text.strip().lower() in ("true", "1", "yes") else "none"


@dataclass(frozen=True)
class PetalsFlag:
    name: str  # Petals' flag, without the dashes
    does: str  # MAP, IGNORE or REFUSE
    why: str = ""  # IGNORE / REFUSE: the reason, shown in the warning or the error; MAP: its --help line
    ours: Optional[str] = None  # MAP: the dest of the flag here that gets the value
    nargs: Any = None  # how many values Petals' flag takes (0: a switch); MAP without it: as the flag here
    const: Any = None  # MAP of a switch: the value it sets
    convert: Optional[Callable[[str], Any]] = None  # MAP: Petals' value -> ours (else parsed as the flag here)
    exclusive: bool = False  # MAP of a switch: an error if the flag here is given too (it must take nargs)
    then: Optional[Callable[[argparse.ArgumentParser, argparse.Namespace], None]] = None  # after parsing
    short: Optional[str] = None  # Petals' one-letter form, e.g. -c


_RUNTIME = "a tuning knob of Petals' hivemind runtime; this server batches on its own scheduler thread"

PETALS_FLAGS: tuple[PetalsFlag, ...] = (
    # same meaning, another name (why: the help line; none: "= --ours")
    PetalsFlag("converted_model_name_or_path", MAP, "= MODEL", ours="model"),
    PetalsFlag("attn_cache_tokens", MAP, ours="kv_cache_tokens"),
    PetalsFlag("inference_max_length", MAP, ours="max_session_length"),
    PetalsFlag("new_swarm", MAP, "= no --initial_peers: a new swarm", ours="initial_peers", nargs=0, const=(), exclusive=True),
    PetalsFlag("mean_balance_check_period", MAP, ours="balance_period"),
    PetalsFlag("step_timeout", MAP, ours="session_idle_timeout"),
    PetalsFlag(
        "update_period",
        MAP,
        "= --announce_period; --expiration becomes 2x it if that is longer, unless given",
        ours="announce_period",
        then=_follow_update_period,
    ),
    PetalsFlag("no_auto_relay", MAP, "= --max_relays 0", ours="max_relays", nargs=0, const=0),
    # older Petals names
    PetalsFlag("prefix", MAP, "= --dht_prefix (older Petals name)", ours="dht_prefix"),
    PetalsFlag("alloc_timeout", MAP, "= --max_alloc_timeout (older Petals name)", ours="max_alloc_timeout"),
    PetalsFlag("load_in_8bit", MAP, "= --quant_type int8 if True, none if False", ours="quant_type", convert=_load_in_8bit),
    # nothing to tune here: a warning
    PetalsFlag("num_handlers", IGNORE, "one event loop handles all requests here, no handler processes"),
    PetalsFlag("prefetch_batches", IGNORE, _RUNTIME),
    PetalsFlag("sender_threads", IGNORE, _RUNTIME),
    PetalsFlag("min_batch_size", IGNORE, _RUNTIME),
    PetalsFlag("stats_report_interval", IGNORE, _RUNTIME),
    PetalsFlag(
        "compression",
        IGNORE,
        "clients choose how hidden states travel, among the formats --wire_formats accepts",
    ),
    PetalsFlag(
        "max_chunk_size_bytes",
        IGNORE,
        "it bounds the attention memory of one processing chunk, not a request's size (that is "
        "--max_message_bytes, which refuses larger requests); prompts run in --token_budget chunks here",
    ),
    PetalsFlag(
        "session_timeout",
        IGNORE,
        "no cap on a session's total time here; --session_idle_timeout (Petals' --step_timeout) closes "
        "silent sessions and --max_session_length bounds their tokens",
    ),
    PetalsFlag(
        "max_disk_space",
        IGNORE,
        "only the span's shards are fetched, into the Hugging Face cache (--cache_dir), which is not pruned here",
    ),
    PetalsFlag("use_auth_token", IGNORE, "HF_TOKEN or the token of `hf auth login` is used unless --token is given", nargs=0),
    PetalsFlag("daemon_startup_timeout", IGNORE, "this server's p2p node has its own start-up timeout"),
    PetalsFlag("increase_file_limit", IGNORE, "set the open-files limit with `ulimit -n` before starting", nargs="?"),
    PetalsFlag(
        "skip_reachability_check",
        IGNORE,
        "there is no health.petals.dev check here; peers dial back (--force_reachability skips that)",
        nargs=0,
    ),
    # would silently serve something else: an error
    PetalsFlag("tensor_parallel_devices", REFUSE, "blocks are not split across devices here; use one --device", nargs="+"),
    PetalsFlag("custom_module_path", REFUSE, "custom modules are not loaded; only the supported model families are served"),
    PetalsFlag(
        "attn_cache_size",
        REFUSE,
        "the KV cache is sized in tokens here: use --attn_cache_tokens or --kv_cache_tokens",
    ),
    PetalsFlag("config", REFUSE, "config files are not read; pass the flags themselves", short="-c"),
)


class _PetalsAction(argparse.Action):
    """Records the Petals flag; MAP stores the value into the flag here, REFUSE fails at once."""

    def __init__(self, option_strings, dest, entry: PetalsFlag, **kwargs) -> None:
        self.entry = entry
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        entry = self.entry
        if entry.does == REFUSE:
            parser.error(f"argument {option_string}: a Petals flag not supported here: {entry.why}")
        if not hasattr(namespace, USED):
            setattr(namespace, USED, [])
        getattr(namespace, USED).append(entry)
        if entry.does == MAP and not entry.exclusive:
            if entry.nargs == 0:
                values = entry.const
            elif entry.convert is not None:
                values = entry.convert(values)
            setattr(namespace, self.dest, values)


class HelpFormatter(argparse.HelpFormatter):
    """Keeps the Petals names out of the usage line; --help lists them in their own section."""

    def add_usage(self, usage, actions, groups, prefix=None) -> None:
        super().add_usage(usage, [a for a in actions if not isinstance(a, _PetalsAction)], groups, prefix)


def add_petals_flags(parser: argparse.ArgumentParser) -> None:
    """The Petals names of PETALS_FLAGS, in one help section; call after the flags they map to exist."""
    group = parser.add_argument_group(
        "Petals flag names",
        "Petals' run_server flags: '= --X' is the flag here it sets; ignored ones log a warning; refused ones are an error",
    )
    ours = {action.dest: action for action in parser._actions}
    for entry in PETALS_FLAGS:
        names = [f"--{entry.name}"] + ([entry.short] if entry.short else [])
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, entry=entry, metavar="V")
        if entry.does == MAP:
            target = ours[entry.ours]
            positional = not target.option_strings
            dest = f"petals_{entry.name}" if positional or entry.exclusive else target.dest
            if entry.nargs == 0:
                kwargs.update(nargs=0, metavar=None)
            elif positional or entry.convert is not None:
                kwargs.update(nargs=entry.nargs)
            else:
                kwargs.update(nargs=target.nargs, type=target.type, choices=target.choices)
            help_text = entry.why or f"= {target.option_strings[0]}"
        else:
            dest = f"petals_{entry.name}"
            kwargs.update(nargs=entry.nargs)
            if entry.nargs == 0:
                kwargs.update(metavar=None)
            help_text = f"{entry.does}d: {entry.why}"
        group.add_argument(*names, dest=dest, action=_PetalsAction, help=help_text.replace("%", "%%"), **kwargs)


def apply_petals_flags(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """After parsing: warn about ignored flags, fill in what a Petals switch or positional alias implies."""
    for entry in getattr(ns, USED, ()):
        if entry.does == IGNORE:
            logger.warning(f"Ignoring the Petals flag --{entry.name}: {entry.why}")
        elif entry.does == MAP:
            target = next(a for a in parser._actions if a.dest == entry.ours)
            given = getattr(ns, target.dest)
            if entry.exclusive:  # the flag here takes nargs: when given, its value is a fresh list
                if isinstance(given, list):
                    parser.error(f"argument --{entry.name}: not allowed with argument {target.option_strings[0]}")
                setattr(ns, target.dest, entry.const)
            elif not target.option_strings:  # a keyword form of a positional argument
                if given is not None:
                    parser.error(f"argument --{entry.name}: not allowed with the positional {target.dest.upper()}")
                setattr(ns, target.dest, getattr(ns, f"petals_{entry.name}"))
            if entry.then is not None:
                entry.then(parser, ns)

"""Chaos test: generate and fine-tune through a local swarm while servers are SIGKILLed and restarted.

    python scripts/chaos.py                                   # 3 minutes, 5 servers, up to 20 kills
    python scripts/chaos.py --duration 600 --max_faults 60 --seed 7
    python scripts/chaos.py --duration 20 --servers 3 --kill_interval 1 3 --no_progress

Starts a DHT and redundant servers of a tiny random Llama (every block served at least twice) as
processes on 127.0.0.1. Threads generate greedily through one client at once, and one thread trains
a LoRA through another, while servers are killed at random (SIGKILL by PID: no OFFLINE record, the
DHT keeps listing them until their records expire) and restarted after a random down time with a
fresh identity (with --same_identity: the killed one's peer id). A server is killed only while the
others still serve every block, so at every moment each block has a live server: the clients must
fail over, never wait for coverage to return.

Every generation must equal local transformers' greedy generate() on the same checkpoint (float32),
token for token; every training step's loss and LoRA gradients must equal local PEFT's with the
same weights and batch: within --tolerance relative of float64 PEFT, plus ten times float32 PEFT's
own distance from it (petals_like/testing/oracle.py). Each operation has a deadline (--op_timeout).
The run ends by printing one JSON report on stdout (kills, restarts, generations and training steps
run / wrong / lost / hung, leaked processes, seconds, errors) and exits with status 1 if anything
was wrong, lost or hung, a restarted server failed to come up, or a process it started was left.
A progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing
sys.path.insert(1, str(Path(__file__).resolve().parent))  # harness/ beside this file, also when it is loaded by path (tests)

from harness.chaos import ChaosConfig, ChaosReport, run_chaos  # noqa: E402
from harness.finetune import run_script  # noqa: E402
from petals_like.utils.cli import add_config_flags, config_values  # noqa: E402

DEFAULTS = ChaosConfig()


FLAGS = {  # config fields given as flags, by argument group: (field, help)
    "faults": [
        ("duration", "seconds of load under faults, once the swarm is up"),
        ("max_faults", "kill at most this many servers"),
        ("seed", "seeds which servers die and when, prompts, training batches, LoRA init"),
        ("kill_interval", "seconds between two kills, drawn uniformly"),
        ("down_time", "seconds a killed server stays down before it is restarted"),
    ],
    "swarm": [
        ("servers", "number of servers: the whole model, then its halves in turn"),
        ("restart_timeout", "seconds a (re)started server may take to serve"),
    ],
    "load": [
        ("generators", "threads generating at once through one client"),
        ("prompts", "distinct prompts of 4-40 tokens, each with its reference output"),
        ("max_new_tokens", "tokens per generation, drawn between half this and this"),
        ("batch_size", "training batch"),
        ("seq_len", "training tokens per row"),
        ("lora_rank", "LoRA rank"),
        ("lr", "AdamW learning rate"),
    ],
    "checks": [
        ("tolerance", "relative error allowed for the loss and each LoRA gradient vs float64 PEFT, besides float32 rounding"),
        ("op_timeout", "deadline of one generation or training step; past it the run stops, failed"),
        ("request_timeout", "the clients' timeout for one step on one server"),
    ],
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: parser.add_argument_group(name) for name in (*FLAGS, "output")}
    for name, flags in FLAGS.items():
        add_config_flags(groups[name], DEFAULTS, flags)
    group = groups["swarm"]
    group.add_argument(
        "--model_dir", default=None, help="where to write the tiny random Llama (default: a temp dir, removed after)"
    )
    group.add_argument("--spans", nargs="+", default=None, help="blocks of each server instead, e.g. 0:8 0:4 4:8")
    group.add_argument(
        "--server_args", default=" ".join(DEFAULTS.server_args), help="extra run_server arguments (default: %(default)r)"
    )
    group.add_argument(
        "--same_identity",
        action="store_true",
        help="a restarted server keeps the killed one's peer id (default: a new one, as a new machine)",
    )
    groups["load"].add_argument("--no_train", action="store_true", help="no training thread (generation only)")
    group = groups["output"]
    group.add_argument("--log_level", default="ERROR", help="log level of this process (default: %(default)s)")
    group.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)

    if args.duration <= 0 or args.max_faults < 0 or args.op_timeout <= 0 or args.request_timeout <= 0:
        parser.error("need --duration > 0, --max_faults >= 0, --op_timeout > 0 and --request_timeout > 0")
    for name in ("kill_interval", "down_time"):
        low, high = getattr(args, name)
        if not 0 <= low <= high:
            parser.error(f"--{name} needs 0 <= LOW <= HIGH, got {low} {high}")
    if args.generators < 0 or (args.generators == 0 and args.no_train):
        parser.error("need --generators >= 1, or training (no --no_train)")
    if args.prompts < 1 or args.max_new_tokens < 1 or args.batch_size < 1 or args.seq_len < 2 or args.lora_rank < 1:
        parser.error("need --prompts, --max_new_tokens, --batch_size, --lora_rank >= 1 and --seq_len >= 2")
    if args.spans is None and args.servers < 2:
        parser.error("need --servers >= 2: a server is killed only while another serves its blocks")
    return args


def main(argv: Optional[list[str]] = None) -> ChaosReport:
    """Runs the chaos test and prints its JSON report; returns the report."""
    args = parse_args(argv)

    from petals_like.models.tiny import make_tiny_model
    from petals_like.utils.cli import setup_logging

    setup_logging(args.log_level)
    config = ChaosConfig(
        **{k: v for flags in FLAGS.values() for k, v in config_values(args, flags).items()},
        spans=args.spans,
        train=not args.no_train,
        same_identity=args.same_identity,
        server_args=args.server_args.split(),
    )
    with contextlib.ExitStack() as stack:
        if args.model_dir is not None:
            root = Path(args.model_dir)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="petals_like_chaos_"))) / "tiny-llama"
        model = make_tiny_model(root, family="llama", preset="tiny")
        report = run_chaos(model, config, progress=not args.no_progress)
    print(json.dumps(report.to_dict(), indent=2), flush=True)
    return report


def cli() -> None:
    sys.exit(0 if main().ok else 1)


if __name__ == "__main__":
    run_script(cli)

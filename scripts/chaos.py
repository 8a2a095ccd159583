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
own distance from it (petals_like/utils/oracle.py). Each operation has a deadline (--op_timeout).
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

from petals_like.utils.chaos import ChaosConfig, ChaosReport, run_chaos  # noqa: E402
from petals_like.utils.finetune import run_script  # noqa: E402

DEFAULTS = ChaosConfig()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("faults")
    group.add_argument("--duration", type=float, default=DEFAULTS.duration,
                       help="seconds of load under faults, once the swarm is up (default: %(default)s)")
    group.add_argument("--max_faults", type=int, default=DEFAULTS.max_faults,
                       help="kill at most this many servers (default: %(default)s)")
    group.add_argument("--seed", type=int, default=DEFAULTS.seed,
                       help="seeds which servers die and when, prompts, training batches, LoRA init (default: %(default)s)")
    group.add_argument("--kill_interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=DEFAULTS.kill_interval,
                       help="seconds between two kills, drawn uniformly (default: %(default)s)")
    group.add_argument("--down_time", type=float, nargs=2, metavar=("LOW", "HIGH"), default=DEFAULTS.down_time,
                       help="seconds a killed server stays down before it is restarted (default: %(default)s)")
    group = parser.add_argument_group("swarm")
    group.add_argument("--model_dir", default=None,
                       help="where to write the tiny random Llama (default: a temp dir, removed after)")
    group.add_argument("--servers", type=int, default=DEFAULTS.servers,
                       help="number of servers: the whole model, then its halves in turn (default: %(default)s)")
    group.add_argument("--spans", nargs="+", default=None, help="blocks of each server instead, e.g. 0:8 0:4 4:8")
    group.add_argument("--server_args", default=" ".join(DEFAULTS.server_args),
                       help="extra run_server arguments (default: %(default)r)")
    group.add_argument("--restart_timeout", type=float, default=DEFAULTS.restart_timeout,
                       help="seconds a (re)started server may take to serve (default: %(default)s)")
    group.add_argument("--same_identity", action="store_true",
                       help="a restarted server keeps the killed one's peer id (default: a new one, as a new machine)")
    group = parser.add_argument_group("load")
    group.add_argument("--generators", type=int, default=DEFAULTS.generators,
                       help="threads generating at once through one client (default: %(default)s)")
    group.add_argument("--prompts", type=int, default=DEFAULTS.prompts,
                       help="distinct prompts of 4-40 tokens, each with its reference output (default: %(default)s)")
    group.add_argument("--max_new_tokens", type=int, default=DEFAULTS.max_new_tokens,
                       help="tokens per generation, drawn between half this and this (default: %(default)s)")
    group.add_argument("--no_train", action="store_true", help="no training thread (generation only)")
    group.add_argument("--batch_size", type=int, default=DEFAULTS.batch_size, help="training batch (default: %(default)s)")
    group.add_argument("--seq_len", type=int, default=DEFAULTS.seq_len, help="training tokens per row (default: %(default)s)")
    group.add_argument("--lora_rank", type=int, default=DEFAULTS.lora_rank, help="LoRA rank (default: %(default)s)")
    group.add_argument("--lr", type=float, default=DEFAULTS.lr, help="AdamW learning rate (default: %(default)s)")
    group = parser.add_argument_group("checks")
    group.add_argument("--tolerance", type=float, default=DEFAULTS.tolerance,
                       help="relative error allowed for the loss and each LoRA gradient vs float64 PEFT, besides float32 "
                            "rounding (default: %(default)s)")
    group.add_argument("--op_timeout", type=float, default=DEFAULTS.op_timeout,
                       help="deadline of one generation or training step; past it the run stops, failed "
                            "(default: %(default)s)")
    group.add_argument("--request_timeout", type=float, default=DEFAULTS.request_timeout,
                       help="the clients' timeout for one step on one server (default: %(default)s)")
    group = parser.add_argument_group("output")
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
        duration=args.duration, max_faults=args.max_faults, seed=args.seed, servers=args.servers, spans=args.spans,
        kill_interval=tuple(args.kill_interval), down_time=tuple(args.down_time), generators=args.generators,
        prompts=args.prompts, max_new_tokens=args.max_new_tokens, train=not args.no_train, batch_size=args.batch_size,
        seq_len=args.seq_len, lora_rank=args.lora_rank, lr=args.lr, tolerance=args.tolerance,
        op_timeout=args.op_timeout, request_timeout=args.request_timeout, restart_timeout=args.restart_timeout,
        same_identity=args.same_identity,
        server_args=args.server_args.split(),
    )  # fmt: skip
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

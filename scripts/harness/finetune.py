"""What the fine-tuning scripts share: a plain training loop on the synthetic pattern task
(petals_like/testing/pattern_task.py), their command line, and their local swarm.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from petals_like.testing.pattern_task import pattern_batches


def train(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    steps: int,
    lr: float,
    *,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> list[float]:
    """AdamW over model.trainable_parameters() for `steps` batches; returns the loss of each step.

    The loss is the causal LM loss on the batch itself (labels = input_ids; -100 would be ignored).
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    params = model.trainable_parameters()
    if not params:
        raise ValueError("the model has no trainable parameters: enable prompt tuning or add a LoRA first")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    with tqdm(total=steps, desc="training", unit="step", disable=not progress) as bar:
        for input_ids in itertools.islice(batches, steps):
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    if len(losses) < steps:
        raise ValueError(f"batches ran out after {len(losses)} of {steps} steps")
    return losses


def train_and_save(
    model: Any, model_path: str, args: argparse.Namespace, description: str, what: str
) -> tuple[list[float], Path, torch.Tensor]:
    """The scripts' common run: print what trains, train on the pattern task, print the loss, save.

    Returns (losses, where it was saved, a held-out batch for checks).
    """
    from transformers import AutoTokenizer

    print(f"{description}: {sum(p.numel() for p in model.trainable_parameters())} trainable parameters", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    losses = train(
        model,
        pattern_batches(tokenizer, args.batch_size, args.seq_len, seed=args.seed),
        args.steps,
        args.lr,
        progress=not args.no_progress,
    )
    print(loss_summary(losses))
    saved = model.save_pretrained(args.output_dir)
    print(f"Saved the {what} to {saved.resolve()}")
    return losses, saved, next(pattern_batches(tokenizer, args.batch_size, args.seq_len, seed=args.seed + 1))


def loss_summary(losses: list[float]) -> str:
    """'loss 6.412 -> 1.234 (-81%) over N steps', with the ends averaged over a few steps against noise."""
    window = max(1, min(3, len(losses) // 4))
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    change = 100 * (last - first) / first if first else 0.0
    return (
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps "
        f"(mean of first/last {window}: {first:.3f} -> {last:.3f}, {change:+.0f}%)"
    )


# ---- command line and swarm, as both scripts take them ----


def add_common_args(parser: argparse.ArgumentParser, *, lr: float, output_dir: str) -> None:
    group = parser.add_argument_group("model and swarm")
    group.add_argument(
        "--model", default=None, help="checkpoint folder (or cached Hugging Face name) to fine-tune; default: a tiny random Llama"
    )
    group.add_argument(
        "--model_dir",
        default=None,
        help="where to write the tiny Llama when --model is not given (default: a temp dir, removed after)",
    )
    group.add_argument(
        "--initial_peers",
        nargs="+",
        default=None,
        help="multiaddrs of a swarm serving --model; default: start a local swarm on 127.0.0.1",
    )
    group.add_argument(
        "--spans",
        nargs="+",
        default=None,
        help="blocks of each server of the local swarm, one server per span (default: two halves)",
    )
    group.add_argument(
        "--server_args",
        default="--num_threads 1",
        help="extra run_server arguments for the local swarm; one thread each by default, as the "
        "servers share this machine's cores with each other and with the client",
    )
    group.add_argument(
        "--num_chains",
        type=int,
        default=1,
        help="split each batch over up to this many chains of servers at once (needs that many replicas)",
    )
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=40)
    group.add_argument("--lr", type=float, default=lr)
    group.add_argument("--batch_size", type=int, default=8)
    group.add_argument("--seq_len", type=int, default=32, help="tokens per sequence (all sequences have this length)")
    group.add_argument("--seed", type=int, default=0, help="seeds the data and the initial trainable parameters")
    group.add_argument("--output_dir", default=output_dir, help="where to save the trained parameters")
    group.add_argument("--no_progress", action="store_true", help="no progress bar")


def run_script(main: Any) -> None:
    """A script's entry point: Ctrl-C ends it with status 130 once its swarm has been stopped."""
    try:
        main()
    except KeyboardInterrupt:
        print("\nInterrupted; the swarm was stopped", file=sys.stderr)
        sys.exit(130)


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.initial_peers and args.model is None:
        parser.error("--initial_peers needs --model: the checkpoint that swarm serves (for its embeddings and head)")
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 2 or args.num_chains < 1:
        parser.error("need --steps >= 1, --batch_size >= 1, --seq_len >= 2 and --num_chains >= 1")


@contextlib.contextmanager
def swarm_for(args: argparse.Namespace) -> Iterator[tuple[str, list[str]]]:
    """(checkpoint, initial_peers) for add_common_args' flags; a local swarm started here is stopped on exit.

    Without --model, a tiny random Llama is written first; it is deterministic, so a later run with
    the same --model_dir finds the same checkpoint there.
    """
    from petals_like.models.tiny import make_tiny_model
    from petals_like.testing.local_swarm import LocalSwarm

    with contextlib.ExitStack() as stack:
        model = args.model
        if model is None:
            if args.model_dir is not None:
                root = Path(args.model_dir)
            else:
                root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="petals_like_finetune_"))) / "tiny-llama"
            model = str(make_tiny_model(root, family="llama", preset="tiny"))
        if args.initial_peers:
            yield model, list(args.initial_peers)
            return
        spans = args.spans or halves(model)
        swarm = stack.enter_context(LocalSwarm(model, spans, server_args=args.server_args.split()))
        yield model, swarm.peers


def halves(model: str) -> list[str]:
    """Two spans that split the model's blocks in half, e.g. ["0:4", "4:8"]."""
    from petals_like.models.checkpoint import resolve_checkpoint
    from petals_like.models.spec import ModelSpec

    num_blocks = ModelSpec.from_pretrained(resolve_checkpoint(model)).num_blocks
    if num_blocks < 2:
        return [f"0:{num_blocks}"]
    return [f"0:{num_blocks // 2}", f"{num_blocks // 2}:{num_blocks}"]

"""Write a random-weight Llama / Mistral / Qwen2 checkpoint (with a byte-level tokenizer) and print its path,
or with --trained train a small Llama on the Python standard library (~13 minutes on 2 cores).

    python -m petals_like.cli.make_tiny_model /tmp/tiny-llama
    python -m petals_like.cli.make_tiny_model /tmp/bench-llama --preset bench --max_shard_size 200MB
    python -m petals_like.cli.make_tiny_model --trained                # into the cache the demo uses

Works offline; running it again with the same arguments returns the existing folder.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch

from petals_like.models.tiny import FAMILIES, PRESETS, make_tiny_model
from petals_like.models.trained import DEFAULT_BUDGET_S, default_trained_path, make_trained_model, read_training_record

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "out", nargs="?", help="folder to write the checkpoint to (created if missing); with --trained, default: the cache"
    )
    parser.add_argument(
        "--trained",
        action="store_true",
        help=f"train a 4-block Llama on this Python's standard library instead (default OUT: {default_trained_path()})",
    )
    parser.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help=f"with --trained: seconds of training (default: {DEFAULT_BUDGET_S:.0f}); shorter gives a higher perplexity",
    )
    parser.add_argument("--family", choices=FAMILIES, default="llama", help="architecture (default: %(default)s)")
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="tiny",
        help="size: tiny = 8 blocks of hidden 64; bench = 16 blocks of hidden 1024, ~200M parameters (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: %(default)s)")
    parser.add_argument(
        "--max_shard_size",
        default=None,
        help="split weights into safetensors shards of at most this size, e.g. 100KB or 200MB "
        "(default: one file up to transformers' limit)",
    )
    parser.add_argument("--tie_word_embeddings", action="store_true", help="share the embedding and LM head weights")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="float32", help="dtype the weights are saved in (default: %(default)s)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild even if OUT holds a model made with other arguments (or, with --trained, another version)",
    )
    args = parser.parse_args(argv)
    if args.trained:
        _make_trained(parser, args)
        return
    if args.out is None:
        parser.error("the folder OUT is required (it is optional only with --trained)")
    if args.budget_s is not None:
        parser.error("--budget_s applies to --trained only")

    try:
        path = make_tiny_model(
            args.out,
            family=args.family,
            preset=args.preset,
            seed=args.seed,
            max_shard_size=args.max_shard_size,
            tie_word_embeddings=args.tie_word_embeddings,
            dtype=DTYPES[args.dtype],
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    print(path)


def _make_trained(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    random_only = [f"--{name}" for name in ("family", "preset", "max_shard_size", "tie_word_embeddings", "dtype")
                   if getattr(args, name) != parser.get_default(name)]  # fmt: skip
    if random_only:
        parser.error(f"{', '.join(random_only)} apply to random-weight models only, not to --trained")
    budget_s = DEFAULT_BUDGET_S if args.budget_s is None else args.budget_s
    if budget_s <= 0:
        parser.error(f"--budget_s must be positive, got {args.budget_s}")
    out = args.out or default_trained_path()
    try:
        path = make_trained_model(out, budget_s=budget_s, seed=args.seed, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    record = read_training_record(path)
    print(path)
    print(
        f"validation perplexity {record['validation_perplexity']:.2f} (unigram baseline {record['unigram_perplexity']:.1f}) "
        f"after {record['steps']} steps, {record['train_seconds']:.0f} s of training"
    )


if __name__ == "__main__":
    main()

"""Write a random-weight Llama / Mistral / Qwen2 checkpoint (with a byte-level tokenizer) and print its path.

    python -m petals_like.cli.make_tiny_model /tmp/tiny-llama
    python -m petals_like.cli.make_tiny_model /tmp/bench-llama --preset bench --max_shard_size 200MB

Works offline; running it again with the same arguments returns the existing folder.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch

from petals_like.models.tiny import FAMILIES, PRESETS, make_tiny_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write the checkpoint to (created if missing)")
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
        "--overwrite", action="store_true", help="rebuild even if OUT holds a tiny model made with other arguments"
    )
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    main()

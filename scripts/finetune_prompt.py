"""Prompt-tune through a swarm: trainable soft prompts here, frozen blocks on the servers.

    python scripts/finetune_prompt.py                           # deep_ptune, tiny random Llama, local swarm
    python scripts/finetune_prompt.py --tuning_mode ptune --pre_seq_len 16 --steps 80
    python scripts/finetune_prompt.py --model PATH --initial_peers /ip4/.../p2p/...   # an existing swarm

ptune learns pre_seq_len vectors placed before every input; deep_ptune also learns one set per
block, added to the prompt positions before that block (the servers return their gradients). The
task is synthetic (petals_like/testing/pattern_task.py). The prompts are saved as prompts.safetensors,
which DistributedModelForCausalLM.load_prompts() reads back into a model made with the same
tuning_mode and pre_seq_len.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing
sys.path.insert(1, str(Path(__file__).resolve().parent))  # harness/ beside this file, also when it is loaded by path (tests)

import torch  # noqa: E402

from harness.finetune import add_common_args, check_common_args, run_script, swarm_for, train_and_save  # noqa: E402


def main(argv: Optional[list[str]] = None) -> list[float]:
    """Returns the loss of every step."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, lr=1e-1, output_dir="finetuned-prompts")
    group = parser.add_argument_group("prompt tuning")
    group.add_argument("--tuning_mode", choices=["ptune", "deep_ptune"], default="deep_ptune")
    group.add_argument("--pre_seq_len", type=int, default=8, help="number of trainable prompt positions")
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    if args.pre_seq_len < 1:
        parser.error(f"--pre_seq_len must be >= 1, got {args.pre_seq_len}")

    from petals_like import AutoDistributedModelForCausalLM
    from petals_like.utils.cli import setup_logging

    setup_logging("WARNING")
    torch.manual_seed(args.seed)  # which embedding rows the prompts start from
    print("Starting a local swarm" if not args.initial_peers else "Joining the swarm", flush=True)
    with swarm_for(args) as (model_path, peers):
        print(f"Model: {model_path}; initial peers: {' '.join(peers)}", flush=True)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            model_path,
            initial_peers=peers,
            torch_dtype="float32",
            tuning_mode=args.tuning_mode,
            pre_seq_len=args.pre_seq_len,
            num_chains=args.num_chains,
        )
        try:
            description = f"{args.tuning_mode}, pre_seq_len={args.pre_seq_len}"
            losses, _, _ = train_and_save(model, model_path, args, description, "prompts")
        finally:
            model.shutdown()
    return losses


if __name__ == "__main__":
    run_script(main)

"""Fine-tune a LoRA adapter through a swarm: the blocks stay frozen on the servers, the adapter here.

    python scripts/finetune_lora.py                         # tiny random Llama, local swarm of 2 servers
    python scripts/finetune_lora.py --steps 60 --rank 16 --target_modules q_proj k_proj v_proj o_proj --check
    python scripts/finetune_lora.py --model PATH --initial_peers /ip4/.../p2p/...   # an existing swarm

The task is synthetic (petals_like/testing/pattern_task.py): lines repeating a short random word. The
adapter is saved in PEFT's format (adapter_config.json + adapter_model.safetensors), so that
peft.PeftModel.from_pretrained loads it onto the base checkpoint, and run_server --adapters serves
it. --check does exactly that with local transformers and compares logits with the swarm's.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing
sys.path.insert(1, str(Path(__file__).resolve().parent))  # harness/ beside this file, also when it is loaded by path (tests)

import torch  # noqa: E402

from harness.finetune import add_common_args, check_common_args, run_script, swarm_for, train_and_save  # noqa: E402

DEFAULT_TARGETS = ["q_proj", "v_proj"]


def main(argv: Optional[list[str]] = None) -> list[float]:
    """Returns the loss of every step."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, lr=2e-2, output_dir="finetuned-lora")
    group = parser.add_argument_group("LoRA")
    group.add_argument("--rank", type=int, default=8)
    group.add_argument("--alpha", type=float, default=16, help="LoRA scaling is alpha / rank")
    group.add_argument(
        "--target_modules",
        nargs="+",
        default=DEFAULT_TARGETS,
        help="projections of each block to adapt: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj",
    )
    group.add_argument(
        "--check",
        action="store_true",
        help="load the saved adapter with peft onto local transformers and compare logits with the swarm",
    )
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    if args.rank < 1:
        parser.error(f"--rank must be >= 1, got {args.rank}")

    from peft import LoraConfig

    from petals_like import AutoDistributedModelForCausalLM
    from petals_like.utils.cli import setup_logging

    setup_logging("WARNING")
    torch.manual_seed(args.seed)  # the adapter's initial A matrices
    print("Starting a local swarm" if not args.initial_peers else "Joining the swarm", flush=True)
    with swarm_for(args) as (model_path, peers):
        print(f"Model: {model_path}; initial peers: {' '.join(peers)}", flush=True)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            model_path, initial_peers=peers, torch_dtype="float32", num_chains=args.num_chains
        )
        try:
            lora = model.add_lora(LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=args.target_modules))
            description = f"LoRA r={args.rank} alpha={args.alpha} on {' '.join(lora.targets)}"
            losses, saved, check_batch = train_and_save(model, model_path, args, description, "adapter")
            if args.check:
                diff = compare_with_peft(model, model_path, saved, check_batch)
                print(f"Check: max |logits difference| swarm vs peft + transformers = {diff:.2e}")
        finally:
            model.shutdown()
    return losses


@torch.no_grad()
def compare_with_peft(model: torch.nn.Module, model_path: str, adapter: Path, input_ids: torch.Tensor) -> float:
    """The largest absolute logit difference between the swarm and peft loading the saved adapter locally."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per tiny checkpoint load is noise in this output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers API deprecated in v5
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        reference = PeftModel.from_pretrained(base, adapter).eval()
    expected = reference(input_ids=input_ids).logits
    actual = model(input_ids).logits
    return (actual - expected).abs().max().item()


if __name__ == "__main__":
    run_script(main)

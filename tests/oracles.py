"""What tests compare against: local transformers and PEFT on the same checkpoint, and how close is close."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

TOLERANCE = 1e-4  # relative, float32: remote vs local outputs and gradients


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def oracle(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def peft_lora_grads(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's LoRA gradients under our names: '{block}_{target}_{A|B}'."""
    grads = {}
    for name, param in peft_model.named_parameters():
        if "lora_" in name and param.grad is not None:
            parts = name.split(".")
            layer = parts.index("layers" if "layers" in parts else "h")  # Llama's layout, or Falcon's and BLOOM's
            grads[f"{parts[layer + 1]}_{parts[layer + 3]}_{'A' if 'lora_A' in name else 'B'}"] = param.grad
    return grads


def make_hosted_adapter(tiny_model: Path, path: Path) -> Path:
    """A PEFT LoRA made with peft itself (non-zero B, so it changes the model), for run_server --adapters."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(
        oracle(tiny_model), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(path)
    return path

"""scripts/finetune_lora.py and scripts/finetune_prompt.py as users run them: each makes the tiny
model, starts its own local swarm (DHT + 2 server processes), trains, saves, and stops the swarm."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import torch

from petals_like.testing.processes import live_descendants
from tests.swarm import kill_new_descendants

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def reap_new_children() -> Iterator[None]:
    """The scripts stop their swarm themselves; should one fail to, its processes still go, by PID."""
    before = {p.pid for p in live_descendants()}
    yield
    left = kill_new_descendants(before)
    assert not left, f"the script left processes running: {left}"


def test_lora_script_halves_the_loss_and_saves_a_peft_adapter(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, adapter = tmp_path / "tiny-llama", tmp_path / "adapter"
    losses = load_script("finetune_lora").main(
        [
            "--model_dir",
            str(model_dir),
            "--output_dir",
            str(adapter),
            "--steps",
            "24",
            "--rank",
            "8",
            "--seed",
            "0",
            "--no_progress",
            "--check",
        ]
    )
    assert len(losses) == 24
    assert sum(losses[-3:]) / 3 <= losses[0] / 2, losses

    check = re.search(r"max \|logits difference\| .* = (\S+)", capsys.readouterr().out)
    assert check is not None and float(check.group(1)) < 1e-4  # the swarm and local peft agree on the saved adapter

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter)
    lora_b = [p for name, p in peft_model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 8 * 2  # every block, q_proj and v_proj
    assert all(p.abs().max() > 0 for p in lora_b)  # trained: PEFT initializes B at zero


def test_prompt_script_lowers_the_loss_and_saves_prompts(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    output = tmp_path / "prompts"
    losses = load_script("finetune_prompt").main(
        [
            "--model_dir",
            str(tmp_path / "tiny-llama"),
            "--output_dir",
            str(output),
            "--tuning_mode",
            "deep_ptune",
            "--pre_seq_len",
            "4",
            "--steps",
            "8",
            "--no_progress",
        ]
    )
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < losses[0], losses

    saved = load_file(str(output / "prompts.safetensors"))
    assert saved["prompts"].shape == (4, 64)
    assert saved["deep_prompts"].shape == (8, 4, 64)
    assert saved["deep_prompts"].abs().max() > 0  # deep prompts start at zero

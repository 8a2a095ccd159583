"""Operations checked against local transformers / PEFT on the same checkpoint, for long swarm runs.

GenerationCheck: greedy generation through the swarm, one generate() call or a session continued
over two calls, equals transformers' generate() in float32 token for token.
TrainingCheck: one LoRA step through the swarm (forward with labels, backward) gives the loss and
every LoRA gradient of local PEFT models holding the same weights, on the same batch (criterion in
TrainingCheck); then the swarm client's optimizer steps, and the next check copies the new weights
into PEFT again.

Each check is a callable check(i) -> None when the i-th operation was right, or what was wrong.
"""

from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

LORA_TARGETS = ("q_proj", "v_proj", "down_proj")  # attention and MLP
_PEFT_PARAM = re.compile(r"\.layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.")
FIRST_TOKEN_ID = 4  # prompts avoid the special tokens (<unk>, <s>, </s>, <pad>) of tiny checkpoints


def local_model(model_path: str | Path) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per tiny checkpoint load is noise
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@dataclass
class GenerationCase:
    prompt: torch.Tensor  # [1, prompt_len]
    new_tokens: int
    expected: torch.Tensor  # [1, <= prompt_len + new_tokens]: shorter when the reference stopped at EOS

    @property
    def splittable(self) -> bool:
        """Whether a session may produce it in two calls: with an EOS before the end the two differ in length."""
        return self.new_tokens >= 2 and self.expected.shape[1] == self.prompt.shape[1] + self.new_tokens


class GenerationCheck:
    def __init__(
        self,
        model: Any,
        model_path: str | Path,
        *,
        cases: int,
        max_new_tokens: int,
        seed: int,
        workers: int,
        max_prompt_len: int = 40,
    ):
        """`cases` prompts of 4..max_prompt_len tokens (long ones span several 16-token prefix pages, so
        sessions reuse cached pages and fail over with them) and their references, computed here."""
        self.model = model
        self.workers = workers
        rng = random.Random(seed)
        reference = local_model(model_path)
        vocab = reference.config.vocab_size
        self.cases: list[GenerationCase] = []
        with torch.no_grad():
            for _ in range(cases):
                length = rng.randint(4, max_prompt_len)
                prompt = torch.tensor([[rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(length)]])
                new_tokens = rng.randint(max(1, max_new_tokens // 2), max_new_tokens)
                expected = reference.generate(
                    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False
                )
                self.cases.append(GenerationCase(prompt, new_tokens, expected))

    def for_worker(self, worker: int) -> Any:
        """worker's check(i): worker w runs cases w, w + workers, ...; every other one in a continued session."""

        def check(i: int) -> Optional[str]:
            case = self.cases[(worker + i * self.workers) % len(self.cases)]
            if case.splittable and (worker + i) % 2:
                first_part = case.new_tokens // 2
                with self.model.inference_session(max_length=case.expected.shape[1]) as session:
                    first = self.model.generate(case.prompt, max_new_tokens=first_part, session=session)
                    rest = self.model.generate(None, max_new_tokens=case.new_tokens - first_part, session=session)
                got, how = torch.cat([first, rest], dim=1), "a session over two calls"
            else:
                got, how = self.model.generate(case.prompt, max_new_tokens=case.new_tokens), "one call"
            if torch.equal(got, case.expected):
                return None
            return (
                f"generation ({how}) of prompt {case.prompt[0].tolist()} gave {got[0].tolist()}, "
                f"expected {case.expected[0].tolist()}"
            )

        return check


class _PeftOracle:
    """Local transformers + PEFT in `dtype`, with the LoRA parameters named as the client names them."""

    def __init__(self, model_path: str | Path, lora_config: Any, dtype: torch.dtype):
        from peft import get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers API deprecated in v5
            self.model = get_peft_model(local_model(model_path).to(dtype), lora_config)
        self.params: dict[str, torch.nn.Parameter] = {}  # `{block}_{target}_{A|B}` -> PEFT's parameter
        for name, param in self.model.named_parameters():
            found = _PEFT_PARAM.search(name)
            if found is not None:
                self.params["_".join(found.groups())] = param

    def step(self, weights: dict[str, torch.Tensor], input_ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
        """The loss and the LoRA gradients with these weights on this batch (labels = input_ids)."""
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(weights[name])
        self.model.zero_grad(set_to_none=True)
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss.item(), {name: param.grad for name, param in self.params.items()}


class TrainingCheck:
    """The criterion, per LoRA tensor (norms over the tensor): |ours - g64| <= tolerance * |g64| +
    NOISE_FACTOR * |g32 - g64|, where g64 and g32 are PEFT's gradients in float64 and float32. The
    second term is float32 rounding as PEFT itself makes it: over many steps some tensors' gradients
    get small (the last block's q_proj A, mostly), and there float32 alone, in PEFT as here, is off
    by more than 1e-4 relative. A fail-over bug (a span's gradient missing, doubled, or computed
    with other weights or inputs) is off by the gradient's own size, far above both terms."""

    NOISE_FACTOR = 10.0

    def __init__(
        self,
        model: Any,
        model_path: str | Path,
        *,
        rank: int,
        lr: float,
        batch_size: int,
        seq_len: int,
        seed: int,
        tolerance: float,
    ):
        """Adds a LoRA (rank, LORA_TARGETS, random B) to `model`, a client with no adapter yet."""
        from peft import LoraConfig
        from transformers import AutoTokenizer

        from petals_like.testing.pattern_task import pattern_batches

        def lora_config() -> Any:
            return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS))

        self.model = model
        self.tolerance = tolerance
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the adapter's initial A matrices
            self.lora = model.add_lora(lora_config())
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # PEFT starts B at zero, where A gets no gradient: random B checks every one
            for name, weight in self.lora.weights.items():
                if name.endswith("_B"):
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
        self.optimizer = torch.optim.AdamW(self.lora.parameters(), lr=lr)
        self.oracles = [_PeftOracle(model_path, lora_config(), dtype) for dtype in (torch.float32, torch.float64)]
        if any(sorted(oracle.params) != sorted(self.lora.weights.keys()) for oracle in self.oracles):
            raise RuntimeError("PEFT's LoRA parameters do not match the client's")
        self.batches = pattern_batches(AutoTokenizer.from_pretrained(model_path), batch_size, seq_len, seed=seed)
        self.worst = 0.0  # the largest error / allowed of any gradient so far (<= 1: all right)

    def __call__(self, i: int) -> Optional[str]:
        input_ids = next(self.batches)
        self.optimizer.zero_grad(set_to_none=True)  # also drops what a failed step left behind
        loss = self.model(input_ids, labels=input_ids).loss
        loss.backward()
        weights = {name: weight.detach() for name, weight in self.lora.weights.items()}
        (_, grads32), (expected, grads64) = (oracle.step(weights, input_ids) for oracle in self.oracles)

        problems = []
        if abs(loss.item() - expected) > self.tolerance * abs(expected):
            problems.append(f"loss {loss.item():.6f} vs {expected:.6f}")
        for name, weight in self.lora.weights.items():
            g64 = grads64[name]
            if weight.grad is None:
                problems.append(f"no gradient for {name}")
                continue
            error = float((weight.grad.double() - g64).norm())
            noise = float((grads32[name].double() - g64).norm())
            allowed = self.tolerance * float(g64.norm()) + self.NOISE_FACTOR * noise
            self.worst = max(self.worst, error / allowed if allowed > 0 else float("inf") if error > 0 else 0.0)
            if error > allowed:
                problems.append(
                    f"gradient of {name}: error {error:.2e} > allowed {allowed:.2e} "
                    f"(relative {error / max(float(g64.norm()), 1e-30):.2e})"
                )
        self.optimizer.step()
        return f"training step {i}: " + "; ".join(problems[:5]) if problems else None

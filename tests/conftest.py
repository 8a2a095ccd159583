"""Shared fixtures: random-weight checkpoints (and the trained one) built once per test session, offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import settings

from petals_like.models.tiny import make_tiny_model

# scripts/harness (the soak, chaos and fine-tuning logic behind scripts/*.py, not part of the installed
# package) is imported as `harness`, as the scripts import it
sys.path.append(str(Path(__file__).resolve().parent.parent / "scripts"))

# The same examples on every run (CI included), seeded from each test's source; `pytest --hypothesis-profile
# explore` draws fresh random examples on each run and prints a reproduction blob for any failure.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile("repeatable")

TINY_SHARD_SIZE = "200KB"  # about one block per shard, so the sharded (indexed) loading path is what tests use


@pytest.fixture(scope="session")
def make_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_model(**kwargs of make_tiny_model) -> Path; one folder per distinct kwargs per session."""
    cache: dict[str, Path] = {}

    def make(**kwargs: Any) -> Path:
        key = json.dumps(kwargs, sort_keys=True, default=str)
        if key not in cache:
            name = f"{kwargs.get('preset', 'tiny')}-{kwargs.get('family', 'llama')}"  # the swarm's dht_prefix
            cache[key] = make_tiny_model(tmp_path_factory.mktemp("model") / name, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(make_model: Callable[..., Path]) -> Path:
    """Llama, tiny preset (8 blocks, Llama-3 rope scaling), sharded."""
    return make_model(family="llama", preset="tiny", max_shard_size=TINY_SHARD_SIZE)


# The trained model's quick build where this machine has not cached the full one (CI starts empty): 2 blocks,
# 128-token windows, a 2048-token vocabulary and a fixed step count: ~1 minute on 2 idle cores, and
# ~0.1-0.2x the unigram perplexity
QUICK_TRAINED = dict(num_hidden_layers=2, seq_len=128, vocab_size=2048, warmup_steps=20, max_steps=250, validation_tokens=32768)
QUICK_TRAINED_BUDGET_S = 180.0  # a cap for a loaded machine; on an idle one the step count ends training first


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Llama trained on the standard library: this machine's cached one if built, else a quick build."""
    from petals_like.models.trained import default_trained_path, is_complete, make_trained_model

    if is_complete(default_trained_path()):
        return default_trained_path()
    folder = tmp_path_factory.mktemp("trained") / "trained-llama"
    return make_trained_model(folder, budget_s=QUICK_TRAINED_BUDGET_S, progress=False, **QUICK_TRAINED)


@pytest.fixture(scope="module", autouse=True)
def no_leftover_daemons():
    """After each test module's fixtures are torn down, no p2pd started by this process may remain."""
    from tests.swarm import p2pd_children

    before = {p.pid for p in p2pd_children()}
    yield
    import psutil

    leftovers = [p for p in p2pd_children() if p.pid not in before]
    psutil.wait_procs(leftovers, timeout=5)
    alive = [p for p in leftovers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"p2pd daemons left running after the module: {[p.pid for p in alive]}"


@pytest.fixture(scope="module")
def model(swarm, tiny_model: Path):
    """A client of the module's `swarm` fixture (each swarm test module defines its own swarm)."""
    from petals_like import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.peers, torch_dtype="float32")
    yield model
    model.shutdown()


@pytest.fixture(scope="module")
def hosted_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA of the tiny model (non-zero B), for run_server --adapters; hosted as "chat"."""
    from tests.oracles import make_hosted_adapter

    return make_hosted_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "chat")


@pytest.fixture(scope="module")
def reference(tiny_model: Path):
    """The oracle: local transformers on the same checkpoint, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture
def int4_kernel() -> None:
    """Skips a test unless 4-bit weights go through torch's CPU kernel on this build."""
    from petals_like.quant import weights

    if not weights._int4_kernel_available():
        pytest.skip("this torch build has no CPU 4-bit kernel")


@pytest.fixture
def int4_unpacked(int4_kernel) -> None:
    """Skips a test unless the CPU 4-bit kernel's packed layout here is the one weights.py unpacks."""
    from petals_like.quant import weights

    if not weights._int4_layout_known():
        pytest.skip("this CPU's 4-bit layout is not one that is unpacked")


@pytest.fixture
def float32_products(monkeypatch) -> list[int]:
    """Float32 products on (as on CPUs without native bfloat16 matmuls), 64-wide weights sliced
    5 rows at a time, and the row counts of every call that took the path."""
    from petals_like.models import linear as linear_module

    monkeypatch.setattr(linear_module, "_float32_products_on", True)
    monkeypatch.setattr(linear_module, "_UPCAST_SLICE_BYTES", 7 * 64 * 4)  # 50 rows: 10 slices of 5
    calls: list[int] = []
    real = linear_module.float32_products

    def spy(x, weight, *args):
        calls.append(x.numel() // x.shape[-1])
        return real(x, weight, *args)

    monkeypatch.setattr(linear_module, "float32_products", spy)
    return calls

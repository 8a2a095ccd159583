"""petals_like: run and fine-tune large language models over a swarm of servers that each host a span of blocks."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["AutoDistributedModelForCausalLM", "DistributedModelForCausalLM", "__version__"]


def __getattr__(name: str):
    # lazy: `import petals_like` stays cheap for the server and CLI tools that never build a client
    if name in ("AutoDistributedModelForCausalLM", "DistributedModelForCausalLM"):
        from petals_like.client import model

        return getattr(model, name)
    raise AttributeError(name)

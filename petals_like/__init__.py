"""petals_like: run and fine-tune large language models over a swarm of servers that each host a span of blocks."""

from __future__ import annotations

__version__ = "0.1.0"

_CLIENT = {  # lazy: `import petals_like` stays cheap for the server and CLI tools that never build a client
    "AutoDistributedConfig": "petals_like.client.distributed_config",
    "AutoDistributedModel": "petals_like.client.model",
    "AutoDistributedModelForCausalLM": "petals_like.client.model",
    "AutoDistributedModelForSequenceClassification": "petals_like.client.classification",
    "DistributedModel": "petals_like.client.model",
    "DistributedModelForCausalLM": "petals_like.client.model",
    "DistributedModelForSequenceClassification": "petals_like.client.classification",
    "RemoteSequential": "petals_like.client.sequential",
}

__all__ = [*_CLIENT, "__version__"]


def __getattr__(name: str):
    if name in _CLIENT:
        import importlib

        return getattr(importlib.import_module(_CLIENT[name]), name)
    raise AttributeError(name)

"""The model's transformers config, carrying the client's distributed settings (Petals' DistributedLlamaConfig).

`model.config` is the checkpoint's own config (hidden_size, num_hidden_layers, ...) whose class also
has every ClientConfig field (initial_peers, request_timeout, use_push, ...) as a property that reads
and writes the client's live ClientConfig: `model.config.max_retries = 2` changes what the client
does. Saving the config writes the checkpoint's fields only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from transformers import AutoConfig, PretrainedConfig

from petals_like.config import ClientConfig

_CLIENT = "_client_config"
_FIELDS = frozenset(f.name for f in dataclasses.fields(ClientConfig))
_classes: dict[type, type] = {}


def _client_property(name: str) -> property:
    def get(self: PretrainedConfig) -> Any:
        return getattr(self.__dict__[_CLIENT], name)

    def set_(self: PretrainedConfig, value: Any) -> None:
        setattr(self.__dict__[_CLIENT], name, value)

    return property(get, set_, doc=f"ClientConfig.{name} of the model's client")


def _to_dict(self: PretrainedConfig) -> dict[str, Any]:
    output = super(type(self), self).to_dict()
    output.pop(_CLIENT, None)
    return output


def _distributed_class(base: type) -> type:
    """`base` (e.g. LlamaConfig) with the ClientConfig fields as properties; one class per base."""
    if base not in _classes:
        namespace: dict[str, Any] = {name: _client_property(name) for name in _FIELDS}
        namespace.update(to_dict=_to_dict, __module__=__name__)
        _classes[base] = type(f"Distributed{base.__name__}", (base,), namespace)
    return _classes[base]


def with_client_config(config: PretrainedConfig, client: ClientConfig) -> PretrainedConfig:
    """`config`, now also carrying `client` (the same object, not a copy)."""
    base = type(config)
    if _CLIENT in config.__dict__:  # already distributed: re-point it
        base = base.__mro__[1]
    config.__class__ = _distributed_class(base)
    config.__dict__[_CLIENT] = client
    return config


def client_config_of(config: PretrainedConfig) -> ClientConfig | None:
    """The ClientConfig a distributed config carries (None for a plain transformers config)."""
    return config.__dict__.get(_CLIENT)


class AutoDistributedConfig:
    """AutoDistributedConfig.from_pretrained(path, initial_peers=[...], **ClientConfig fields): the
    checkpoint's config with the client's settings, to pass as `config=` to a model's from_pretrained.
    A hub name's config.json and weight index are fetched (at revision, with token, into cache_dir) as from_pretrained does."""

    @staticmethod
    def from_pretrained(
        name_or_path: str | Path,
        *,
        revision: Optional[str] = None,
        token: Optional[str | bool] = None,
        cache_dir: Optional[str | Path] = None,
        **client_kwargs: Any,
    ) -> PretrainedConfig:
        from petals_like.models.hub import open_checkpoint

        unknown = set(client_kwargs) - _FIELDS
        if unknown:
            raise TypeError(f"unknown arguments {sorted(unknown)}; ClientConfig accepts {sorted(_FIELDS)}")
        if "initial_peers" in client_kwargs:
            client_kwargs["initial_peers"] = tuple(client_kwargs["initial_peers"])
        checkpoint = open_checkpoint(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
        config = AutoConfig.from_pretrained(checkpoint.folder)
        return with_client_config(config, ClientConfig(**client_kwargs))

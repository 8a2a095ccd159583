"""Llama-family block math (Llama, Mistral, Qwen2)."""

from __future__ import annotations

from petals_like.models.llama.block import LlamaBlock

__all__ = ["LlamaBlock"]

"""The parts of a Llama-family model a client keeps: token embeddings, final norm, LM head.

Everything between embed() and logits() runs on servers. Names mirror transformers
(`embed_tokens`, `norm`, `lm_head`) so CheckpointReader.client_state_dict() loads as is.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from petals_like.models.linear import linear
from petals_like.models.llama.block import make_norm
from petals_like.models.spec import ModelSpec

# norm.bias: LayerNorm's (Falcon, BLOOM); embed_norm.*: BLOOM's LayerNorm after the embeddings
_KEYS = ("embed_tokens.weight", "norm.weight", "lm_head.weight", "norm.bias", "embed_norm.weight", "embed_norm.bias")


class LocalModules(nn.Module):
    """embed: ids [batch, seq] -> hidden [batch, seq, hidden]; logits: hidden -> [batch, seq, vocab].

    Invariant: with tied embeddings, `lm_head.weight is embed_tokens.weight` (one Parameter), so
    there is one copy in memory and fine-tuning updates both uses, as in transformers.
    """

    def __init__(self, spec: ModelSpec, *, tie_word_embeddings: Optional[bool] = None) -> None:
        """`tie_word_embeddings` defaults to the spec; from_state_dict() passes what the checkpoint holds."""
        super().__init__()
        self.spec = spec
        self.tied = spec.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
        # padding_idx as in transformers: the pad row gets no gradient when the embeddings are trained
        pad = spec.pad_token_id if spec.pad_token_id is not None and 0 <= spec.pad_token_id < spec.vocab_size else None
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, padding_idx=pad)
        self.norm = make_norm(spec, spec.hidden_size)
        self.embed_norm = make_norm(spec, spec.hidden_size) if spec.embed_norm else None
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if self.tied:
            self.lm_head.weight = self.embed_tokens.weight

    @classmethod
    def from_state_dict(cls, spec: ModelSpec, state_dict: dict[str, Tensor]) -> LocalModules:
        """Wrap the given tensors without copying them (no second allocation of a large vocabulary).

        Tied when the spec says so, when lm_head.weight is missing, or when it is the embedding
        tensor itself (as CheckpointReader.client_state_dict() returns for tied checkpoints).
        """
        missing = [key for key in _KEYS[:2] if key not in state_dict]
        unexpected = sorted(set(state_dict) - set(_KEYS))
        if missing or unexpected:
            raise ValueError(f"client state dict: missing {missing}, unexpected {unexpected}; expected {list(_KEYS)}")
        embed = state_dict["embed_tokens.weight"]
        head = state_dict.get("lm_head.weight")
        tied = spec.tie_word_embeddings or head is None or head is embed
        expected = {
            "embed_tokens.weight": (spec.vocab_size, spec.hidden_size),
            "norm.weight": (spec.hidden_size,),
            "norm.bias": (spec.hidden_size,),
            "lm_head.weight": (spec.vocab_size, spec.hidden_size),
            "embed_norm.weight": (spec.hidden_size,),
            "embed_norm.bias": (spec.hidden_size,),
        }
        needs = {"norm.bias": spec.layer_norm, "embed_norm.weight": spec.embed_norm, "embed_norm.bias": spec.embed_norm}
        for key, needed in needs.items():
            if (key in state_dict) != needed:
                raise ValueError(f"client state dict: {key} {'missing' if needed else 'unexpected'} for a {spec.family} model")
        for key, tensor in state_dict.items():
            if tuple(tensor.shape) != expected[key]:
                raise ValueError(f"{key} has shape {tuple(tensor.shape)}, the model config expects {expected[key]}")

        with torch.device("meta"):  # no throwaway random init: the real tensors are assigned below
            local = cls(spec, tie_word_embeddings=tied)
        local.embed_tokens.weight = nn.Parameter(embed)
        local.norm.weight = nn.Parameter(state_dict["norm.weight"])
        if spec.layer_norm:
            local.norm.bias = nn.Parameter(state_dict["norm.bias"])
        if spec.embed_norm:
            local.embed_norm.weight = nn.Parameter(state_dict["embed_norm.weight"])
            local.embed_norm.bias = nn.Parameter(state_dict["embed_norm.bias"])
        local.lm_head.weight = local.embed_tokens.weight if tied else nn.Parameter(head)
        return local

    def embed(self, input_ids: Tensor) -> Tensor:
        """input_ids [batch, seq] -> hidden [batch, seq, hidden]."""
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() and not bool(((input_ids >= 0) & (input_ids < self.spec.vocab_size)).all()):
            # checked here: an out-of-range id on a GPU is an opaque device-side assert
            raise ValueError(
                f"input_ids must be in [0, {self.spec.vocab_size}), got min={int(input_ids.min())} max={int(input_ids.max())}"
            )
        embedded = self.embed_tokens(input_ids)
        if self.embed_norm is not None:  # BLOOM
            embedded = self.embed_norm(embedded)
        if self.spec.embed_scale is not None:  # Gemma: the scale rounded to the embeddings' dtype, as transformers does
            embedded = embedded * torch.tensor(self.spec.embed_scale, dtype=embedded.dtype)
        return embedded

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [batch, seq, hidden] (from the last block) -> logits [batch, seq, vocab]: norm, then head.

        Hidden states come back from servers in the wire dtype, so they are cast to this
        module's dtype first (a float32 hidden into a bfloat16 head would fail).
        """
        hidden = hidden.to(self.lm_head.weight.dtype)
        logits = linear(self.norm(hidden), self.lm_head.weight, self.lm_head.bias)
        if self.spec.final_softcap is not None:  # Gemma 2
            logits = torch.tanh(logits / self.spec.final_softcap) * self.spec.final_softcap
        return logits

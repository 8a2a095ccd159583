"""DistributedModelForSequenceClassification: transformers' LlamaForSequenceClassification (and Mistral's,
Qwen2's) with every block in the swarm; embeddings, final norm and the `score` head here.

    model = AutoDistributedModelForSequenceClassification.from_pretrained(path, initial_peers=[...], num_labels=3)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)   # the score head only, by default
    model(input_ids, attention_mask=mask, labels=labels).loss.backward(); optimizer.step()

As in Petals, the embeddings and final norm start frozen (`model.local.requires_grad_(True)` trains
them too). Logits are pooled and the loss computed as transformers does it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from petals_like.client.model import DistributedModel
from petals_like.models.checkpoint import CheckpointReader

logger = logging.getLogger(__name__)

SCORE = "score.weight"  # where LlamaForSequenceClassification.save_pretrained puts the head
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


class DistributedModelForSequenceClassification(DistributedModel):
    """DistributedModel plus a local `score` head (Linear(hidden, num_labels, bias=False)): logits of
    each sequence at its last non-pad token, as transformers' *ForSequenceClassification."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.local.requires_grad_(False)  # only the head trains by default (as in Petals)
        # the LM head is not used here; drop it so an untied one does not stay in memory
        if not self.local.tied:
            self.local.lm_head = None
        self.num_labels = int(self.config.num_labels)
        self.score = self._new_score(self.num_labels)
        self._warned_embeds = False

    def _new_score(self, num_labels: int) -> torch.nn.Linear:
        """A head initialized as transformers does it: normal(0, initializer_range or 0.02)."""
        score = torch.nn.Linear(self.spec.hidden_size, num_labels, bias=False, device=self.device, dtype=self.dtype)
        std = getattr(self.config, "initializer_range", None) or 0.02
        with torch.no_grad():
            torch.nn.init.normal_(score.weight, mean=0.0, std=std)
        return score

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        initial_peers: Sequence[str] = (),
        *,
        num_labels: Optional[int] = None,
        problem_type: Optional[str] = None,
        **kwargs: Any,
    ) -> DistributedModelForSequenceClassification:
        """As DistributedModel.from_pretrained, plus num_labels (default: the config's) and problem_type
        (default: inferred by the loss, as transformers does). The head is the checkpoint's
        `score.weight` when it holds one, else freshly initialized."""
        if num_labels is not None and (not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1):
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {problem_type!r}")
        model = super().from_pretrained(name_or_path, initial_peers, **kwargs)
        try:
            if num_labels is not None:
                model.config.num_labels = num_labels
            if problem_type is not None:
                model.config.problem_type = problem_type
            if model.config.problem_type == "single_label_classification" and model.config.num_labels == 1:
                raise ValueError('problem_type="single_label_classification" needs num_labels > 1')
            model.num_labels = int(model.config.num_labels)
            model.score = model._new_score(model.num_labels)
            model._load_score(model.checkpoint_path)
        except BaseException:
            model.shutdown()
            raise
        return model

    def _load_score(self, path: Path) -> None:
        """Copy the checkpoint's score.weight into the head, if it has one."""
        reader = CheckpointReader(path)
        if SCORE not in reader.weight_map:
            logger.info(f"{path} has no {SCORE}: the classification head is newly initialized")
            return
        weight = reader.read([SCORE], self.dtype)[SCORE]
        if tuple(weight.shape) != tuple(self.score.weight.shape):
            raise ValueError(
                f"{SCORE} in {path} has shape {tuple(weight.shape)}, but num_labels={self.num_labels} needs "
                f"{tuple(self.score.weight.shape)}"
            )
        with torch.no_grad():
            self.score.weight.copy_(weight)

    def get_output_embeddings(self) -> None:
        return None

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> SequenceClassifierOutputWithPast:
        """logits [batch, num_labels] at each row's last non-pad token (and the loss with labels),
        differentiable. Rows of only pad tokens pool position 0; with inputs_embeds, the last position."""
        hidden, prefix = self._through_blocks(input_ids, attention_mask, inputs_embeds)
        hidden = hidden[:, prefix:].to(self.dtype)  # hidden states arrive in the wire dtype
        batch_size = hidden.shape[0]
        pad_token_id = self.config.pad_token_id
        if pad_token_id is None and batch_size != 1:
            raise ValueError("a batch of several sequences needs pad_token_id in the config, to find where each one ends")
        if pad_token_id is None:
            last = torch.full((batch_size,), hidden.shape[1] - 1, device=hidden.device)
        elif input_ids is not None:
            # transformers' rule: the rightmost token that is not pad_token_id (left or right padding)
            non_pad = (input_ids != pad_token_id).to(hidden.device, torch.int32)
            positions = torch.arange(input_ids.shape[-1], device=hidden.device, dtype=torch.int32)
            last = (positions * non_pad).argmax(-1)
        else:
            if not self._warned_embeds:
                logger.warning(f"{type(self).__name__} does not detect padding in inputs_embeds: the last position is used")
                self._warned_embeds = True
            last = torch.full((batch_size,), hidden.shape[1] - 1, device=hidden.device)
        pooled = self.local.norm(hidden[torch.arange(batch_size, device=hidden.device), last])
        logits = self.score(pooled)
        loss = None if labels is None else self._loss(logits, labels)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' ForSequenceClassificationLoss (it also fixes config.problem_type on first use)."""
        num_labels = self.num_labels
        if self.config.problem_type is None:
            if num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        labels = labels.to(logits.device)
        logits = logits.float()
        if self.config.problem_type == "regression":
            labels = labels.to(logits.dtype)
            if num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze())
            return F.mse_loss(logits, labels)
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1), ignore_index=-100)
        if self.config.problem_type == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {self.config.problem_type!r}")


class AutoDistributedModelForSequenceClassification:
    """Entry point named as in transformers (AutoModelForSequenceClassification) and Petals."""

    @staticmethod
    def from_pretrained(
        name_or_path: str | Path, initial_peers: Sequence[str] = (), **kwargs: Any
    ) -> DistributedModelForSequenceClassification:
        return DistributedModelForSequenceClassification.from_pretrained(name_or_path, initial_peers, **kwargs)

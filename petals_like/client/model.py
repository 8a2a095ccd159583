"""DistributedModelForCausalLM: embeddings, final norm and LM head here; every block in the swarm.

    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[...])
    out = model.generate(input_ids, max_new_tokens=32)
    with model.inference_session(max_length=512) as session:
        model.generate(input_ids, max_new_tokens=8, session=session)
        model.generate(None, max_new_tokens=8, session=session)   # continues where it stopped

Fine-tuning keeps every trainable parameter here (client/tuning.py):
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[...], tuning_mode="deep_ptune",
                                                            pre_seq_len=16)
    model.add_lora(peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model(input_ids, labels=input_ids).loss.backward(); optimizer.step()
    model.save_pretrained("my-adapter")   # PEFT's format (LoRA), plus prompts.safetensors
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput

from petals_like.client.generation import Generation, SamplingParams, left_pad_lens
from petals_like.client.head_batcher import HeadBatcher
from petals_like.client.inference_session import InferenceSession
from petals_like.client.sequential import RemoteSequential, RequestTuning
from petals_like.client.tuning import ClientLora, PromptTuning
from petals_like.config import ClientConfig
from petals_like.dht.node import SwarmNode
from petals_like.dht.records import default_dht_prefix
from petals_like.models.checkpoint import CheckpointReader, resolve_checkpoint
from petals_like.models.llama.head import LocalModules
from petals_like.models.spec import ModelSpec, resolve_dtype
from petals_like.routing.manager import RouteManager

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 20  # as transformers: prompt + new tokens when neither limit is given
PROMPTS_FILE = "prompts.safetensors"


class DistributedModelForCausalLM(torch.nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        local: LocalModules,
        node: SwarmNode,
        config: ClientConfig,
        dht_prefix: str,
        *,
        tuning_mode: Optional[str] = None,
        pre_seq_len: int = 0,
        name_or_path: str = "",
    ):
        super().__init__()
        self.spec = spec
        self.name_or_path = name_or_path
        self.config = config
        self.dht_prefix = dht_prefix
        self.node = node
        self.local = local
        self.routes = RouteManager(node, dht_prefix, spec.num_blocks, config)
        self.remote = RemoteSequential(node, self.routes, config, spec.num_blocks)
        self.head_batcher = HeadBatcher(self.local.logits)  # concurrent generate() calls share head passes
        self.prompt_tuning: Optional[PromptTuning] = None
        self.lora: Optional[ClientLora] = None
        if tuning_mode is not None:
            self.prompt_tuning = PromptTuning(spec, tuning_mode, pre_seq_len, init_from=local.embed_tokens.weight)
            self.local.requires_grad_(False)  # only the prompts train
        elif pre_seq_len:
            raise ValueError("pre_seq_len needs tuning_mode='ptune' or 'deep_ptune'")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        initial_peers: Sequence[str] = (),
        *,
        torch_dtype: str | torch.dtype = "auto",
        tuning_mode: Optional[str] = None,
        pre_seq_len: int = 0,
        **config_kwargs,
    ) -> DistributedModelForCausalLM:
        """Load only the embeddings, final norm and LM head; join the swarm through initial_peers.

        tuning_mode="ptune" adds pre_seq_len trainable prompt vectors before every input; "deep_ptune"
        also one per block. Other keywords are ClientConfig fields (e.g. num_chains, active_adapter).
        """
        known = {f.name for f in fields(ClientConfig)}
        unknown = set(config_kwargs) - known
        if unknown:
            raise TypeError(f"unknown arguments {sorted(unknown)}; ClientConfig accepts {sorted(known)}")
        config = ClientConfig(initial_peers=tuple(initial_peers), **config_kwargs)
        if not config.initial_peers:
            raise ValueError("initial_peers are required: the multiaddrs of any peer of the swarm")
        path = resolve_checkpoint(name_or_path)
        spec = ModelSpec.from_pretrained(path)
        dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else resolve_dtype(str(torch_dtype), spec)
        local = LocalModules.from_state_dict(spec, CheckpointReader(path).client_state_dict(dtype)).to(dtype)
        node = SwarmNode(
            config.initial_peers,
            host_maddrs=config.host_maddrs,
            client_mode=True,
            start_timeout=config.connect_timeout,
            name="client",
        )
        return cls(
            spec,
            local,
            node,
            config,
            config.dht_prefix or default_dht_prefix(name_or_path),
            tuning_mode=tuning_mode,
            pre_seq_len=pre_seq_len,
            name_or_path=str(name_or_path),
        )

    # ---- trainable parameters ----

    def add_lora(self, lora_config: Any) -> ClientLora:
        """Attach a client-held LoRA (a peft.LoraConfig) to the remote blocks; the embeddings and head freeze."""
        if self.lora is not None:
            raise ValueError("this model already has a LoRA adapter")
        if self.config.active_adapter is not None:
            raise ValueError("a client-held LoRA cannot be combined with a server-hosted active_adapter")
        self.lora = ClientLora(self.spec, lora_config, base_model_name_or_path=self.name_or_path)
        self.local.requires_grad_(False)
        return self.lora

    def load_lora(self, path: str | Path) -> ClientLora:
        """Attach a PEFT LoRA folder (e.g. saved by save_pretrained) as a trainable client-held LoRA."""
        if self.lora is not None:
            raise ValueError("this model already has a LoRA adapter")
        if self.config.active_adapter is not None:
            raise ValueError("a client-held LoRA cannot be combined with a server-hosted active_adapter")
        self.lora = ClientLora.from_pretrained(path, self.spec)
        self.local.requires_grad_(False)
        return self.lora

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_pretrained(self, path: str | Path) -> Path:
        """The trained client parameters: a LoRA in PEFT's format, prompts as prompts.safetensors."""
        from safetensors.torch import save_file

        if self.lora is None and self.prompt_tuning is None:
            raise ValueError("nothing to save: no LoRA and no prompt tuning on this model")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:
            self.lora.save_pretrained(path)
        if self.prompt_tuning is not None:
            tensors = {"prompts": self.prompt_tuning.prompts.detach().contiguous()}
            if self.prompt_tuning.deep_prompts is not None:
                tensors["deep_prompts"] = self.prompt_tuning.deep_prompts.detach().contiguous()
            save_file(tensors, str(path / PROMPTS_FILE), metadata={"tuning_mode": self.prompt_tuning.mode})
        return path

    def load_prompts(self, path: str | Path) -> None:
        """Load prompts saved by save_pretrained into this model's prompt tuning (same mode and length)."""
        from safetensors.torch import load_file

        if self.prompt_tuning is None:
            raise ValueError("this model has no prompt tuning; pass tuning_mode= to from_pretrained")
        tensors = load_file(str(Path(path) / PROMPTS_FILE))
        with torch.no_grad():
            for name, tensor in tensors.items():
                target = getattr(self.prompt_tuning, name, None)
                if target is None or target.shape != tensor.shape:
                    raise ValueError(f"{name} {tuple(tensor.shape)} does not fit this model's prompt tuning")
                target.copy_(tensor)

    # ---- training / scoring ----

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
    ) -> CausalLMOutput:
        """Logits for every input position (and the causal LM loss with labels, -100 ignored), differentiable.

        With prompt tuning the prompts are prepended here; the logits still cover the inputs only.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.local.embed(input_ids) if inputs_embeds is None else inputs_embeds
        reference = input_ids if input_ids is not None else hidden[..., 0]
        pad_lens = left_pad_lens(attention_mask, reference)
        prompts, prefix = None, 0
        if self.prompt_tuning is not None:
            if pad_lens is not None:
                raise ValueError("left padding is not supported with prompt tuning; pad on the right (mask labels)")
            hidden = self.prompt_tuning.prepend(hidden)
            prompts, prefix = self.prompt_tuning.deep_prompts, self.prompt_tuning.pre_seq_len
        hidden = self.remote(hidden, pad_lens, prompts=prompts, lora=self.lora, adapter=self.config.active_adapter)
        # with prompts, the last prompt position predicts the first token (as PEFT's prompt tuning trains it)
        logits = self.local.logits(hidden[:, max(prefix - 1, 0) :])
        loss = None
        if labels is not None:
            targets = labels if prefix else labels[:, 1:]
            shifted = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shifted, targets.reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits[:, 1:] if prefix else logits)

    # ---- inference ----

    def inference_session(self, max_length: int, *, reuse_prefix: bool = True) -> InferenceSession:
        """A session whose KV cache lives on the servers; use it as a context manager.

        With reuse_prefix, servers may serve the prompt's leading pages from their prefix cache
        (pages this client computed before under the same model and salt) instead of recomputing them.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        prompts = self.prompt_tuning.deep_prompts if self.prompt_tuning is not None else None
        tuning = RequestTuning.snapshot(prompts, self.lora, self.config.active_adapter)
        # a client-held LoRA's pages are never reused: its weights change with every optimizer step
        if reuse_prefix and self.lora is None:
            salt = f"{self.dht_prefix}|{self.spec.torch_dtype}|{self.config.active_adapter or ''}"
        else:
            salt = None
        prefix = self.prompt_tuning.pre_seq_len if self.prompt_tuning is not None else 0
        return InferenceSession(
            self.node,
            self.routes,
            self.config,
            max_length=max_length + prefix,
            num_blocks=self.spec.num_blocks,
            prefix_salt=salt,
            tuning=tuning,
            spot_checker=self.remote.spot_checker,
        )

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        max_new_tokens: Optional[int] = None,
        max_length: Optional[int] = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eos_token_id: Optional[int | Sequence[int]] = None,
        pad_token_id: Optional[int] = None,
        session: Optional[InferenceSession] = None,
        generator: Optional[torch.Generator] = None,
        streamer: Optional[Any] = None,
    ) -> torch.Tensor:
        """Like transformers' generate(): returns input_ids followed by the new tokens ([batch, len]).

        With a session, input_ids may be None to continue from the last generated token, and the
        result then holds only the new tokens. Finished sequences (EOS) are filled with pad_token_id.
        The streamer's put() and end() are called on the client's network thread: keep them quick
        (hand tokens to a queue, as transformers' TextIteratorStreamer does).
        """
        sampling = SamplingParams(do_sample, temperature, top_k, top_p, generator)
        if input_ids is not None and input_ids.ndim == 1:
            input_ids = input_ids[None]
        prompt_len = 0 if input_ids is None else input_ids.shape[1]
        done_len = session.position if session is not None else 0
        if max_new_tokens is None:
            max_new_tokens = (max_length or DEFAULT_MAX_LENGTH) - prompt_len - done_len
        if max_new_tokens < 0:
            raise ValueError(f"max_length={max_length} is shorter than the {prompt_len + done_len} tokens already given")
        eos = self.spec.eos_token_id if eos_token_id is None else eos_token_id
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = pad_token_id if pad_token_id is not None else self.spec.pad_token_id
        pad = pad if pad is not None else (eos_ids[0] if eos_ids else 0)

        own_session = session is None
        if own_session:
            if input_ids is None:
                raise ValueError("input_ids are required without a session")
            session = self.inference_session(max_length=prompt_len + max(max_new_tokens, 1))
        pad_lens = left_pad_lens(attention_mask, input_ids) if input_ids is not None and session.position == 0 else None
        if pad_lens is not None and self.prompt_tuning is not None:
            raise ValueError("left-padded batches are not supported with prompt tuning; generate them one by one")
        run = Generation(
            session,
            input_ids,
            pad_lens=pad_lens,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            eos_token_ids=eos_ids,
            pad_token_id=pad,
            streamer=streamer,
        )
        try:
            new_tokens = self.node.run(self._drive(run, session))
        finally:
            if own_session:
                session.close()
        return new_tokens if input_ids is None else torch.cat([input_ids, new_tokens], dim=1)

    async def _drive(self, run: Generation, session: InferenceSession) -> torch.Tensor:
        """One generate() call on the node's loop: every concurrent call shares that thread and the LM
        head passes (client/head_batcher.py). Torch work between awaits runs in inference mode; the
        mode is per thread, so it is never held across an await, where other coroutines run."""
        key = object()  # this call's identity in the head batcher
        opening = session.position == 0
        self.head_batcher.session_started(key, opening=opening)
        when_open = (lambda: self.head_batcher.first_step(key)) if opening else None
        try:
            while run.running:
                with torch.inference_mode():
                    inputs, pad_lens = run.next_inputs()
                    embeds = self._embed_step(inputs, session)
                hidden = await session.astep(embeds, pad_lens=pad_lens, token_ids=inputs, when_open=when_open)
                when_open = None
                logits = await self.head_batcher(hidden[:, -1, :], key)
                with torch.inference_mode():
                    run.accept(logits)
            with torch.inference_mode():
                return run.result()
        finally:
            self.head_batcher.session_ended(key)

    def _embed_step(self, input_ids: torch.Tensor, session: InferenceSession) -> torch.Tensor:
        """A step's input embeddings; a session's first step starts with the soft prompts (ptune)."""
        embeds = self.local.embed(input_ids)
        if self.prompt_tuning is not None and session.position == 0:
            embeds = self.prompt_tuning.prepend(embeds)
        return embeds

    def shutdown(self) -> None:
        """Leave the swarm: stop this client's p2p daemon."""
        self.head_batcher.close()
        self.node.shutdown()

    def __del__(self) -> None:
        node = self.__dict__.get("node")
        if node is not None:
            try:
                node.shutdown()
            except Exception:
                pass


class AutoDistributedModelForCausalLM:
    """Entry point named as in transformers; picks the model class from the checkpoint's config."""

    @staticmethod
    def from_pretrained(name_or_path: str | Path, initial_peers: Sequence[str] = (), **kwargs) -> DistributedModelForCausalLM:
        return DistributedModelForCausalLM.from_pretrained(name_or_path, initial_peers, **kwargs)

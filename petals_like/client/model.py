"""DistributedModel and DistributedModelForCausalLM: embeddings, final norm and LM head here; every
block in the swarm. Petals' names work too (docs/coming-from-petals.md): model.transformer.h[3:6],
model.transformer.word_embeddings, model.lm_head, model.config.hidden_size, use_session(), ...

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

import contextlib
import logging
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoConfig, GenerationConfig, PretrainedConfig
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutput

from petals_like.client.beam_search import BeamSearch
from petals_like.client.distributed_config import client_config_of, with_client_config
from petals_like.client.generation import (
    Generation,
    TokenChooser,
    eos_ids,
    left_pad_lens,
    logits_processors,
    resolve_generation_config,
)
from petals_like.client.generation import stopping_criteria as build_stopping_criteria
from petals_like.client.head_batcher import HeadBatcher
from petals_like.client.inference_session import InferenceSession
from petals_like.client.sequential import RemoteSequential
from petals_like.client.speculative import Drafter, Speculation, SpeculativeGeneration
from petals_like.client.tuning import ClientLora, PromptTuning, RequestTuning
from petals_like.config import ClientConfig
from petals_like.dht.node import SwarmNode
from petals_like.dht.records import default_dht_prefix
from petals_like.models.checkpoint import CheckpointReader, resolve_checkpoint
from petals_like.models.hub import open_checkpoint
from petals_like.models.llama.head import LocalModules
from petals_like.models.spec import ModelSpec, resolve_dtype
from petals_like.routing.manager import RouteManager

logger = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.safetensors"


class DistributedModel(torch.nn.Module):
    """The hidden states of the whole model (Petals' AutoDistributedModel): embeddings and final norm
    here, every block in the swarm. The causal LM and the classifier add their heads to this."""

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
        hf_config: Optional[PretrainedConfig] = None,
        owns_node: bool = True,
        checkpoint_path: Optional[Path] = None,
    ):
        super().__init__()
        self.spec = spec
        self.name_or_path = name_or_path
        # the folder the checkpoint was loaded from (for a hub name: the snapshot of the revision asked for)
        self.checkpoint_path = checkpoint_path
        self.client_config = config
        # the checkpoint's transformers config, with the client's settings as live properties
        self.config = with_client_config(hf_config if hf_config is not None else _hf_config(name_or_path, spec), config)
        self.dht_prefix = dht_prefix
        self.node = node
        self._owns_node = owns_node
        self.local = local
        self.routes = RouteManager(node, dht_prefix, spec.num_blocks, config)
        self.remote = RemoteSequential(node, self.routes, config, spec.num_blocks)
        self.prompt_tuning: Optional[PromptTuning] = None
        self.lora: Optional[ClientLora] = None
        self._active = threading.local()  # .session: this thread's active session (use_session)
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
        config: Optional[PretrainedConfig] = None,
        dht: Optional[SwarmNode] = None,
        revision: Optional[str] = None,
        token: Optional[str | bool] = None,
        cache_dir: Optional[str | Path] = None,
        **config_kwargs,
    ):
        """Load only the embeddings, final norm and LM head; join the swarm through initial_peers.

        name_or_path: a local folder, or a Hugging Face hub name of which only config, tokenizer,
        generation config and the shards of those tensors are fetched (models/hub.py), at `revision`
        (default: main), with `token` (default: HF_TOKEN or `hf auth login`'s), into `cache_dir`.

        tuning_mode="ptune" adds pre_seq_len trainable prompt vectors before every input; "deep_ptune"
        also one per block. Other keywords are ClientConfig fields (e.g. num_chains, active_adapter,
        allowed_servers, show_route, max_retries=None for "keep trying"). config: one made by
        AutoDistributedConfig.from_pretrained (its settings apply; keywords override them). dht: the
        node of another model of this process (`other.node`) to share its connections; this model
        then leaves it running at shutdown.
        """
        known = {f.name for f in fields(ClientConfig)}
        unknown = set(config_kwargs) - known
        if unknown:
            raise TypeError(f"unknown arguments {sorted(unknown)}; ClientConfig accepts {sorted(known)}")
        base = client_config_of(config) if config is not None else None
        if base is not None:
            values = {f.name: getattr(base, f.name) for f in fields(ClientConfig)}
            values.update(config_kwargs)
            if initial_peers:
                values["initial_peers"] = initial_peers
        else:
            values = dict(config_kwargs, initial_peers=initial_peers)
        values["initial_peers"] = tuple(values["initial_peers"])
        client_config = ClientConfig(**values)
        if dht is not None and not isinstance(dht, SwarmNode):
            raise TypeError(f"dht must be the node of another model of this process (model.node), got {type(dht).__name__}")
        if not client_config.initial_peers and dht is None:
            raise ValueError("initial_peers are required: the multiaddrs of any peer of the swarm")
        checkpoint = open_checkpoint(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
        checkpoint.fetch_client_files()
        path = checkpoint.folder
        spec = ModelSpec.from_pretrained(path)
        dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else resolve_dtype(str(torch_dtype), spec)
        local = LocalModules.from_state_dict(spec, CheckpointReader(path).client_state_dict(dtype)).to(dtype)
        node = dht
        if node is None:
            node = SwarmNode(
                client_config.initial_peers,
                host_maddrs=client_config.host_maddrs,
                client_mode=True,
                start_timeout=client_config.connect_timeout,
                name="client",
            )
        hf_config = AutoConfig.from_pretrained(path) if config is None else config
        return cls(
            spec,
            local,
            node,
            client_config,
            client_config.dht_prefix or default_dht_prefix(name_or_path),
            tuning_mode=tuning_mode,
            pre_seq_len=pre_seq_len,
            name_or_path=str(name_or_path),
            hf_config=hf_config,
            owns_node=dht is None,
            checkpoint_path=path,
        )

    # ---- Petals' and transformers' names for the parts ----

    @property
    def transformer(self) -> DistributedModel:
        """Petals' `model.transformer` (and Llama's `model.model`): the embeddings, blocks and final norm."""
        return self

    model = transformer

    @property
    def word_embeddings(self) -> torch.nn.Embedding:
        return self.local.embed_tokens

    embed_tokens = word_embeddings

    @property
    def h(self) -> RemoteSequential:
        """Every remote block; index or slice it for a sub-range: `model.transformer.h[3:6]`."""
        return self.remote

    layers = h

    @property
    def ln_f(self) -> torch.nn.Module:
        return self.local.norm

    norm = ln_f

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.local.embed_tokens

    @property
    def device(self) -> torch.device:
        return self.local.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.local.embed_tokens.weight.dtype

    # ---- trainable parameters ----

    def add_lora(self, lora_config: Any) -> ClientLora:
        """Attach a client-held LoRA (a peft.LoraConfig) to the remote blocks; the embeddings and head freeze."""
        if self.lora is not None:
            raise ValueError("this model already has a LoRA adapter")
        if self.client_config.active_adapter is not None:
            raise ValueError("a client-held LoRA cannot be combined with a server-hosted active_adapter")
        self.lora = ClientLora(self.spec, lora_config, base_model_name_or_path=self.name_or_path)
        self.local.requires_grad_(False)
        return self.lora

    def load_lora(self, path: str | Path) -> ClientLora:
        """Attach a PEFT LoRA folder (e.g. saved by save_pretrained) as a trainable client-held LoRA."""
        if self.lora is not None:
            raise ValueError("this model already has a LoRA adapter")
        if self.client_config.active_adapter is not None:
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

    def _through_blocks(
        self,
        input_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        inputs_embeds: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, int]:
        """(hidden states after the last block [batch, prefix + seq, hidden], prefix): the embeddings (and
        the soft prompts, `prefix` positions of them) through every remote block, differentiable."""
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
        adapter = self.client_config.active_adapter
        return self.remote(hidden, pad_lens, prompts=prompts, lora=self.lora, adapter=adapter), prefix

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
    ) -> BaseModelOutputWithPast:
        """The final hidden states [batch, seq, hidden] (after the final norm, as transformers' base model
        returns them), differentiable; with prompt tuning, of the inputs' positions only."""
        hidden, prefix = self._through_blocks(input_ids, attention_mask, inputs_embeds)
        return BaseModelOutputWithPast(last_hidden_state=self.local.norm(hidden[:, prefix:].to(self.dtype)))

    # ---- inference ----

    def inference_session(self, max_length: int, *, reuse_prefix: bool = True) -> InferenceSession:
        """A session whose KV cache lives on the servers; use it as a context manager.

        With reuse_prefix, servers may serve the prompt's leading pages from their prefix cache
        (pages this client computed before under the same model and salt) instead of recomputing them.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        prompts = self.prompt_tuning.deep_prompts if self.prompt_tuning is not None else None
        adapter = self.client_config.active_adapter
        tuning = RequestTuning.snapshot(prompts, self.lora, adapter)
        # a client-held LoRA's pages are never reused: its weights change with every optimizer step
        if reuse_prefix and self.lora is None:
            salt = f"{self.dht_prefix}|{self.spec.torch_dtype}|{adapter or ''}"
        else:
            salt = None
        prefix = self.prompt_tuning.pre_seq_len if self.prompt_tuning is not None else 0
        session = InferenceSession(
            self.node,
            self.routes,
            self.client_config,
            max_length=max_length + prefix,
            num_blocks=self.spec.num_blocks,
            prefix_salt=salt,
            tuning=tuning,
            spot_checker=self.remote.spot_checker,
            muxes=self.remote.muxes,
        )
        # as in Petals: inside `with model.inference_session(...)`, generate() runs in that session
        session.context = lambda: self.use_session(session)
        return session

    @property
    def active_session(self) -> Optional[InferenceSession]:
        """The session generate() uses when given none (Petals' active_session): the innermost
        `with model.inference_session(...)` or use_session() block of this thread."""
        return getattr(self._active, "session", None)

    @contextlib.contextmanager
    def use_session(self, session: Optional[InferenceSession]) -> Iterator[Optional[InferenceSession]]:
        """Within this block (in this thread), generate() without session= runs in `session` (None: in a
        new session each call)."""
        previous, self._active.session = self.active_session, session
        try:
            yield session
        finally:
            self._active.session = previous

    def shutdown(self) -> None:
        """Leave the swarm: stop this client's p2p daemon (unless it was shared through dht=)."""
        if self._owns_node:
            self.node.shutdown()

    def __del__(self) -> None:
        node = self.__dict__.get("node")
        if node is not None and self.__dict__.get("_owns_node", True):
            try:
                node.shutdown()
            except Exception:
                pass


class DistributedModelForCausalLM(DistributedModel):
    """The causal LM: DistributedModel plus the LM head (here) and generate()."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.head_batcher = HeadBatcher(self.local.logits)  # concurrent generate() calls share head passes
        self.generation_config = _generation_config(self.checkpoint_path or self.name_or_path, self.config)

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.local.lm_head

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.local.lm_head

    def can_generate(self) -> bool:
        return True

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
        hidden, prefix = self._through_blocks(input_ids, attention_mask, inputs_embeds)
        # with prompts, the last prompt position predicts the first token (as PEFT's prompt tuning trains it)
        logits = self.local.logits(hidden[:, max(prefix - 1, 0) :])
        loss = None
        if labels is not None:
            targets = labels if prefix else labels[:, 1:]
            shifted = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shifted, targets.reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits[:, 1:] if prefix else logits)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        generation_config: Optional[GenerationConfig] = None,
        logits_processor: Optional[Any] = None,
        stopping_criteria: Optional[Any] = None,
        session: Optional[InferenceSession] = None,
        generator: Optional[torch.Generator] = None,
        streamer: Optional[Any] = None,
        tokenizer: Optional[Any] = None,
        speculative: Optional[str | Drafter | Speculation] = None,
        **kwargs: Any,
    ) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
        """Like transformers' generate(): returns input_ids followed by the new tokens ([batch, len]).

        Options as transformers takes them (keywords, generation_config=, logits_processor=,
        stopping_criteria=), with defaults from the checkpoint's generation_config.json and then
        transformers' own (top_k=50 when sampling, ...); beam search (num_beams) as transformers'. Sampling draws
        from torch's global generator (as transformers does) unless `generator` is given.

        With a session (or inside `with model.use_session(session)`), input_ids may be None to
        continue from the last generated token, and the result then holds only the new tokens.
        Finished sequences (EOS) are filled with pad_token_id. The streamer's put() and end() are
        called on the client's network thread: keep them quick (hand tokens to a queue, as
        transformers' TextIteratorStreamer does).

        speculative="ngram" (or a drafter(sequence, k) -> token ids, or a Speculation, whose counters
        say how it went): generation of one sequence that checks several drafted tokens per trip
        through the chain (client/speculative.py); greedy tokens are the same as without it, sampled
        ones distributed the same.
        """
        if input_ids is None and "inputs" in kwargs:  # transformers' name for it
            input_ids = kwargs.pop("inputs")
        config = resolve_generation_config(self.generation_config, generation_config, **kwargs)
        if input_ids is not None and input_ids.ndim == 1:
            input_ids = input_ids[None]
        session = session if session is not None else self.active_session
        copies, beams = config.num_return_sequences or 1, config.num_beams or 1
        if beams > 1 and (session is not None or input_ids is None):
            raise ValueError("beam search runs in a session of its own: pass input_ids and no session")
        if copies > 1 and beams == 1:
            if session is not None or input_ids is None:
                raise ValueError("num_return_sequences > 1 needs input_ids and a session of its own (none given)")
            input_ids = input_ids.repeat_interleave(copies, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(copies, dim=0)
        prompt_len = 0 if input_ids is None else input_ids.shape[1]
        done_len = session.position if session is not None else 0
        if config.max_new_tokens is not None:
            max_new_tokens = config.max_new_tokens
        else:
            max_new_tokens = config.max_length - prompt_len - done_len
        if max_new_tokens < 0:
            raise ValueError(f"max_length={config.max_length} is shorter than the {prompt_len + done_len} tokens already given")
        eos = eos_ids(config)
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)

        own_session = session is None
        if own_session:
            if input_ids is None:
                raise ValueError("input_ids are required without a session")
            session = self.inference_session(max_length=prompt_len + max(max_new_tokens, 1))
        pad_lens = left_pad_lens(attention_mask, input_ids) if input_ids is not None and session.position == 0 else None
        if pad_lens is not None and self.prompt_tuning is not None:
            raise ValueError("left-padded batches are not supported with prompt tuning; generate them one by one")

        if beams > 1:
            try:
                return self._beam_search(
                    input_ids,
                    pad_lens,
                    session,
                    config,
                    max_new_tokens,
                    logits_processor,
                    stopping_criteria,
                    generator,
                    tokenizer,
                )
            finally:
                session.close()

        def chooser(prompt_len: int) -> TokenChooser:
            config.max_length = prompt_len + max_new_tokens  # as transformers counts it (forced_eos_token_id)
            processors = logits_processors(config, prompt_len, logits_processor, pad_lens=pad_lens)
            return TokenChooser(processors, bool(config.do_sample), generator)

        options = dict(
            pad_lens=pad_lens,
            max_new_tokens=max_new_tokens,
            chooser=chooser,
            eos_token_ids=eos,
            pad_token_id=pad,
            criteria=build_stopping_criteria(config, stopping_criteria, tokenizer),
            streamer=streamer,
            keep_scores=bool(config.return_dict_in_generate and config.output_scores),
            keep_logits=bool(config.return_dict_in_generate and config.output_logits),
        )
        if speculative is None:
            run = Generation(session, input_ids, **options)
        else:
            try:
                run = SpeculativeGeneration(session, input_ids, speculation=Speculation.of(speculative), **options)
            except ValueError:
                if own_session:
                    session.close()
                raise
        try:
            new_tokens = self.node.run(self._drive(run, session))
        finally:
            if own_session:
                session.close()
        sequences = new_tokens if input_ids is None else torch.cat([input_ids, new_tokens], dim=1)
        if not config.return_dict_in_generate:
            return sequences
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=tuple(run.scores) if run.scores is not None else None,
            logits=tuple(run.logits) if run.logits is not None else None,
        )

    def _beam_search(
        self,
        input_ids: torch.Tensor,
        pad_lens: Optional[list[int]],
        session: InferenceSession,
        config: GenerationConfig,
        max_new_tokens: int,
        logits_processor: Optional[Any],
        stopping_criteria: Optional[Any],
        generator: Optional[torch.Generator],
        tokenizer: Optional[Any],
    ) -> torch.Tensor | GenerateBeamDecoderOnlyOutput:
        """generate(num_beams=K): K rows per input in one session, reordered on the servers each step."""
        config.max_length = input_ids.shape[1] + max_new_tokens
        search = BeamSearch(
            input_ids,
            num_beams=config.num_beams,
            max_new_tokens=max_new_tokens,
            eos_token_ids=eos_ids(config),
            pad_token_id=config.pad_token_id,
            processors=logits_processors(config, input_ids.shape[1], logits_processor, pad_lens=pad_lens),
            criteria=build_stopping_criteria(config, stopping_criteria, tokenizer),
            length_penalty=config.length_penalty,
            early_stopping=config.early_stopping,
            do_sample=bool(config.do_sample),
            generator=generator,
            num_return_sequences=config.num_return_sequences or 1,
            pad_lens=pad_lens,
            keep_scores=bool(config.return_dict_in_generate and config.output_scores),
            keep_logits=bool(config.return_dict_in_generate and config.output_logits),
        )
        sequences, scores = self.node.run(self._drive(search, session))
        if not config.return_dict_in_generate:
            return sequences
        return GenerateBeamDecoderOnlyOutput(
            sequences=sequences,
            sequences_scores=scores if config.output_scores else None,
            scores=tuple(search.scores) if search.scores is not None else None,
            logits=tuple(search.logits) if search.logits is not None else None,
        )

    async def _drive(self, run: Generation | BeamSearch, session: InferenceSession) -> Any:
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
                    inputs, pad_lens, hypo_ids = run.next_inputs()
                    embeds = self._embed_step(inputs, session)
                hidden = await session.astep(embeds, pad_lens=pad_lens, token_ids=inputs, hypo_ids=hypo_ids, when_open=when_open)
                when_open = None
                positions = getattr(run, "positions", 1)  # a speculative step: the pending token's and each draft's
                last = hidden[:, -1, :] if positions == 1 else hidden[0, -positions:, :]
                logits = await self.head_batcher(last, key)
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
        self.head_batcher.close()
        super().shutdown()


def _hf_config(name_or_path: str, spec: ModelSpec) -> PretrainedConfig:
    """The checkpoint's transformers config (models built by hand in tests may have no folder)."""
    try:
        return AutoConfig.from_pretrained(resolve_checkpoint(name_or_path))
    except (OSError, ValueError):
        return PretrainedConfig(hidden_size=spec.hidden_size, num_hidden_layers=spec.num_blocks, vocab_size=spec.vocab_size)


def _generation_config(name_or_path: str | Path, config: PretrainedConfig) -> GenerationConfig:
    """The checkpoint's generation_config.json, else the generation fields of its config (as transformers)."""
    try:
        return GenerationConfig.from_pretrained(resolve_checkpoint(name_or_path))
    except (OSError, ValueError):
        return GenerationConfig.from_model_config(config)


class AutoDistributedModel:
    """Entry point named as in Petals: the hidden states of the model (DistributedModel)."""

    @staticmethod
    def from_pretrained(name_or_path: str | Path, initial_peers: Sequence[str] = (), **kwargs) -> DistributedModel:
        return DistributedModel.from_pretrained(name_or_path, initial_peers, **kwargs)


class AutoDistributedModelForCausalLM:
    """Entry point named as in transformers; picks the model class from the checkpoint's config."""

    @staticmethod
    def from_pretrained(name_or_path: str | Path, initial_peers: Sequence[str] = (), **kwargs) -> DistributedModelForCausalLM:
        return DistributedModelForCausalLM.from_pretrained(name_or_path, initial_peers, **kwargs)

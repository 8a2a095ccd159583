"""Find a checkpoint on disk and read only the tensors a server's span (or a client) needs.

A server hosting blocks 10:20 of a 70-block model must not hold the other 60 blocks in memory,
even briefly, so tensors are read one at a time with `safetensors.safe_open` (memory-mapped,
only the shard files that hold them are opened) and converted to the target dtype as they are
read. `.bin` (pickle) checkpoints cannot be read lazily and are refused with a clear error.

Tensor names follow Hugging Face's Llama/Mistral/Qwen2 layout:
`model.embed_tokens.weight`, `model.layers.{i}.<...>`, `model.norm.weight`, `lm_head.weight` (Falcon's:
`transformer.word_embeddings.weight`, `transformer.h.{i}.<...>`, `transformer.ln_f.weight|bias`);
checkpoints saved from the bare model (no `model.` prefix) are read too. Fetching a checkpoint's
files from the Hugging Face hub, only those a span or a client needs: models/hub.py.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"  # saved at the top level, outside the "model." prefix
_LAYER_RE = re.compile(r"^(?:model\.|transformer\.)?(?:layers|h)\.(\d+)\.")  # Llama's layout, or Falcon's


def block_of(tensor_name: str) -> Optional[int]:
    """The block a tensor belongs to (`model.layers.{i}.`, `layers.{i}.` or `transformer.h.{i}.`); None for
    tensors outside the blocks."""
    match = _LAYER_RE.match(tensor_name)
    return int(match.group(1)) if match else None


def resolve_checkpoint(name_or_path: str | Path, *, cache_dir: Optional[str | Path] = None) -> Path:
    """A local folder with config.json, else a snapshot already in the Hugging Face cache; never downloads.

    For code that runs after an entry point has fetched what it needs (run_server and from_pretrained
    fetch through models/hub.py), and for tools that must not touch the network. `cache_dir`
    overrides the hub cache location (tests point it at a fake cache).
    """
    local = local_checkpoint(name_or_path)
    if local is not None:
        return local
    name = str(name_or_path)
    snapshot = cached_snapshot(name, cache_dir=cache_dir)
    if snapshot is not None:
        return snapshot
    from huggingface_hub.constants import HF_HUB_CACHE

    where = f"the Hugging Face cache {cache_dir if cache_dir is not None else HF_HUB_CACHE}"
    raise FileNotFoundError(
        f"checkpoint {name!r} not found: no local folder {Path(name).expanduser().absolute()} with config.json, and no "
        f"snapshot of repository {name!r} with config.json in {where}. run_server and from_pretrained download it; "
        f"else fetch it first (e.g. `hf download {name}`) or pass a local folder"
    )


def local_checkpoint(name_or_path: str | Path) -> Optional[Path]:
    """name_or_path as a local checkpoint folder; None where no such file or folder exists (it may name a hub repository)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise FileNotFoundError(f"{path} is a folder but has no config.json: expected a Hugging Face checkpoint folder")
    if path.exists():
        raise FileNotFoundError(f"{path} is a file: expected a checkpoint folder containing config.json")
    return None


def cached_snapshot(repo_id: str, *, cache_dir: Optional[str | Path] = None, revision: Optional[str] = None) -> Optional[Path]:
    """The hub cache's snapshot folder of repo_id at revision (default: main) when it holds config.json, else None
    (also for names that are not repository ids). Makes no request."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    except HFValidationError as e:
        logger.debug(f"{repo_id!r} is not a hub repository id: {e}")
        return None
    # a str is the cached file's path; None or huggingface_hub's "known to be absent" marker: no usable snapshot
    return Path(config).parent if isinstance(config, str) else None


class CheckpointReader:
    """Lazy reader of a safetensors checkpoint folder (one `model.safetensors` or an indexed set of shards).

    Invariant: a tensor is read from disk only by a method that returns it; `tensors_read` lists
    every name read, in order, so tests can prove a span loaded nothing outside it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {self.path} does not exist")
        self.weight_map = self._read_weight_map()  # tensor name -> shard file name (relative to path)
        # Falcon's layout: transformer.h.{i}., transformer.word_embeddings, transformer.ln_f
        self.falcon_layout = any(name.startswith("transformer.h.") for name in self.weight_map)
        # checkpoints of the bare model (LlamaModel.save_pretrained) have no "model." prefix
        has_prefix = any(name.startswith("model.") for name in self.weight_map)
        self.prefix = "transformer." if self.falcon_layout else ("model." if has_prefix else "")
        self.tie_word_embeddings = self._read_tie_word_embeddings()
        self.tensors_read: list[str] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self.weight_map)} tensors)"

    # ---- what the checkpoint holds ----

    def _read_weight_map(self) -> dict[str, str]:
        index_path = self.path / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index_path} is not a valid safetensors index (no weight_map): {e}") from e
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise ValueError(f"{index_path}: weight_map must map tensor names to shard file names")
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if single.is_file():
            with safe_open(single, framework="pt", device="cpu") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        pickles = sorted(p.name for p in self.path.glob("*.bin"))
        if pickles:
            raise ValueError(
                f"{self.path} holds only PyTorch .bin weights ({', '.join(pickles)}); "
                f"they cannot be loaded lazily. Convert the checkpoint to safetensors, e.g. "
                f"AutoModelForCausalLM.from_pretrained(path).save_pretrained(new_path)"
            )
        raise FileNotFoundError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}: not a safetensors checkpoint")

    def _read_tie_word_embeddings(self) -> bool:
        config_path = self.path / "config.json"
        if not config_path.is_file():
            return False  # untied unless told otherwise; a missing lm_head still falls back to the embeddings
        try:
            return bool(json.loads(config_path.read_text()).get("tie_word_embeddings", False))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from e

    @property
    def num_blocks(self) -> int:
        """1 + the highest block index with tensors in the checkpoint."""
        indices = [index for name in self.weight_map if (index := block_of(name)) is not None]
        return max(indices) + 1 if indices else 0

    def block_prefix(self, index: int) -> str:
        """What the names of block `index`'s tensors start with, e.g. `model.layers.3.` or `transformer.h.3.`."""
        return f"{self.prefix}{'h' if self.falcon_layout else 'layers'}.{index}."

    def block_tensor_names(self, index: int) -> list[str]:
        prefix = self.block_prefix(index)
        return sorted(name for name in self.weight_map if name.startswith(prefix))

    # ---- reading ----

    def read(self, names: Iterable[str], dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
        """Read the named tensors, opening each needed shard once; floating tensors are cast to dtype."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise KeyError(f"tensor {name!r} is not in checkpoint {self.path}")
            by_file[self.weight_map[name]].append(name)
        tensors: dict[str, Tensor] = {}
        for file_name, file_names in by_file.items():
            file_path = self.path / file_name
            if not file_path.is_file():
                raise FileNotFoundError(f"shard {file_path} (listed in {INDEX_FILE}) is missing")
            with safe_open(file_path, framework="pt", device="cpu") as f:
                for name in file_names:
                    tensor = f.get_tensor(name)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)  # convert now: never hold a whole span in the saved dtype
                    tensors[name] = tensor
                    self.tensors_read.append(name)
        return tensors

    def block_state_dict(self, index: int, dtype: torch.dtype, skip: Optional[Callable[[str], bool]] = None) -> dict[str, Tensor]:
        """Tensors of block `index` with `model.layers.{index}.` stripped (e.g. `self_attn.q_proj.weight`);
        those whose full names `skip` is true for are not read."""
        names = self.block_tensor_names(index)
        if not names:
            raise ValueError(f"checkpoint {self.path} has no tensors for block {index} (it has {self.num_blocks} blocks)")
        prefix_len = len(self.block_prefix(index))
        wanted = names if skip is None else [name for name in names if not skip(name)]
        return {name[prefix_len:]: tensor for name, tensor in self.read(wanted, dtype).items()}

    def load_blocks(
        self, start: int, end: int, dtype: torch.dtype, progress: bool = True, skip: Optional[Callable[[str], bool]] = None
    ) -> list[dict[str, Tensor]]:
        """State dicts of blocks [start, end), read one block at a time (without the tensors `skip` names)."""
        num_blocks = self.num_blocks
        if not 0 <= start < end <= num_blocks:
            raise ValueError(f"block range {start}:{end} is not within 0:{num_blocks} of checkpoint {self.path}")
        blocks = []
        for index in tqdm(range(start, end), desc=f"loading blocks {start}:{end}", unit="block", disable=not progress):
            blocks.append(self.block_state_dict(index, dtype, skip))
        return blocks

    def client_state_dict(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """`embed_tokens.weight`, `norm.weight`, `lm_head.weight`: what a client keeps locally.

        With tied embeddings (or no lm_head tensor saved), lm_head.weight is the embedding tensor
        itself, the same object, so the client holds one copy and training updates both.
        """
        embed_name, norm_name, head_name = f"{self.prefix}embed_tokens.weight", f"{self.prefix}norm.weight", LM_HEAD
        if self.falcon_layout:
            embed_name, norm_name = f"{self.prefix}word_embeddings.weight", f"{self.prefix}ln_f.weight"
        for name in (embed_name, norm_name):
            if name not in self.weight_map:
                raise ValueError(f"checkpoint {self.path} has no {name!r}: not a causal LM of a supported family")
        norm_bias = norm_name.removesuffix("weight") + "bias"  # LayerNorm's (Falcon, BLOOM)
        embed_norm = f"{self.prefix}word_embeddings_layernorm."  # BLOOM's, after the embeddings
        optional = [norm_bias, embed_norm + "weight", embed_norm + "bias"]
        names = [embed_name, norm_name] + [name for name in optional if name in self.weight_map]
        tied = self.tie_word_embeddings or head_name not in self.weight_map
        tensors = self.read(names if tied else names + [head_name], dtype)
        embed = tensors[embed_name]
        state = {
            "embed_tokens.weight": embed,
            "norm.weight": tensors[norm_name],
            "lm_head.weight": embed if tied else tensors[head_name],
        }
        if norm_bias in tensors:
            state["norm.bias"] = tensors[norm_bias]
        for kind in ("weight", "bias"):
            if embed_norm + kind in tensors:
                state[f"embed_norm.{kind}"] = tensors[embed_norm + kind]
        return state

"""Fetch from the Hugging Face hub only the files of a checkpoint that a server's span or a client needs.

A server of blocks 10:20 of a 70-block model needs about a seventh of the model's shards, and a
client needs only the embeddings, the final norm and the LM head. `snapshot_download` would fetch
every shard (hundreds of GB for a large model), so each needed file is fetched on its own with
`hf_hub_download`: the hub cache's layout (shared with transformers), retrying an interrupted
transfer from where it stopped, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE all stay huggingface_hub's.

What is fetched:
- first (open_checkpoint): config.json and model.safetensors.index.json, the map of which shard
  holds which tensor. That is all a server needs to choose its span.
- a server of blocks [start, end) (Checkpoint.fetch_blocks): the shards holding `model.layers.{i}.*`
  for i in the span. The server reads no tokenizer or generation config.
- a client (Checkpoint.fetch_client_files): generation_config.json and the tokenizer's files that the
  repository has, and the shards holding every tensor outside the blocks: `model.embed_tokens.*`,
  `model.norm.*`, `lm_head.*` (and a classifier's `score.*`).
A checkpoint saved as one model.safetensors (no index) is fetched whole, by servers and clients alike.

Every file after config.json is fetched at the commit config.json resolved to, so one snapshot never
mixes commits even when the branch moves meanwhile. A snapshot that already holds every file needed
is used without any request to the hub (a branch that moved since is noticed only by a snapshot
that lacks a file, or with --revision COMMIT); with HF_HUB_OFFLINE=1 nothing is ever requested, and
a file missing from the cache is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Optional

from tqdm.auto import tqdm

from petals_like.models.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointReader, block_of, cached_snapshot, local_checkpoint

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# what AutoTokenizer.from_pretrained reads for the supported families (Llama: tokenizer.json or
# tokenizer.model; Qwen2: vocab.json and merges.txt); a repository has only some of them
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKEN_SOURCES = "--token / token=, HF_TOKEN or `hf auth login`"


class HubError(OSError):
    """A checkpoint's file could not be fetched from the hub: one line naming the repository, the revision
    and what to check."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder and, for a hub repository, what is needed to fetch more of its files into it.

    `folder` is either a local folder, which holds every file (fetching is a no-op), or a snapshot in
    the hub cache, `{cache}/models--{org}--{name}/snapshots/{commit}`, which holds what was fetched so far.
    """

    folder: Path
    repo_id: Optional[str] = None  # None: a local folder
    token: Optional[str | bool] = field(default=None, repr=False)  # None: HF_TOKEN or `hf auth login`'s; never in logs
    cache_dir: Optional[str | Path] = None  # None: HF_HUB_CACHE
    progress: bool = True  # huggingface_hub's progress bar per file

    @property
    def commit(self) -> str:
        return self.folder.name

    def fetch_blocks(self, start: int, end: int) -> None:
        """The shards holding the tensors of blocks [start, end): a server's span."""
        self._fetch_tensors(lambda name: (index := block_of(name)) is not None and start <= index < end, f"blocks {start}:{end}")

    def fetch_client_files(self) -> None:
        """What a client loads: generation config and tokenizer (those the repository has), and the shards
        of every tensor outside the blocks."""
        if self.repo_id is None:
            return
        self._fetch((GENERATION_CONFIG_FILE, *TOKENIZER_FILES), "the client", required=False)
        self._fetch_tensors(lambda name: block_of(name) is None, "the client (embeddings, final norm, LM head)")

    # ---- internals ----

    def _fetch_tensors(self, wanted: Callable[[str], bool], what: str) -> None:
        if self.repo_id is None:
            return
        if (self.folder / INDEX_FILE).is_file():
            weight_map = CheckpointReader(self.folder).weight_map
            shards = sorted({shard for name, shard in weight_map.items() if wanted(name)})
        else:  # no index: the whole model is one file, fetched whole
            shards = [SINGLE_FILE]
        self._fetch(shards, what)

    def _fetch(self, filenames: Iterable[str], what: str, *, required: bool = True) -> None:
        """Fetch the files the snapshot lacks. Optional files (required=False) may be missing from the
        repository; huggingface_hub remembers that, so a later start asks no more."""
        from huggingface_hub import constants

        missing = [name for name in filenames if not (self.folder / name).is_file()]
        if not required:
            missing = [name for name in missing if not self._known_absent(name)]
        if not missing:
            return
        if constants.HF_HUB_OFFLINE:
            if required:
                raise HubError(
                    f"{', '.join(missing)} of {self.repo_id!r} at commit {self.commit} (for {what}) not in the hub cache "
                    f"{self.folder.parents[2]}, and HF_HUB_OFFLINE is set: fetch them with network access first"
                )
            return
        those = "" if required else " (those it has)"
        logger.info(f"Fetching {', '.join(missing)}{those} of {self.repo_id} at {self.commit[:8]} for {what}")
        for name in missing:
            _download(self.repo_id, name, self.commit, self.token, self.cache_dir, self.progress, required=required)

    def _known_absent(self, filename: str) -> bool:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(self.repo_id, filename, cache_dir=self.cache_dir, revision=self.commit)
        return cached is not None and not isinstance(cached, str)  # huggingface_hub's "the hub said it has no such file"


def open_checkpoint(
    name_or_path: str | Path,
    *,
    revision: Optional[str] = None,
    token: Optional[str | bool] = None,
    cache_dir: Optional[str | Path] = None,
    progress: bool = True,
) -> Checkpoint:
    """A local folder as it is; else config.json and the weight index of hub repository `name_or_path` at
    `revision` (a branch, tag or commit; default: main), from the cache or fetched: enough to read the
    model's spec and to choose a span before fetching its shards (Checkpoint.fetch_blocks)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    local = local_checkpoint(name_or_path)
    if local is not None:
        if revision is not None:
            logger.warning(f"{local} is a local folder: revision={revision!r} is ignored")
        return Checkpoint(local)
    repo_id = str(name_or_path)
    no_folder = f"no local folder {Path(repo_id).expanduser().absolute()}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(
            f"checkpoint {repo_id!r} not found: {no_folder}, and not a hub repository name (org/name)"
        ) from None
    folder = cached_snapshot(repo_id, cache_dir=cache_dir, revision=revision)
    if folder is None:
        if constants.HF_HUB_OFFLINE:
            where = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
            raise HubError(
                f"checkpoint {repo_id!r} not found: {no_folder}, no snapshot of revision "
                f"{revision or constants.DEFAULT_REVISION!r} with config.json in the hub cache {where}, and HF_HUB_OFFLINE is set"
            )
        try:
            folder = _download(repo_id, CONFIG_FILE, revision, token, cache_dir, progress).parent
        except HubError as e:
            if isinstance(e.__cause__, RepositoryNotFoundError) and not isinstance(e.__cause__, GatedRepoError):
                raise HubError(f"{e}; {no_folder} either") from e.__cause__  # perhaps a mistyped folder
            raise
    checkpoint = Checkpoint(folder, repo_id, token, cache_dir, progress)
    if not (folder / SINGLE_FILE).is_file():  # one model.safetensors needs no index
        checkpoint._fetch([INDEX_FILE], "the weight index", required=False)  # absent: one model.safetensors
    return checkpoint


def _download(
    repo_id: str,
    filename: str,
    revision: Optional[str],
    token: Optional[str | bool],
    cache_dir: Optional[str | Path],
    progress: bool,
    *,
    required: bool = True,
) -> Optional[Path]:
    """hf_hub_download of one file into the hub cache; hub errors become one-line HubErrors. An optional
    file (required=False) that the repository does not have gives None."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError

    revision = revision or constants.DEFAULT_REVISION
    try:
        path = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            tqdm_class=None if progress else partial(tqdm, disable=True),
        )
    except RemoteEntryNotFoundError as e:
        if not required:
            return None
        raise _hub_error(e, repo_id, filename, revision) from e
    except LocalEntryNotFoundError as e:  # the hub could not be reached or refused, and the cache lacks the file
        cause = e.__cause__ if isinstance(e.__cause__, HfHubHTTPError) else e
        raise _hub_error(cause, repo_id, filename, revision) from e
    except HfHubHTTPError as e:
        raise _hub_error(e, repo_id, filename, revision) from e
    return Path(path)


def _hub_error(error: Exception, repo_id: str, filename: str, revision: str) -> HubError:
    """What went wrong, in one line that names the repository and the revision."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    at = f"{repo_id!r} at revision {revision!r}"
    if isinstance(error, RemoteEntryNotFoundError):
        if filename == SINGLE_FILE:
            return HubError(
                f"{at} has neither {INDEX_FILE} nor {SINGLE_FILE} on {endpoint}: only safetensors checkpoints can be "
                f"served (.bin weights cannot be read lazily)"
            )
        return HubError(f"{filename} not found in {at} on {endpoint}")
    if isinstance(error, RevisionNotFoundError):
        return HubError(f"revision {revision!r} of {repo_id!r} not found on {endpoint}")
    if isinstance(error, GatedRepoError):
        return HubError(
            f"{repo_id!r} is gated: accept its conditions on {endpoint}/{repo_id} with the account whose token is "
            f"used ({TOKEN_SOURCES})"
        )
    if isinstance(error, RepositoryNotFoundError):
        return HubError(
            f"repository {repo_id!r} (revision {revision!r}) not found on {endpoint}, or private and not readable "
            f"with the token given ({TOKEN_SOURCES})"
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            return HubError(f"{endpoint} refused the token for {at} (HTTP {status}): check {TOKEN_SOURCES}")
        return HubError(f"fetching {filename} of {at} from {endpoint} failed (HTTP {status})")
    return HubError(
        f"{filename} of {at} is not in the hub cache and {endpoint} cannot be reached: check the network and HF_ENDPOINT"
    )

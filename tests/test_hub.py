"""Fetching from the Hugging Face hub (models/hub.py), against a fake hub on 127.0.0.1: a server fetches
its span's shards only, a client the shards of the embeddings, norm and head only, both through
huggingface_hub's own hf_hub_download (its cache layout, its resumption of a cut transfer)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
import torch
from huggingface_hub import constants

from petals_like.models.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointReader, block_of
from petals_like.models.hub import CONFIG_FILE, HubError, open_checkpoint
from tests.swarm import start_swarm

REPO = "acme/tiny-llama"
SINGLE_REPO = "acme/tiny-llama-one-file"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "good-token"
PREFIX = "hub-tiny-llama"  # the swarm's name for the model, the same for hub and local servers
SHARD_SIZE = "20KB"  # blocks 0 and 1 in shards of their own; the embeddings, head and last block+norm in three more


@dataclass
class Request:
    method: str
    path: str
    range: Optional[str]
    sent: int = 0  # body bytes written

    @property
    def filename(self) -> str:
        return self.path.rpartition("/")[2]


@dataclass
class FakeHub:
    """The routes hf_hub_download uses: HEAD and GET /{repo}/resolve/{revision}/{file}, with the hub's headers
    (X-Repo-Commit, ETag, Content-Length; X-Error-Code on errors) and Range for resumption. Every repository
    is private: requests without `Authorization: Bearer good-token` get 401."""

    repos: dict[str, Path]
    log: list[Request] = field(default_factory=list)
    cut_after: dict[str, int] = field(default_factory=dict)  # file -> bytes sent before its first GET is cut off

    def __post_init__(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                hub._answer(self)

            def do_GET(self) -> None:
                hub._answer(self)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def files(self, method: str = "GET") -> set[str]:
        return {r.filename for r in self.log if r.method == method and "/resolve/" in r.path}

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        request = Request(handler.command, handler.path, handler.headers.get("Range"))
        self.log.append(request)
        repo, _, rest = handler.path.lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        if handler.headers.get("Authorization") != f"Bearer {TOKEN}":
            return _error(handler, 401, message="Invalid credentials in Authorization header")
        if repo not in self.repos:
            return _error(handler, 404, code="RepoNotFound")
        if revision not in ("main", COMMIT):
            return _error(handler, 404, code="RevisionNotFound")
        path = self.repos[repo] / filename
        if not path.is_file():
            return _error(handler, 404, code="EntryNotFound", commit=True)
        data = path.read_bytes()
        start = int(request.range.removeprefix("bytes=").split("-")[0]) if request.range else 0
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Content-Length", str(len(data) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if handler.command == "GET":
            body = data[start:]
            cut = self.cut_after.pop(filename, None)
            if cut is not None:  # fewer bytes than Content-Length, then the connection closes
                body = body[:cut]
                handler.close_connection = True
            handler.wfile.write(body)
            request.sent = len(body)


def _error(handler: BaseHTTPRequestHandler, status: int, *, code: str = "", message: str = "", commit: bool = False) -> None:
    handler.send_response(status)
    if code:
        handler.send_header("X-Error-Code", code)
    if message:
        handler.send_header("X-Error-Message", message)
    if commit:  # the hub names the commit it looked in, so huggingface_hub remembers the file is absent
        handler.send_header("X-Repo-Commit", COMMIT)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


@pytest.fixture(scope="module")
def sharded(make_model: Callable[..., Path]) -> Path:
    return make_model(family="llama", preset="tiny", max_shard_size=SHARD_SIZE)


@pytest.fixture
def hub(sharded: Path, make_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The fake hub, as huggingface_hub's endpoint (it reads HF_ENDPOINT once, at import) and online."""
    fake = FakeHub({REPO: sharded, SINGLE_REPO: make_model(family="llama", preset="tiny")})
    monkeypatch.setattr(constants, "ENDPOINT", fake.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def shards_of(folder: Path, wanted: Callable[[str], bool]) -> set[str]:
    return {shard for name, shard in CheckpointReader(folder).weight_map.items() if wanted(name)}


def size(folder: Path, names: set[str]) -> int:
    return sum((folder / name).stat().st_size for name in names)


def test_server_fetches_its_span_and_client_its_modules_and_both_match_the_original(
    hub: FakeHub, sharded: Path, tmp_path: Path
) -> None:
    """A server of blocks 0:2 and a client from the hub, a server of 2:8 from the original folder: the
    hub side fetched only what it needs, and greedy generation equals transformers on the original."""
    from transformers import AutoModelForCausalLM

    from petals_like import AutoDistributedModelForCausalLM

    cache = tmp_path / "cache"
    swarm = start_swarm(REPO, ["0:2"], dht_prefix=PREFIX, token=TOKEN, cache_dir=str(cache))
    try:
        span_shards = shards_of(sharded, lambda name: block_of(name) in (0, 1))
        assert span_shards.isdisjoint(shards_of(sharded, lambda name: block_of(name) not in (0, 1)))  # SHARD_SIZE's point
        server_files = {CONFIG_FILE, INDEX_FILE} | span_shards
        assert hub.files() == server_files
        assert sum(r.sent for r in hub.log) == size(sharded, server_files)

        swarm.add_server(sharded, "2:8", dht_prefix=PREFIX)
        swarm.wait_for_blocks(PREFIX, 8)
        hub.log.clear()
        model = AutoDistributedModelForCausalLM.from_pretrained(
            REPO, initial_peers=swarm.peers, dht_prefix=PREFIX, token=TOKEN, cache_dir=cache
        )
        try:
            client_shards = shards_of(sharded, lambda name: block_of(name) is None)  # embeddings, norm, head
            client_files = {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
            assert hub.files() == client_files | client_shards  # config and index: already in the snapshot
            assert len(client_shards) < len(set(CheckpointReader(sharded).weight_map.values())) - len(span_shards)
            assert hub.files("HEAD") - hub.files() <= {"tokenizer.model", "special_tokens_map.json", "added_tokens.json",
                                                       "vocab.json", "merges.txt", "chat_template.json"}  # fmt: skip
            input_ids = torch.tensor([[1, 17, 42, 99, 7]])
            reference = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()
            expected = reference.generate(input_ids, max_new_tokens=12, do_sample=False)
            assert torch.equal(model.generate(input_ids, max_new_tokens=12), expected)
        finally:
            model.shutdown()
    finally:
        swarm.shutdown()
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / COMMIT
    assert {p.name for p in snapshot.iterdir()} == server_files | client_files | client_shards


def test_complete_snapshot_and_offline_mode_make_no_request(
    hub: FakeHub, sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    checkpoint = open_checkpoint(REPO, token=TOKEN, cache_dir=cache, progress=False)
    checkpoint.fetch_blocks(0, 2)
    checkpoint.fetch_client_files()
    hub.log.clear()

    for revision in (None, "main", COMMIT):
        again = open_checkpoint(REPO, revision=revision, token=TOKEN, cache_dir=cache, progress=False)
        again.fetch_blocks(0, 2)
        again.fetch_client_files()
        assert again.folder == checkpoint.folder
    assert open_checkpoint(sharded).folder == sharded  # a local folder, as before
    assert hub.log == []

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = open_checkpoint(REPO, token=TOKEN, cache_dir=cache, progress=False)
    offline.fetch_blocks(0, 2)
    with pytest.raises(HubError, match=r"model-\d+-of-\d+\.safetensors.* of 'acme/tiny-llama' .*HF_HUB_OFFLINE is set"):
        offline.fetch_blocks(2, 3)
    with pytest.raises(HubError, match=r"'acme/tiny-llama' not found.*no snapshot of revision 'main'.*HF_HUB_OFFLINE"):
        open_checkpoint(REPO, token=TOKEN, cache_dir=tmp_path / "empty")
    assert hub.log == []


def test_single_file_checkpoint_is_fetched_whole_once(hub: FakeHub, tmp_path: Path) -> None:
    checkpoint = open_checkpoint(SINGLE_REPO, token=TOKEN, cache_dir=tmp_path, progress=False)
    checkpoint.fetch_blocks(3, 4)
    assert hub.files() == {CONFIG_FILE, SINGLE_FILE}
    assert INDEX_FILE in hub.files("HEAD")  # asked for, absent: the checkpoint is one file
    hub.log.clear()
    again = open_checkpoint(SINGLE_REPO, token=TOKEN, cache_dir=tmp_path, progress=False)
    again.fetch_blocks(0, 8)
    assert hub.log == []
    assert CheckpointReader(again.folder).num_blocks == 8


def test_a_cut_transfer_resumes_where_it_stopped(hub: FakeHub, sharded: Path, tmp_path: Path, monkeypatch) -> None:
    """huggingface_hub re-requests the rest of a file with a Range header (it keeps what it has received in
    chunks of DOWNLOAD_CHUNK_SIZE, 10 MB; smaller chunks let a tiny shard show it)."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    shard = min(shards_of(sharded, lambda name: block_of(name) == 0))
    hub.cut_after[shard] = 5000
    checkpoint = open_checkpoint(REPO, token=TOKEN, cache_dir=tmp_path, progress=False)
    checkpoint.fetch_blocks(0, 1)
    first, second = [r for r in hub.log if r.method == "GET" and r.filename == shard]
    assert (first.range, first.sent) == (None, 5000)
    resumed_at = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 5000 and resumed_at + second.sent == (sharded / shard).stat().st_size
    assert (checkpoint.folder / shard).read_bytes() == (sharded / shard).read_bytes()


def test_wrong_token_revision_or_repository_is_a_one_line_error(hub: FakeHub, tmp_path: Path) -> None:
    cases = [
        (dict(token="bad-token"), REPO, r"refused the token for 'acme/tiny-llama' at revision 'main' \(HTTP 401\)"),
        (dict(token=TOKEN, revision="v9"), REPO, r"revision 'v9' of 'acme/tiny-llama' not found on http://127\.0\.0\.1"),
        (
            dict(token=TOKEN),
            "acme/no-such-model",
            r"repository 'acme/no-such-model' \(revision 'main'\) not found.*; no local folder .*acme/no-such-model either",
        ),
    ]
    for kwargs, repo, message in cases:
        with pytest.raises(HubError, match=message) as error:
            open_checkpoint(repo, cache_dir=tmp_path, **kwargs)
        assert "\n" not in str(error.value)
    assert not (tmp_path / "models--acme--tiny-llama" / "snapshots").exists()


def test_run_server_reports_a_refused_token_and_exits_1(hub: FakeHub, tmp_path: Path) -> None:
    """The whole command line, with the fake hub as HF_ENDPOINT: no traceback, and the token never printed."""
    env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "home"))
    for offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(offline, None)
    argv = [REPO, "--token", "bad-token", "--cache_dir", str(tmp_path), "--block_indices", "0:2", "--no_progress"]
    done = subprocess.run(
        [sys.executable, "-m", "petals_like.cli.run_server", *argv], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "refused the token for 'acme/tiny-llama'" in done.stderr and "Traceback" not in done.stderr
    assert "bad-token" not in done.stderr + done.stdout
    assert [r.filename for r in hub.log if "/resolve/" in r.path] == [CONFIG_FILE]

"""Server lifecycle: pick blocks, announce JOINING, load, serve, announce ONLINE, re-announce, leave.

One process holds one SwarmNode (a p2pd daemon + DHT node on an event-loop thread) and one
Scheduler thread (all block math, continuously batched); that is the whole server. What it
announces lives in server/announcer.py, which blocks it serves in server/balancer.py, loading a
span in server/loading.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from petals_like.config import ServerConfig
from petals_like.data_structures import MAX_TEXT, ServerState
from petals_like.dht.node import SwarmNode
from petals_like.dht.records import ModelInfo, default_dht_prefix
from petals_like.models.hub import open_checkpoint
from petals_like.models.span import BlockSpan
from petals_like.models.spec import ModelSpec, resolve_dtype
from petals_like.quant.weights import QUANT_TYPES
from petals_like.server.adapters import AdapterStore, adapter_arg
from petals_like.server.announcer import Announcer
from petals_like.server.backend import SpanBackend
from petals_like.server.balancer import Balancer
from petals_like.server.handler import Handlers
from petals_like.server.kv_cache import KVPool, PrefixIndex
from petals_like.server.loading import free_memory, load_span
from petals_like.server.runtime import Priority
from petals_like.server.scheduler import Scheduler
from petals_like.server.sessions import SessionManager
from petals_like.server.throughput import cache_key, get_rates
from petals_like.utils.threads import in_compute_thread

logger = logging.getLogger(__name__)


def _public_model_name(model: str | Path) -> str:
    """The model's name in the swarm's list of models: a hub name as it is, a local folder by its name only."""
    path = Path(model).expanduser()
    return (path.name if path.is_dir() else str(model))[:MAX_TEXT]


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        # a hub repository: config.json and the weight index now, the span's shards once the span is chosen
        self.checkpoint = open_checkpoint(
            config.model, revision=config.revision, token=config.token, cache_dir=config.cache_dir, progress=config.progress
        )
        self.path = self.checkpoint.folder
        self.spec = ModelSpec.from_pretrained(self.path)
        self.dht_prefix = config.dht_prefix or default_dht_prefix(config.model)
        self.model_info = ModelInfo(num_blocks=self.spec.num_blocks, name=_public_model_name(config.model))
        self.adapter_names = tuple(adapter_arg(item)[0] for item in config.adapters)  # announced in every record
        self.dtype = resolve_dtype(config.torch_dtype, self.spec)
        self.device = torch.device(config.device)
        if config.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {config.quant_type!r}")
        self.node: Optional[SwarmNode] = None
        self.scheduler: Optional[Scheduler] = None
        self.sessions: Optional[SessionManager] = None
        self.handlers: Optional[Handlers] = None
        self.start_block = self.end_block = 0
        self.state = ServerState.OFFLINE
        self.throughput = 0.0
        self.inference_rps = 0.0
        self.forward_rps = 0.0
        self.stopped = threading.Event()
        self.announcer = Announcer(self)  # the DHT records: what and when (server/announcer.py)
        self.balancer = Balancer(self)  # which blocks: at start and every balance period (server/balancer.py)
        self._announcing: Optional[asyncio.Future] = None

    # ---- start ----

    def start(self) -> Server:
        started = time.perf_counter()
        config = self.config
        self.node = SwarmNode(
            config.initial_peers,
            host_maddrs=config.host_maddrs,
            announce_maddrs=config.announce_maddrs,
            port=config.port,
            public_ip=config.public_ip,
            force_reachability=config.force_reachability,
            relay_limits=config.relay_limits,
            max_relays=config.max_relays,
            identity_path=config.identity_path,
            name="server",
        )
        try:
            self.start_block, self.end_block = self.balancer.choose_blocks()
            self.announcer.announce(ServerState.JOINING)
            self._serve_span()
            self.announcer.announce(ServerState.ONLINE)
            self._announcing = self.node.submit(self.announcer.run_forever())
            if config.block_indices is None and config.balance_period > 0:
                self.balancer.start()
        except BaseException:
            self.shutdown()
            raise
        logger.info(f"Server ready in {time.perf_counter() - started:.1f} s: {self.node.visible_maddrs()}")
        return self

    def _serve_span(self) -> None:
        """Load blocks [start_block, end_block) and serve them: new backend, pool, scheduler and sessions."""
        config = self.config
        logger.info(
            f"Serving blocks {self.start_block}:{self.end_block} of {self.dht_prefix} "
            f"as {self.node.peer_id} ({str(self.dtype).replace('torch.', '')}, {self.device})"
        )
        self.checkpoint.fetch_blocks(self.start_block, self.end_block)  # a no-op for a local folder or a complete snapshot
        # on a thread of its own, so that no long-lived thread but the scheduler's keeps a team of
        # compute threads (utils/threads.py)
        span = in_compute_thread(
            load_span,
            self.path,
            self.spec,
            self.start_block,
            self.end_block,
            self.dtype,
            self.device,
            config.progress,
            config.quant_type,
            config.offload_experts,
            num_threads=config.num_threads,
        )
        backend = SpanBackend(
            span,
            dtype=self.dtype,
            device=self.device,
            max_batch_size=config.max_batch_size,
            max_request_tokens=config.max_request_tokens,
            adapters=AdapterStore(
                self.spec,
                self.start_block,
                self.end_block,
                dtype=self.dtype,
                device=self.device,
                max_rank=config.max_lora_rank,
                max_bytes_per_peer=config.max_adapter_bytes,
                idle_timeout=config.adapter_idle_timeout,
            ),
        )
        backend.adapters.load_hosted(config.adapters)
        pool = self._make_pool()
        prefix_index = PrefixIndex(pool)
        self.scheduler = Scheduler(
            span,
            pool,
            token_budget=config.token_budget,
            num_threads=config.num_threads,
            gather_wait=config.batch_gather_wait,
            prefill_chunk=config.prefill_chunk,
        )
        self.sessions = SessionManager(backend, self.scheduler, pool, prefix_index, config)
        if self.handlers is None:
            self.handlers = Handlers(backend, self.scheduler, self.sessions, config, self.announcer.live_fields)
            self.node.run(self.handlers.register(self.node.p2p))
            self.handlers.pusher.resolve = self.announcer.learn_route
        else:  # a move: the registered handlers serve the new span from now on
            self.handlers.serve(backend, self.scheduler, self.sessions)
        # measured where steps will run: on the scheduler's thread, with its thread count
        self.node.run(self.scheduler.submit(Priority.FORWARD, self._set_throughput, span))

    def move(self, start: int) -> None:
        """Leave the current span (its sessions fail over on their clients) and serve [start, start + n)."""
        old = (self.start_block, self.end_block)
        num_blocks = old[1] - old[0]
        logger.info(f"Moving from blocks {old[0]}:{old[1]} to {start}:{start + num_blocks} (swarm re-balancing)")
        self.checkpoint.fetch_blocks(start, start + num_blocks)  # while the old span still serves
        self.node.run(self.announcer.declare_range(ServerState.OFFLINE, *old), timeout=60)
        self.start_block, self.end_block = start, start + num_blocks
        self.announcer.announce(ServerState.JOINING)
        self.scheduler.shutdown()  # steps in flight get an error; memory for the new span is freed first
        self._serve_span()
        self.announcer.announce(ServerState.ONLINE)

    def _make_pool(self) -> KVPool:
        """The KV pool: --kv_cache_tokens, or a quarter of the free memory after loading the blocks."""
        spec, config = self.spec, self.config
        num_layers = self.end_block - self.start_block
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        token_bytes = 2 * num_layers * spec.num_kv_heads * spec.head_dim * itemsize
        tokens = config.kv_cache_tokens
        if tokens is None:
            tokens = min(int(0.25 * free_memory(self.device) // token_bytes), 1 << 17)
        num_pages = max(1, tokens // config.page_size)
        logger.info(
            f"KV pool: {num_pages} pages of {config.page_size} tokens "
            f"({num_pages * config.page_size * token_bytes / 2**20:.0f} MiB)"
        )
        return KVPool(
            num_layers=num_layers,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            num_pages=num_pages,
            page_size=config.page_size,
            dtype=self.dtype,
            device=self.device,
        )

    def _set_throughput(self, span: BlockSpan) -> None:
        """The announced numbers (see server/throughput.py for what they mean and how they are derived)."""
        mode, num_blocks = self.config.throughput, self.end_block - self.start_block
        if not isinstance(mode, str):
            self.throughput = float(mode)
            self.inference_rps = self.throughput / num_blocks
            self.forward_rps = self.inference_rps  # unmeasured: assume forward runs at the decode rate
            return
        offload = f"+experts{self.config.offload_experts}" if self.config.offload_experts else ""
        key = cache_key(self.spec, self.dtype, self.device, self.config.quant_type + offload)
        rates = get_rates(span, key, mode)
        self.throughput = rates.throughput(num_blocks, self.spec.hidden_size, self.config.network_mbps)
        self.inference_rps = rates.inference_block_steps / num_blocks  # decode steps/s over the whole span
        self.forward_rps = rates.forward_block_tokens / num_blocks  # forward tokens/s over the whole span
        logger.info(
            f"Throughput {self.throughput:.1f} block-steps/s ({self.inference_rps:.1f} steps/s over "
            f"{num_blocks} blocks, forward {self.forward_rps:.0f} tokens/s)"
        )

    # ---- stop ----

    def shutdown(self) -> None:
        """Announce OFFLINE, stop serving, stop the daemon. Idempotent; safe after a failed start."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        if self._announcing is not None:
            self._announcing.cancel()
        if self.node is not None:
            if self.end_block > self.start_block and self.state != ServerState.OFFLINE:
                try:
                    # the DHT keeps the record that expires last, so OFFLINE must outlive the last ONLINE
                    self.announcer.announce(ServerState.OFFLINE)
                except Exception as e:
                    logger.warning(f"Could not announce OFFLINE: {e!r}")
            self.node.shutdown()
        if self.scheduler is not None:
            self.scheduler.shutdown()
        logger.info("Server stopped")

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self.stopped.wait(timeout)

    @property
    def maddrs(self) -> list[str]:
        return self.node.visible_maddrs()

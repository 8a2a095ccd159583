"""Server lifecycle: pick blocks, announce JOINING, load, serve, announce ONLINE, re-announce, leave.

One process holds one SwarmNode (a p2pd daemon + DHT node on an event-loop thread) and one
Scheduler thread (all block math, continuously batched); that is the whole server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
import time
from pathlib import Path
from typing import Optional

import psutil
import torch

from petals_like import __version__
from petals_like.config import ServerConfig
from petals_like.data_structures import MAX_PINGS, MAX_TEXT, ServerInfo, ServerState, parse_block_range
from petals_like.dht.announce import declare_blocks, get_block_infos
from petals_like.dht.node import SwarmNode
from petals_like.dht.records import ModelInfo, default_dht_prefix
from petals_like.dht.relay import RELAY_PENALTY
from petals_like.models.checkpoint import CheckpointReader, resolve_checkpoint
from petals_like.models.llama.block import LlamaBlock
from petals_like.models.span import BlockSpan
from petals_like.models.spec import ModelSpec, resolve_dtype
from petals_like.quant.weights import QUANT_TYPES, quantize_block
from petals_like.routing.pings import PingTable
from petals_like.server.adapters import AdapterStore, adapter_arg
from petals_like.server.backend import SpanBackend
from petals_like.server.block_selection import block_throughputs, choose_best_start, should_move
from petals_like.server.handler import Handlers
from petals_like.server.kv_cache import KVPool, PrefixIndex
from petals_like.server.runtime import Priority
from petals_like.server.scheduler import Scheduler
from petals_like.server.sessions import SessionManager
from petals_like.server.throughput import cache_key, get_rates
from petals_like.utils.threads import in_compute_thread

logger = logging.getLogger(__name__)

ROUTE_LOOKUP_PERIOD = 30.0  # seconds between DHT look-ups for one next server we cannot reach yet


def load_span(
    path: Path,
    spec: ModelSpec,
    start: int,
    end: int,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool = True,
    quant_type: str = "none",
) -> BlockSpan:
    """Build blocks [start, end) from only their tensors: peak memory follows the span, not the model.

    Each block is moved, fused and quantized as soon as it is read, so a quantized span never holds
    more than one block in full precision.
    """
    reader = CheckpointReader(path)
    blocks = []
    for index, state_dict in zip(range(start, end), reader.load_blocks(start, end, dtype, progress=progress)):
        with torch.device("meta"):
            block = LlamaBlock(spec, index)
        block.load_state_dict(state_dict, strict=True, assign=True)
        del state_dict
        block = block.to(device=device, dtype=dtype).requires_grad_(False)
        block.fuse_projections()  # after the move to the device (see its docstring)
        if quant_type != "none":
            quantize_block(block, quant_type)
            for param in block.parameters():  # norms and biases: own copies, so the checkpoint's
                param.data = param.data.clone()  # memory map (read zero-copy) can be released
        blocks.append(block)
    span = BlockSpan(spec, start, end, blocks)
    if quant_type != "none":
        _return_freed_memory()
    return span.eval()


def _return_freed_memory() -> None:
    """Hand the full-precision weights' freed heap back to the OS (glibc keeps it otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused by later allocations anyway
        pass


def _public_model_name(model: str | Path) -> str:
    """The model's name in the swarm's list of models: a hub name as it is, a local folder by its name only."""
    path = Path(model).expanduser()
    return (path.name if path.is_dir() else str(model))[:MAX_TEXT]


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.path = resolve_checkpoint(config.model)
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
        self._announcer: Optional[asyncio.Future] = None
        self._stopped = threading.Event()
        self._load_mark = (time.monotonic(), 0.0)  # (when, scheduler busy seconds) at the last announcement
        self._announced_load = 0.0
        self.pings = PingTable(timeout=2.0, period=0.0)  # measured once per announcement
        self._balancer: Optional[threading.Thread] = None
        self.moves = 0
        self._next_pings: dict[str, float] = {}
        self._looked_up: dict[str, float] = {}  # peer -> when the DHT was last read to reach it (_learn_route)

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
            self.start_block, self.end_block = self._choose_blocks()
            self._announce(ServerState.JOINING)
            self._serve_span()
            self._announce(ServerState.ONLINE)
            self._announcer = self.node.submit(self._announce_forever())
            if config.block_indices is None and config.balance_period > 0:
                self._balancer = threading.Thread(target=self._balance_forever, name="balancer", daemon=True)
                self._balancer.start()
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
            self.handlers = Handlers(backend, self.scheduler, self.sessions, config, self._info_fields)
            self.node.run(self.handlers.register(self.node.p2p))
            self.handlers.pusher.resolve = self._learn_route
        else:  # a move: the registered handlers serve the new span from now on
            self.handlers.backend, self.handlers.scheduler, self.handlers.sessions = backend, self.scheduler, self.sessions
        # measured where steps will run: on the scheduler's thread, with its thread count
        self.node.run(self.scheduler.submit(Priority.FORWARD, self._set_throughput, span))

    # ---- re-balancing ----

    def _balance_forever(self) -> None:
        """Every randomized balance period: move if the swarm's bottleneck would gain enough (block_selection)."""
        while not self._stopped.wait(self.config.balance_period * random.uniform(0.5, 1.5)):
            try:
                target = self._move_target()
                if target is not None:
                    # servers that noticed the same hole wait a random moment and look again: the
                    # first to move announces it, and the others see that they are no longer needed
                    if self._stopped.wait(random.uniform(0, self.config.balance_period)):
                        return
                    if self._move_target() == target:
                        self._move(target)
            except Exception as e:  # a failed check is retried next period
                logger.warning(f"Re-balancing check failed: {e!r}")

    def _move_target(self) -> Optional[int]:
        infos = self.node.run(
            get_block_infos(self.node.dht, self.dht_prefix, range(self.spec.num_blocks), num_blocks=self.spec.num_blocks),
            timeout=60,
        )
        totals = block_throughputs(infos, exclude=self.node.peer_id)
        for block in range(self.start_block, self.end_block):
            totals[block] += self.throughput  # our own records may not have spread yet
        return should_move(totals, self.start_block, self.end_block, self.throughput, self.config.balance_quality)

    def _move(self, start: int) -> None:
        """Leave the current span (its sessions fail over on their clients) and serve [start, start + n)."""
        old = (self.start_block, self.end_block)
        num_blocks = old[1] - old[0]
        logger.info(f"Moving from blocks {old[0]}:{old[1]} to {start}:{start + num_blocks} (swarm re-balancing)")
        self.node.run(self._declare_range(ServerState.OFFLINE, *old), timeout=60)
        self.start_block, self.end_block = start, start + num_blocks
        self._announce(ServerState.JOINING)
        self.scheduler.shutdown()  # steps in flight get an error; memory for the new span is freed first
        self._serve_span()
        self._announce(ServerState.ONLINE)
        self.moves += 1

    def _choose_blocks(self) -> tuple[int, int]:
        num_model_blocks = self.spec.num_blocks
        if self.config.block_indices:
            return parse_block_range(self.config.block_indices, num_model_blocks)
        num_blocks = self.config.num_blocks or self._blocks_that_fit()
        num_blocks = min(num_blocks, num_model_blocks)
        # servers that start together: a random moment each, so that each sees the others' JOINING records
        time.sleep(random.uniform(0, self.config.join_delay))
        infos = self.node.run(
            get_block_infos(self.node.dht, self.dht_prefix, range(num_model_blocks), num_blocks=num_model_blocks)
        )
        throughput = self.config.throughput if not isinstance(self.config.throughput, str) else 1.0
        start = choose_best_start(block_throughputs(infos, exclude=self.node.peer_id), num_blocks, throughput)
        return start, start + num_blocks

    def _blocks_that_fit(self) -> int:
        """As many blocks as 80% of the free memory holds (weights plus a margin for activations)."""
        spec = self.spec
        per_block = 4 * spec.hidden_size * spec.head_dim * (spec.num_heads + spec.num_kv_heads) // 2
        per_block += 3 * spec.hidden_size * spec.intermediate_size
        per_block_bytes = per_block * torch.empty((), dtype=self.dtype).element_size() * 1.2
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = psutil.virtual_memory().available
        return max(1, int(0.8 * free // per_block_bytes))

    def _make_pool(self) -> KVPool:
        """The KV pool: --kv_cache_tokens, or a quarter of the free memory after loading the blocks."""
        spec, config = self.spec, self.config
        num_layers = self.end_block - self.start_block
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        token_bytes = 2 * num_layers * spec.num_kv_heads * spec.head_dim * itemsize
        tokens = config.kv_cache_tokens
        if tokens is None:
            if self.device.type == "cuda":
                free = torch.cuda.mem_get_info(self.device)[0]
            else:
                free = psutil.virtual_memory().available
            tokens = min(int(0.25 * free // token_bytes), 1 << 17)
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
        key = cache_key(self.spec, self.dtype, self.device, self.config.quant_type)
        rates = get_rates(span, key, mode)
        self.throughput = rates.throughput(num_blocks, self.spec.hidden_size, self.config.network_mbps)
        self.inference_rps = rates.inference_block_steps / num_blocks  # decode steps/s over the whole span
        self.forward_rps = rates.forward_block_tokens / num_blocks  # forward tokens/s over the whole span
        logger.info(
            f"Throughput {self.throughput:.1f} block-steps/s ({self.inference_rps:.1f} steps/s over "
            f"{num_blocks} blocks, forward {self.forward_rps:.0f} tokens/s)"
        )

    # ---- announcing ----

    def _info_fields(self) -> dict:
        return self.server_info(self.state).to_record()

    def server_info(self, state: ServerState) -> ServerInfo:
        return ServerInfo(
            state=state,
            start_block=self.start_block,
            end_block=self.end_block,
            # a relayed server costs every step an extra hop: routing prefers a direct one (data_structures.py)
            throughput=float(self.throughput) * (RELAY_PENALTY if self.node.using_relay else 1.0),
            inference_rps=float(self.inference_rps),
            forward_rps=float(self.forward_rps),
            cache_tokens_left=self.sessions.free_tokens if self.sessions else 0,
            open_sessions=len(self.sessions.sessions) if self.sessions else 0,
            load=self._announced_load,
            version=__version__,
            torch_dtype=str(self.dtype).replace("torch.", ""),
            quant_type=self.config.quant_type,
            adapters=self.adapter_names,
            public_name=self.config.public_name,
            next_pings=dict(self._next_pings),
            using_relay=self.node.using_relay,
            addrs=tuple(self.node.record_addrs()),
        )

    def _load(self) -> float:
        """Busy fraction of the compute thread since the previous call (one call per announcement)."""
        if self.scheduler is None:
            return 0.0
        now, busy = time.monotonic(), self.scheduler.stats.busy_seconds
        last_time, last_busy = self._load_mark
        self._load_mark = (now, busy)
        return min(1.0, max(0.0, (busy - last_busy) / max(now - last_time, 1e-6)))

    def _announce(self, state: ServerState) -> None:
        self.state = state
        self.node.run(self._declare(state), timeout=60)

    async def _following(self) -> list[str]:
        """The online servers that can follow this span (they serve block end_block); learns how to reach
        each (directly or through its relays) for pushes."""
        if self.end_block >= self.spec.num_blocks:
            return []
        (following,) = await get_block_infos(self.node.dht, self.dht_prefix, [self.end_block], num_blocks=self.spec.num_blocks)
        peers = [p for p, info in following.items() if p != self.node.peer_id and info.state == ServerState.ONLINE]
        now = time.monotonic()
        for peer in peers:
            self.node.routes.learn(peer, following[peer].addrs, following[peer].using_relay)
        self._looked_up = {p: t for p, t in self._looked_up.items() if now - t < ROUTE_LOOKUP_PERIOD} | dict.fromkeys(peers, now)
        return peers

    async def _learn_route(self, peer_id: str) -> None:
        """Before the first push to a server met since the last look-up: read how to reach it (at most once
        a ROUTE_LOOKUP_PERIOD per unknown peer, so that clients naming strangers cost little)."""
        if peer_id in self.node.routes.peers or time.monotonic() - self._looked_up.get(peer_id, -1e9) < ROUTE_LOOKUP_PERIOD:
            return
        self._looked_up[peer_id] = time.monotonic()
        await self._following()

    async def _measure_next_pings(self) -> None:
        """Round trips to the servers that can follow this span (they serve block end_block)."""
        peers = await self._following()
        self.pings.forget(peers)
        # at most MAX_PINGS of them: those that answered before first, the rest at random (records are claims,
        # and whoever floods the DHT with servers that do not exist must not crowd out the real ones)
        answered = {p for p in peers if p in self.pings.rtts and p not in self.pings.unanswered}
        others = [p for p in peers if p not in answered]
        random.shuffle(others)
        peers = (sorted(answered) + others)[:MAX_PINGS]
        await self.pings.measure(self.node.p2p, peers)
        self._next_pings = self.pings.snapshot(peers)

    async def _declare_range(self, state: ServerState, start: int, end: int) -> None:
        await declare_blocks(
            self.node.dht,
            self.dht_prefix,
            range(start, end),
            dataclasses.replace(self.server_info(state), start_block=start, end_block=end),
            identity=self.node.identity,
            expiration=self.config.expiration,
        )

    async def _declare(self, state: ServerState) -> None:
        if state == ServerState.ONLINE:
            try:  # bounded: pings are a hint for routing; announcing matters more
                await asyncio.wait_for(self._measure_next_pings(), self.config.announce_period / 2)
            except Exception as e:
                logger.debug(f"Measuring next pings failed: {e!r}")
        self._announced_load = self._load()
        model = self.model_info if state != ServerState.OFFLINE else None
        await declare_blocks(
            self.node.dht,
            self.dht_prefix,
            range(self.start_block, self.end_block),
            self.server_info(state),
            identity=self.node.identity,
            expiration=self.config.expiration,
            model=model,
        )

    async def _announce_forever(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(self.config.announce_period)
            rounds += 1
            try:  # relay slots are renewed with every announcement; reachability is checked again now and then
                recheck = rounds % max(1, round(self.config.reachability_period / self.config.announce_period)) == 0
                await asyncio.wait_for(self.node.maintain_reachability(recheck), self.config.announce_period / 2)
            except Exception as e:
                logger.warning(f"Renewing relays / checking reachability failed: {e!r}")
            if self.handlers is not None:
                self.handlers.backend.adapters.expire()  # client LoRA weights unused for adapter_idle_timeout
            try:
                await self._declare(self.state)
            except Exception as e:  # a failed re-announcement is retried next period
                logger.warning(f"Re-announcement failed: {e!r}")

    # ---- stop ----

    def shutdown(self) -> None:
        """Announce OFFLINE, stop serving, stop the daemon. Idempotent; safe after a failed start."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._announcer is not None:
            self._announcer.cancel()
        if self.node is not None:
            if self.end_block > self.start_block and self.state != ServerState.OFFLINE:
                try:
                    # the DHT keeps the record that expires last, so OFFLINE must outlive the last ONLINE
                    self._announce(ServerState.OFFLINE)
                except Exception as e:
                    logger.warning(f"Could not announce OFFLINE: {e!r}")
            self.node.shutdown()
        if self.scheduler is not None:
            self.scheduler.shutdown()
        logger.info("Server stopped")

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._stopped.wait(timeout)

    @property
    def maddrs(self) -> list[str]:
        return self.node.visible_maddrs()

"""ClientConfig and ServerConfig: every tunable of a client or a server, with its reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Optional, Sequence

from petals_like.dht.records import MAX_LIFETIME
from petals_like.dht.relay import RelayLimits

DEFAULT_MAX_PART_BYTES = 2 * 1024**2  # one P2P message part; hivemind caps unary messages at 4 MiB
# how a session's hidden states may travel (protocol.pack_message): as float32, float16 or bfloat16,
# or "int8": blocks of values as int8 plus a float16 scale each
WIRE_FORMATS = ("float32", "float16", "bfloat16", "int8")


@dataclass
class ClientConfig:
    initial_peers: Sequence[str] = ()  # multiaddrs to bootstrap the DHT from
    dht_prefix: Optional[str] = None  # the model's name in the swarm; derived from the checkpoint when None
    request_timeout: float = 180.0  # seconds for one forward/backward/inference step
    connect_timeout: float = 30.0  # seconds to join the DHT and to open an inference stream
    ban_timeout: float = 15.0  # seconds to avoid a peer after it fails (doubles on repeated failures)
    max_retries: int = 6  # attempts to replace a failed span before giving up on a step
    update_period: float = 30.0  # seconds between refreshes of the swarm view
    ping_period: float = 30.0  # seconds between round-trip measurements of one server
    ping_timeout: float = 2.0  # a server slower than this to answer a ping counts as this slow
    default_rtt: float = 0.1  # round trip assumed for servers not measured yet
    use_push: bool = True  # servers send their outputs straight to the next server of an inference chain
    spot_check: float = 0.0  # fraction of forward calls and inference steps re-run on another server to compare
    spot_check_ban: float = 3600.0  # seconds to avoid a server whose output a spot check found wrong
    num_chains: int = 1  # forward/backward: split a batch over up to this many different chains at once
    active_adapter: Optional[str] = None  # a server-hosted adapter (run_server --adapters) to run with
    wire: Optional[str] = None  # inference hidden states on the wire: float32, float16, bfloat16 or int8 (8-bit
    # blocks); None = as computed (the model's dtype: exact)
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",)  # where the client's p2p daemon listens
    allowed_servers: Optional[Collection[str]] = None  # peer ids: route only through these (None = any server)
    blocked_servers: Collection[str] = ()  # peer ids never to route through

    def __post_init__(self) -> None:
        if not 0 <= self.spot_check <= 1:
            raise ValueError(f"spot_check must be a fraction in [0, 1], got {self.spot_check}")
        if self.num_chains < 1:
            raise ValueError(f"num_chains must be >= 1, got {self.num_chains}")
        if self.wire is not None and self.wire not in WIRE_FORMATS:
            raise ValueError(f"wire must be one of {WIRE_FORMATS} or None, got {self.wire!r}")
        for name in ("allowed_servers", "blocked_servers"):
            value = getattr(self, name)
            if isinstance(value, str):  # one peer id, not the collection of its characters
                raise TypeError(f"{name} must be a collection of peer ids, got the string {value!r}")
            if value is not None:
                setattr(self, name, frozenset(str(peer) for peer in value))  # PeerID objects too


@dataclass
class ServerConfig:
    model: str | Path  # checkpoint folder or Hugging Face name (found in the local cache)
    initial_peers: Sequence[str] = ()  # multiaddrs to join; empty starts a new swarm
    block_indices: Optional[str] = None  # "A:B" pins the span; otherwise num_blocks are chosen
    num_blocks: Optional[int] = None  # span length when choosing where to serve
    dht_prefix: Optional[str] = None  # the model's name in the swarm; derived from the checkpoint when None
    host_maddrs: Optional[Sequence[str]] = None  # where to listen; None = every interface on `port` (dht/reach.py)
    announce_maddrs: Sequence[str] = ()  # what to announce instead of the interfaces' addresses
    port: int = 0  # TCP and UDP port when host_maddrs is None; 0 = a free one
    public_ip: Optional[str] = None  # announce this address (e.g. a router's, with the port forwarded to this host)
    force_reachability: Optional[str] = None  # "public" / "private" instead of asking peers to dial back
    relay_limits: Optional[RelayLimits] = field(default_factory=RelayLimits)  # relay for NATed servers; None = never
    max_relays: int = 2  # relays to hold slots on when behind NAT (0: none: nobody can reach this server)
    reachability_period: float = 600.0  # seconds between dial-back checks after the one at start
    identity_path: Optional[str] = None  # private key file: a stable peer id across restarts
    device: str = "cpu"
    torch_dtype: str = "auto"  # "auto" = the checkpoint's dtype
    quant_type: str = "none"
    num_threads: Optional[int] = None  # torch intra-op threads for the compute loop; None = torch's default
    throughput: str | float = "auto"  # "auto" (cached measurement), "eval" (re-measure) or block-steps/s to announce
    network_mbps: float = 100.0  # uplink assumed when deriving throughput (server/throughput.py)
    balance_period: float = 120.0  # mean seconds between re-balancing checks (randomized x0.5..1.5); 0 = never move
    balance_quality: float = 0.75  # move only if the swarm's bottleneck would grow by more than 1 / this
    join_delay: float = 1.0  # a random wait of up to this many seconds before choosing blocks on join
    kv_cache_tokens: Optional[int] = None  # KV pool size in tokens (all sessions); None = from free memory
    page_size: int = 16  # tokens per KV page (also the granularity of prefix reuse)
    max_alloc_timeout: float = 1.0  # seconds a step waits for free pages before a retriable error
    token_budget: int = 256  # tokens per batched iteration; longer prompts are split into chunks
    prefill_chunk: int = 16  # prompt tokens per iteration while other sessions are active (their latency)
    batch_gather_wait: float = 0.02  # seconds to wait for sessions of the last batch before a smaller one
    share_prefix_cache: bool = False  # reuse prefix pages across clients (trusts their claimed hashes)
    max_session_length: int = 8192  # upper bound of a session's max_length
    max_sessions_per_peer: int = 128  # inference sessions one client (peer id) may hold open at once
    max_cache_share: float = 0.5  # KV pool share one client may hold while other clients hold sessions too
    max_batch_size: int = 64  # sequences in one request
    max_request_tokens: int = 16384  # batch x new tokens in one request
    max_message_bytes: int = 256 * 1024**2  # one assembled request, all parts together
    wire_formats: Sequence[str] = WIRE_FORMATS  # what sessions may choose
    push_timeout: float = 5.0  # seconds for the next server to accept a pushed step before the client relays it
    max_part_bytes: int = DEFAULT_MAX_PART_BYTES
    announce_period: float = 30.0  # seconds between re-announcements
    expiration: float = 90.0  # seconds a record lives unless re-announced
    session_idle_timeout: float = 600.0  # seconds an inference stream may stay silent before it is closed
    request_timeout: float = 600.0  # seconds one forward/backward may wait in the queue plus compute
    public_name: str = ""
    adapters: Sequence[str] = ()  # PEFT LoRA folders (or NAME=PATH) to serve for inference; named by folder
    max_lora_rank: int = 64  # largest rank of a client-held LoRA
    max_adapter_bytes: int = 256 * 1024**2  # client-held LoRA weights kept for one client
    adapter_idle_timeout: float = 600.0  # seconds a client's LoRA weights stay without being used
    progress: bool = True  # progress bar while loading blocks

    def __post_init__(self) -> None:
        if not 0 < self.max_cache_share <= 1:
            raise ValueError(f"max_cache_share must be in (0, 1], got {self.max_cache_share}")
        if self.max_sessions_per_peer < 1:
            raise ValueError(f"max_sessions_per_peer must be >= 1, got {self.max_sessions_per_peer}")
        if not 0 < self.announce_period < self.expiration <= MAX_LIFETIME:
            raise ValueError(
                f"need 0 < announce_period < expiration <= {MAX_LIFETIME:.0f} s (other nodes refuse records "
                f"that live longer), got {self.announce_period} and {self.expiration}"
            )

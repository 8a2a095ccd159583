"""ClientConfig and ServerConfig: every tunable of a client or a server, with its reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Optional, Sequence

from petals_like.dht.records import MAX_LIFETIME
from petals_like.dht.relay import RelayLimits

# max_retries=None: retries enough to outlast any outage, while request_timeout x retries stays a
# finite wait (threading caps timeouts at ~292 years)
UNLIMITED_RETRIES = 10**6
DEFAULT_MAX_PART_BYTES = 2 * 1024**2  # one P2P message part; hivemind caps unary messages at 4 MiB
# how a session's hidden states may travel (protocol.pack_message): as float32, float16 or bfloat16,
# or "int8": blocks of values as int8 plus a float16 scale each
WIRE_FORMATS = ("float32", "float16", "bfloat16", "int8")


def flag(default: Any, help: str, *, secret: bool = False, **argparse: Any) -> Any:
    """A config field that is also a command-line flag `--NAME` (utils/cli.add_dataclass_flags): its default
    and help live here only. `argparse`: type (default: the default's type), choices, nargs, and `group`
    (a help section; "span" makes a mutually exclusive pair). secret: kept out of the config's repr (and so
    out of logs)."""
    return field(default=default, repr=not secret, metadata={"help": help, **argparse})


def parse_throughput(text: str) -> str | float:
    """--throughput: auto, eval or a positive number of block-steps per second."""
    if text in ("auto", "eval"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected auto, eval or a positive number, got {text!r}") from None
    if not 0 < value < 1e9:
        raise ValueError(f"throughput must be positive, got {value}")
    return value


@dataclass
class ClientConfig:
    initial_peers: Sequence[str] = ()  # multiaddrs to bootstrap the DHT from
    dht_prefix: Optional[str] = None  # the model's name in the swarm; derived from the checkpoint when None
    request_timeout: float = 180.0  # seconds for one forward/backward/inference step
    connect_timeout: float = 30.0  # seconds to join the DHT and to open an inference stream
    ban_timeout: float = 15.0  # seconds to avoid a peer after it fails (doubles on repeated failures)
    max_retries: Optional[int] = 6  # attempts to replace a failed span before giving up on a step; None: keep trying
    update_period: float = 30.0  # seconds between refreshes of the swarm view
    ping_period: float = 30.0  # seconds between round-trip measurements of one server
    ping_timeout: float = 2.0  # a server slower than this to answer a ping counts as this slow
    default_rtt: float = 0.1  # round trip assumed for servers not measured yet
    use_push: bool = True  # servers send their outputs straight to the next server of an inference chain
    multiplex: bool = True  # the steps of all inference sessions on a server share one stream and message per round
    spot_check: float = 0.0  # fraction of forward calls and inference steps re-run on another server to compare
    spot_check_ban: float = 3600.0  # seconds to avoid a server whose output a spot check found wrong
    num_chains: int = 1  # forward/backward: split a batch over up to this many different chains at once
    active_adapter: Optional[str] = None  # a server-hosted adapter (run_server --adapters) to run with
    wire: Optional[str] = None  # inference hidden states on the wire: float32, float16, bfloat16 or int8 (8-bit
    # blocks); None = as computed (the model's dtype: exact)
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",)  # where the client's p2p daemon listens
    allowed_servers: Optional[Collection[str]] = None  # peer ids: route only through these (None = any server)
    blocked_servers: Collection[str] = ()  # peer ids never to route through
    show_route: bool | str = False  # print each chain (True, or "inference" for inference sessions only)

    def __post_init__(self) -> None:
        if not 0 <= self.spot_check <= 1:
            raise ValueError(f"spot_check must be a fraction in [0, 1], got {self.spot_check}")
        if self.max_retries is None:  # Petals' "retry forever": a count no session reaches
            self.max_retries = UNLIMITED_RETRIES
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0 or None, got {self.max_retries}")
        if self.show_route not in (True, False, "inference"):
            raise ValueError(f"show_route must be True, False or 'inference', got {self.show_route!r}")
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
    model: str | Path  # checkpoint folder or Hugging Face hub name (only the span's shards are fetched: models/hub.py)
    initial_peers: Sequence[str] = flag((), "multiaddrs of any peer of the swarm; none starts a new swarm", nargs="*")
    block_indices: Optional[str] = flag(None, "serve exactly these blocks, e.g. 0:8 (turns moving off)", group="span")
    num_blocks: Optional[int] = flag(None, "serve this many blocks where the swarm needs them most", type=int, group="span")
    dht_prefix: Optional[str] = flag(None, "the model's name in the swarm (default: from the checkpoint name)")
    revision: Optional[str] = flag(None, "branch, tag or commit of a hub MODEL (default: main)")
    token: Optional[str] = flag(
        None, "hub access token for a private or gated MODEL (default: HF_TOKEN or `hf auth login`'s)", secret=True
    )
    cache_dir: Optional[str] = flag(None, "hub cache folder for a hub MODEL (default: HF_HUB_CACHE, ~/.cache/huggingface/hub)")
    # where to listen and what to announce: run_server's network flags (utils/cli.add_network_flags, dht/reach.py)
    host_maddrs: Optional[Sequence[str]] = None  # None = every interface on `port`
    announce_maddrs: Sequence[str] = ()  # what to announce instead of the interfaces' addresses
    port: int = 0  # TCP and UDP port when host_maddrs is None; 0 = a free one
    public_ip: Optional[str] = None  # announce this address (e.g. a router's, with the port forwarded to this host)
    force_reachability: Optional[str] = None  # "public" / "private" instead of asking peers to dial back
    relay_limits: Optional[RelayLimits] = field(default_factory=RelayLimits)  # relay for NATed servers; None = never
    max_relays: int = 2  # relays to hold slots on when behind NAT (0: none: nobody can reach this server)
    reachability_period: float = 600.0  # seconds between dial-back checks after the one at start
    identity_path: Optional[str] = flag(None, "private key file: a stable peer id across restarts")
    device: str = flag("cpu", "cpu, cuda, cuda:1, ...")
    torch_dtype: str = flag("auto", "auto = the checkpoint's dtype", choices=["auto", "float32", "float16", "bfloat16"])
    quant_type: str = flag(
        "none",
        "weights in 8-bit rows, 4-bit groups or NF4 blocks (docs/quantization.md)",
        choices=["none", "int8", "int4", "nf4"],
    )
    offload_experts: Optional[float] = flag(
        None,
        "MoE models: keep this fraction of the span's experts resident, read the rest from the checkpoint on demand "
        "(docs/models.md)",
        type=float,
    )
    num_threads: Optional[int] = flag(None, "torch threads for block math (default: torch's)", type=int)
    throughput: str | float = flag(
        "auto", "auto (measure once, cached on disk), eval (re-measure) or the block-steps/s to announce", type=parse_throughput
    )
    network_mbps: float = flag(100.0, "uplink in Mbit/s, a cap on the derived throughput (server/throughput.py)")
    balance_period: float = flag(
        120.0, "mean seconds between re-balancing checks (randomized x0.5..1.5; 0 = never move)", group="balancing"
    )
    balance_quality: float = flag(
        0.75, "move only if the swarm's bottleneck gains more than (1 - this) x our throughput", group="balancing"
    )
    join_delay: float = 1.0  # a random wait of up to this many seconds before choosing blocks on join
    kv_cache_tokens: Optional[int] = flag(
        None, "KV pool size in tokens, for all sessions together (default: a quarter of free memory)", type=int
    )
    page_size: int = flag(16, "tokens per KV page (also the granularity of prefix reuse)")
    max_alloc_timeout: float = flag(1.0, "seconds a step waits for free KV pages before a retriable error")
    token_budget: int = flag(256, "tokens per batched iteration; longer prompts run in chunks")
    prefill_chunk: int = flag(16, "prompt tokens per iteration while other sessions decode (their latency)")
    batch_gather_wait: float = 0.02  # seconds to wait for sessions of the last batch before a smaller one
    share_prefix_cache: bool = flag(False, "reuse cached prefix pages across clients: trusts clients' claimed page hashes")
    max_session_length: int = flag(8192, "largest max_length of an inference session, in tokens", group="limits")
    max_sessions_per_peer: int = flag(128, "inference sessions one client (peer id) may hold open at once", group="limits")
    max_cache_share: float = flag(
        0.5, "share of the KV pool one client may hold while other clients hold sessions too (alone: all)", group="limits"
    )
    max_batch_size: int = flag(64, "sequences in one request", group="limits")
    max_request_tokens: int = flag(16384, "batch x new tokens in one request", group="limits")
    max_message_bytes: int = flag(256 * 1024**2, "bytes of one assembled request (all its parts)", group="limits")
    wire_formats: Sequence[str] = flag(
        WIRE_FORMATS,
        "formats clients may choose for hidden states on the wire (int8: 8-bit blocks)",
        nargs="+",
        choices=WIRE_FORMATS,
    )
    push_timeout: float = 5.0  # seconds for the next server to accept a pushed step before the client relays it
    max_part_bytes: int = DEFAULT_MAX_PART_BYTES
    announce_period: float = flag(30.0, "seconds between re-announcements")
    expiration: float = flag(90.0, "seconds a record lives unless re-announced")
    session_idle_timeout: float = flag(600.0, "seconds an inference session may stay silent before it is closed", group="limits")
    request_timeout: float = flag(600.0, "seconds a forward/backward call may wait in the queue and run", group="limits")
    public_name: str = flag("", "a name shown on the swarm dashboard")
    adapters: Sequence[str] = flag(
        (), "PEFT LoRA folders to serve (named by folder, or NAME=PATH); clients pick one by name", nargs="*", group="adapters"
    )
    max_lora_rank: int = flag(64, "largest rank of the LoRA weights a client may send", group="adapters")
    max_adapter_bytes: int = flag(256 * 1024**2, "bytes of LoRA weights kept for one client", group="adapters")
    adapter_idle_timeout: float = flag(600.0, "seconds a client's LoRA weights are kept without use", group="adapters")
    progress: bool = True  # progress bar while loading blocks (run_server --no_progress)

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

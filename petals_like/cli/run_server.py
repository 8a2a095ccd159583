"""python -m petals_like.cli.run_server MODEL: host a span of MODEL's blocks in the swarm."""

from __future__ import annotations

import argparse
import logging

from petals_like.config import WIRE_FORMATS, ServerConfig
from petals_like.utils.cli import (
    add_config_flags,
    add_network_flags,
    config_values,
    network_values,
    setup_logging,
    wait_for_stop_signal,
)

logger = logging.getLogger(__name__)


LIMITS = [  # ServerConfig fields given as flags: (field, help)
    ("max_session_length", "largest max_length of an inference session, in tokens"),
    ("max_batch_size", "sequences in one request"),
    ("max_request_tokens", "batch x new tokens in one request"),
    ("max_message_bytes", "bytes of one assembled request (all its parts)"),
    ("max_sessions_per_peer", "inference sessions one client (peer id) may hold open at once"),
    (
        "max_cache_share",
        "share of the KV pool one client may hold while other clients hold sessions too (alone it may use all of it)",
    ),
    ("session_idle_timeout", "seconds an inference session may stay silent before it is closed"),
    ("request_timeout", "seconds a forward/backward call may wait and run"),
]


def _throughput(text: str) -> str | float:
    if text in ("auto", "eval"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, eval or a positive number, got {text!r}") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"throughput must be positive, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, str]:
    defaults = ServerConfig(model="")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", help="checkpoint folder or Hugging Face name present in the local cache")
    span = p.add_mutually_exclusive_group()
    span.add_argument("--block_indices", help="serve exactly these blocks, e.g. 0:8 (turns moving off)")
    span.add_argument("--num_blocks", type=int, help="serve this many blocks where the swarm needs them most")
    p.add_argument("--initial_peers", nargs="*", default=[], help="multiaddrs of any peer of the swarm")
    p.add_argument("--identity_path", help="private key file for a stable peer id")
    p.add_argument("--dht_prefix", help="the model's name in the swarm (default: from the checkpoint name)")
    p.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--torch_dtype", default=defaults.torch_dtype, choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--quant_type", default=defaults.quant_type, choices=["none", "int8", "nf4"])
    p.add_argument(
        "--throughput",
        type=_throughput,
        default=defaults.throughput,
        help="auto (measure once, cached on disk), eval (re-measure) or the block-steps/s to announce",
    )
    p.add_argument(
        "--network_mbps", type=float, default=defaults.network_mbps, help="uplink in Mbit/s, a cap on the derived throughput"
    )
    p.add_argument(
        "--kv_cache_tokens",
        type=int,
        default=defaults.kv_cache_tokens,
        help="KV pool size in tokens, for all sessions together (default: a quarter of free memory)",
    )
    p.add_argument("--page_size", type=int, default=defaults.page_size, help="tokens per KV page")
    p.add_argument(
        "--max_alloc_timeout",
        type=float,
        default=defaults.max_alloc_timeout,
        help="seconds a step waits for free KV pages before a retriable error",
    )
    p.add_argument(
        "--token_budget",
        type=int,
        default=defaults.token_budget,
        help="tokens per batched iteration; longer prompts run in chunks",
    )
    p.add_argument(
        "--prefill_chunk",
        type=int,
        default=defaults.prefill_chunk,
        help="prompt tokens per iteration while other sessions decode",
    )
    p.add_argument(
        "--wire_formats",
        nargs="+",
        default=list(defaults.wire_formats),
        choices=list(WIRE_FORMATS),
        help="formats clients may choose for hidden states on the wire (int8: 8-bit blocks)",
    )
    p.add_argument(
        "--share_prefix_cache",
        action="store_true",
        help="reuse cached prefix pages across clients: trusts clients' claimed page hashes",
    )
    add_config_flags(
        p.add_argument_group("limits (a request or client over one gets a clear error; others are served)"), defaults, LIMITS
    )
    p.add_argument("--num_threads", type=int, default=None, help="torch threads for block math")
    p.add_argument(
        "--balance_period",
        type=float,
        default=defaults.balance_period,
        help="mean seconds between re-balancing checks (0 = never move)",
    )
    p.add_argument(
        "--balance_quality",
        type=float,
        default=defaults.balance_quality,
        help="move only if the swarm's bottleneck gains more than (1 - this) x our throughput",
    )
    p.add_argument("--announce_period", type=float, default=defaults.announce_period)
    p.add_argument("--expiration", type=float, default=defaults.expiration)
    p.add_argument("--public_name", default="", help="a name shown on the swarm dashboard")
    p.add_argument(
        "--adapters",
        nargs="*",
        default=[],
        help="PEFT LoRA folders to serve (named by folder, or NAME=PATH); clients pick one by name",
    )
    p.add_argument(
        "--max_lora_rank", type=int, default=defaults.max_lora_rank, help="largest rank of the LoRA weights a client may send"
    )
    p.add_argument(
        "--max_adapter_bytes", type=int, default=defaults.max_adapter_bytes, help="bytes of LoRA weights kept for one client"
    )
    p.add_argument(
        "--adapter_idle_timeout",
        type=float,
        default=defaults.adapter_idle_timeout,
        help="seconds a client's LoRA weights are kept without use",
    )
    add_network_flags(p)
    p.add_argument("--no_progress", action="store_true", help="no progress bar while loading")
    p.add_argument("--log_level", default="INFO")
    a = p.parse_args(argv)
    config = ServerConfig(
        model=a.model,
        initial_peers=a.initial_peers,
        block_indices=a.block_indices,
        num_blocks=a.num_blocks,
        dht_prefix=a.dht_prefix,
        **network_values(a),
        identity_path=a.identity_path,
        device=a.device,
        torch_dtype=a.torch_dtype,
        quant_type=a.quant_type,
        num_threads=a.num_threads,
        throughput=a.throughput,
        network_mbps=a.network_mbps,
        kv_cache_tokens=a.kv_cache_tokens,
        page_size=a.page_size,
        max_alloc_timeout=a.max_alloc_timeout,
        token_budget=a.token_budget,
        share_prefix_cache=a.share_prefix_cache,
        prefill_chunk=a.prefill_chunk,
        **config_values(a, LIMITS),
        announce_period=a.announce_period,
        expiration=a.expiration,
        public_name=a.public_name,
        balance_period=a.balance_period,
        balance_quality=a.balance_quality,
        wire_formats=tuple(a.wire_formats),
        progress=not a.no_progress,
        adapters=tuple(a.adapters),
        max_lora_rank=a.max_lora_rank,
        max_adapter_bytes=a.max_adapter_bytes,
        adapter_idle_timeout=a.adapter_idle_timeout,
    )
    return config, a.log_level


def main(argv: list[str] | None = None) -> None:
    config, log_level = parse_args(argv)
    setup_logging(log_level)
    from petals_like.server.server import Server
    from petals_like.utils.threads import serial_thread

    serial_thread()  # this thread only waits; the scheduler's thread computes (utils/threads.py)
    server = Server(config).start()
    server.node.call_soon(serial_thread)  # so does the event loop: it decodes messages and routes them
    print(f"SERVER READY {server.node.peer_id} blocks {server.start_block}:{server.end_block}", flush=True)
    try:
        signum = wait_for_stop_signal()
        logger.info(f"Received signal {signum}, leaving the swarm")
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()

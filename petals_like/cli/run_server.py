"""python -m petals_like.cli.run_server MODEL: host a span of MODEL's blocks in the swarm."""

from __future__ import annotations

import argparse
import logging

from petals_like.cli.petals_flags import HelpFormatter, add_petals_flags, apply_petals_flags
from petals_like.config import ServerConfig
from petals_like.utils.cli import (
    add_dataclass_flags,
    add_network_flags,
    dataclass_values,
    network_values,
    setup_logging,
    wait_for_stop_signal,
)

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, str]:
    """Every flag but the network ones comes from a ServerConfig field declared with config.flag();
    Petals' names for them are accepted too (cli/petals_flags.py)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # optional only so that Petals' --converted_model_name_or_path can stand for it; one of them is required
    p.add_argument("model", nargs="?", help="checkpoint folder or Hugging Face hub name (only the span's shards are fetched)")
    add_dataclass_flags(p, ServerConfig)
    add_network_flags(p)
    p.add_argument("--no_progress", action="store_true", help="no progress bars while fetching and loading the span")
    p.add_argument("--log_level", default="INFO")
    add_petals_flags(p)
    a = p.parse_args(argv)
    apply_petals_flags(p, a)
    if a.model is None:
        p.error("the following arguments are required: model (or --converted_model_name_or_path)")
    values = dataclass_values(a, ServerConfig)
    try:
        config = ServerConfig(model=a.model, **values, **network_values(a), progress=not a.no_progress)
    except ValueError as e:  # flags that are fine alone but not together, e.g. --announce_period >= --expiration
        p.error(str(e))
    return config, a.log_level


def main(argv: list[str] | None = None) -> None:
    config, log_level = parse_args(argv)
    setup_logging(log_level)
    from petals_like.models.hub import HubError
    from petals_like.quant.weights import UnsupportedFormat
    from petals_like.server.server import Server
    from petals_like.utils.threads import serial_thread

    serial_thread()  # this thread only waits; the scheduler's thread computes (utils/threads.py)
    try:
        server = Server(config).start()
    except (UnsupportedFormat, HubError, FileNotFoundError) as e:  # FileNotFoundError: no such checkpoint
        raise SystemExit(f"error: {e}") from None
    server.node.call_soon(serial_thread)  # so does the event loop: it decodes messages and routes them
    print(f"SERVER READY {server.node.peer_id} blocks {server.start_block}:{server.end_block}", flush=True)
    try:
        signum = wait_for_stop_signal()
        logger.info(f"Received signal {signum}, leaving the swarm")
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()

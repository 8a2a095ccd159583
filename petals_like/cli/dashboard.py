"""python -m petals_like.cli.dashboard --initial_peers ...: the swarm health dashboard as a web page.

Reads the swarm every --refresh_period seconds (the DHT records of every model, and a short
rpc_info call to each online server) and serves the page at /, JSON at /api/v1/state and
Prometheus metrics at /metrics.
"""

from __future__ import annotations

import argparse
import logging
import threading

from petals_like.utils.cli import setup_logging, wait_for_stop_signal

logger = logging.getLogger(__name__)


def add_swarm_args(parser: argparse.ArgumentParser) -> None:
    """The options the dashboard and the terminal view share: which swarm, which models, how to probe."""
    parser.add_argument("--initial_peers", nargs="+", required=True, help="multiaddrs of any peer of the swarm")
    parser.add_argument(
        "--models",
        nargs="*",
        default=[],
        metavar="DHT_PREFIX:NUM_BLOCKS",
        help="watch these models even if they do not announce themselves",
    )
    parser.add_argument(
        "--no_discover", action="store_true", help="watch only the --models, not every model announced in the swarm"
    )
    parser.add_argument(
        "--rpc_timeout", type=float, default=3.0, help="seconds a server has to answer rpc_info before it is shown unreachable"
    )
    parser.add_argument("--host_maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"], help="where this tool's p2p daemon listens")
    parser.add_argument("--log_level", default="WARNING")


def make_reader(args: argparse.Namespace):
    """A SwarmNode (client mode) and a SwarmReader for the parsed swarm options; the caller shuts the node down."""
    from petals_like.dashboard.reader import SwarmReader, parse_model_arg
    from petals_like.dht.node import SwarmNode

    models = dict(parse_model_arg(text) for text in args.models)
    node = SwarmNode(args.initial_peers, host_maddrs=args.host_maddrs, client_mode=True, name="dashboard")
    try:
        return node, SwarmReader(node, models=models, discover=not args.no_discover, rpc_timeout=args.rpc_timeout)
    except BaseException:
        node.shutdown()
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_swarm_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on (0.0.0.0 for everyone)")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (0 = any free port)")
    parser.add_argument("--refresh_period", type=float, default=10.0, help="seconds between reads of the swarm")
    parser.add_argument("--history_points", type=int, default=2880, help="reads kept for the chart")
    args = parser.parse_args(argv)
    if args.refresh_period <= 0:
        parser.error("--refresh_period must be positive")
    setup_logging(args.log_level)

    from petals_like.dashboard.history import History
    from petals_like.dashboard.service import DashboardService
    from petals_like.dashboard.web import DashboardHTTPServer

    try:
        node, reader = make_reader(args)
    except ValueError as e:
        parser.error(str(e))
    service = http = None
    try:
        service = DashboardService(
            reader.read, refresh_period=args.refresh_period, history=History(max_points=args.history_points)
        ).start()
        http = DashboardHTTPServer((args.host, args.port), service)
        threading.Thread(target=http.serve_forever, name="dashboard-http", daemon=True).start()
        print(f"Dashboard: {http.url}", flush=True)
        signum = wait_for_stop_signal()
        logger.info(f"Received signal {signum}, stopping")
    finally:
        if http is not None:
            http.shutdown()
            http.server_close()
        if service is not None:
            service.stop()
        node.shutdown()


if __name__ == "__main__":
    main()

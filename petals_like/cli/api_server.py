"""python -m petals_like.cli.api_server MODEL --initial_peers ...: an OpenAI-compatible API over the swarm.

python -m petals_like.cli.api_server ./tiny-llama --initial_peers /ip4/127.0.0.1/tcp/31337/p2p/Qm... --port 8000
# then any OpenAI client: base_url="http://127.0.0.1:8000/v1"
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

from petals_like.utils.cli import setup_logging

logger = logging.getLogger(__name__)


def build(model_path: str, initial_peers: list[str], *, name: Optional[str] = None, api_key: Optional[str] = None, **client):
    """(app, model): the API app over a client of the swarm; the caller shuts the model down."""
    from transformers import AutoTokenizer

    from petals_like import AutoDistributedModelForCausalLM
    from petals_like.api.app import create_app
    from petals_like.api.engine import CompletionEngine

    model = AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers, **client)  # fetches the tokenizer too
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.checkpoint_path)
        engine = CompletionEngine(model, tokenizer, max_context=model.config.max_position_embeddings)
        app = create_app(engine, name or str(model_path), api_key=api_key, route_of=lambda: _route(model))
        return app, model
    except BaseException:
        model.shutdown()
        raise


def _route(model) -> list[dict]:
    """The servers of the model's latest inference chain."""
    return [
        {"peer_id": span.peer_id, "start": span.start, "end": span.end} for span in model.routes.last_routes.get("inference", [])
    ]


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint folder or Hugging Face name present in the local cache (tokenizer included)")
    p.add_argument("--initial_peers", nargs="+", required=True, help="multiaddrs of any peer of the swarm")
    p.add_argument("--host", default="127.0.0.1", help="where to listen (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model_name", default=None, help="the model's id in the API (default: MODEL as given)")
    p.add_argument(
        "--api_key",
        default=os.environ.get("PETALS_LIKE_API_KEY"),
        help="require this bearer key (default: $PETALS_LIKE_API_KEY; none: open)",
    )
    p.add_argument("--torch_dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--log_level", default="INFO")
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("the API server needs FastAPI and uvicorn: pip install 'petals_like[api]'") from None
    app, model = build(args.model, args.initial_peers, name=args.model_name, api_key=args.api_key, torch_dtype=args.torch_dtype)
    try:
        print(f"API READY http://{args.host}:{args.port}/v1 model {args.model_name or args.model}", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        model.shutdown()


if __name__ == "__main__":
    main()

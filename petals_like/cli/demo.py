"""python -m petals_like.cli.demo: a whole swarm on this machine, end to end.

Creates a tiny random Llama checkpoint, starts a DHT and two servers (blocks 0:4 and 4:8) as
separate processes, generates text through them, checks it against local transformers, prints
tokens/s, and stops every process it started (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

SPANS = ("0:4", "4:8")  # blocks of the two servers


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=None, help="where to write the tiny checkpoint (default: a temp dir)")
    parser.add_argument("--prompt", default="A swarm of small servers")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the prompt's and the output's token ids here")
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C stops the swarm, also where the demo was started as a background job of a script
        # (which starts it with SIGINT ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if "torch" not in sys.modules:
        # This process generates on the cores the servers compute on, so its idle OpenMP threads
        # should sleep, as theirs do (utils.threads.shared_cores_env). libgomp reads the policy
        # once, when torch loads: it is set before anything here imports torch. Measured over six
        # runs: 39-50 tokens/s, against 31-43 over five with this process spinning.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from petals_like.models.tiny import make_tiny_model
    from petals_like.testing.local_swarm import LocalSwarm
    from petals_like.utils.cli import setup_logging

    setup_logging("WARNING")
    result = None
    with tempfile.TemporaryDirectory(prefix="petals_like_demo_") as tmp:
        model_dir = Path(args.model_dir or Path(tmp) / "tiny-llama")
        swarm = LocalSwarm(model_dir, SPANS, start_timeout=120, on_ready=lambda line: print("      " + line, flush=True))
        try:
            print(f"[1/4] Creating a tiny Llama checkpoint in {model_dir}", flush=True)
            make_tiny_model(model_dir, family="llama", preset="tiny")

            print("[2/4] Starting a DHT and two servers (blocks 0:4 and 4:8) on 127.0.0.1", flush=True)
            swarm.start()

            print("[3/4] Generating through the swarm", flush=True)
            result = run_client(model_dir, swarm.peers, args.prompt, args.max_new_tokens)
            if args.json is not None:
                args.json.write_text(json.dumps(result))
        except KeyboardInterrupt:
            print("\nInterrupted", flush=True)
            _forget_interrupt()
        finally:
            print("[4/4] Stopping the swarm", flush=True)
            swarm.stop()
    if result is not None and not result["equal_to_transformers"]:
        sys.exit("The swarm's output differs from local transformers generate(): please report this as a bug")


def _forget_interrupt() -> None:
    """Let a handled Ctrl-C end the demo with exit code 0.

    CPython (3.11) marks a KeyboardInterrupt that leaves code run by exec() of a string as unhandled,
    and at exit kills the process with SIGINT, even once the demo has caught it. Such code runs while
    the client's libraries load (scipy's array API layer imports numpy with exec()), where Ctrl-C
    often lands: about 1 run in 20 of a script that catches Ctrl-C during those imports ended with
    SIGINT. Running any string with exec() clears the mark."""
    exec("None")


def run_client(model_dir: Path, peers: list[str], prompt: str, max_new_tokens: int) -> dict:
    """Generate greedily through the swarm, print it, and compare it with local transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from petals_like import AutoDistributedModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = None
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=peers)
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        model.generate(input_ids, max_new_tokens=2)  # warm-up: routes found, streams opened once
        started = time.perf_counter()
        output = model.generate(input_ids, max_new_tokens=max_new_tokens)
        elapsed = time.perf_counter() - started
        new_tokens = output.shape[1] - input_ids.shape[1]
        print(f"      prompt: {prompt!r}")
        print(f"      output: {tokenizer.decode(output[0, input_ids.shape[1] :])!r}")
        print(f"      {new_tokens} tokens in {elapsed:.2f} s = {new_tokens / elapsed:.1f} tokens/s")
        local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        reference = local.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
        same = torch.equal(reference[0, : output.shape[1]], output[0])
        print(f"      equal to local transformers generate(): {'yes' if same else 'NO'}")
        return {
            "prompt_ids": input_ids[0].tolist(),
            "output_ids": output[0].tolist(),
            "tokens_per_s": new_tokens / elapsed,
            "equal_to_transformers": same,
        }
    finally:
        if model is not None:
            model.shutdown()


if __name__ == "__main__":
    main()

"""python -m petals_like.cli.demo: a whole swarm on this machine, end to end.

Uses the small Llama trained on Python's standard library when this machine has built it
(`python -m petals_like.cli.make_tiny_model --trained`, ~13 minutes once), else creates a tiny
random Llama checkpoint; starts a DHT and two servers (each half of the blocks) as separate
processes, generates text through them, checks it against local transformers, prints tokens/s, and
stops every process it started (also on Ctrl-C).
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
from typing import Any, Optional

RANDOM_PROMPT = "A swarm of small servers"
TRAINED_PROMPT = "def "
# a small model's greedy text soon loops ("the the the"); transformers' penalty, which the swarm's
# generate() applies as transformers' does, so the output is still compared token for token
TRAINED_REPETITION_PENALTY = 1.3


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        choices=("auto", "trained", "random"),
        default="auto",
        help="trained: the model trained on Python's standard library; random: a tiny random-weight one; "
        "auto: trained when it is built and --model_dir is not given (default: %(default)s)",
    )
    parser.add_argument(
        "--model_dir",
        default=None,
        help="where to write the random checkpoint (default: a temp dir), or with --model trained where the trained "
        "one is (default: the cache make_tiny_model --trained builds)",
    )
    parser.add_argument("--prompt", default=None, help=f"default: {TRAINED_PROMPT!r}, or {RANDOM_PROMPT!r} for the random model")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default: 48 for the trained model, else 32")
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
    from petals_like.models.trained import default_trained_path, read_training_record
    from petals_like.testing.local_swarm import LocalSwarm
    from petals_like.utils.cli import setup_logging

    trained_dir = Path(args.model_dir) if args.model == "trained" and args.model_dir else default_trained_path()
    record = read_training_record(trained_dir)
    trained = args.model == "trained" or (args.model == "auto" and args.model_dir is None and record is not None)
    if trained and record is None:
        build = "python -m petals_like.cli.make_tiny_model --trained" + (f" {trained_dir}" if args.model_dir else "")
        parser.error(f"no trained model in {trained_dir}: build it with `{build}`")
    prompt = args.prompt if args.prompt is not None else TRAINED_PROMPT if trained else RANDOM_PROMPT
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else 48 if trained else 32

    setup_logging("WARNING")
    result = None
    with tempfile.TemporaryDirectory(prefix="petals_like_demo_") as tmp:
        model_dir = trained_dir if trained else Path(args.model_dir or Path(tmp) / "tiny-llama")
        num_blocks = record["recipe"]["num_hidden_layers"] if trained else 8  # the tiny preset's 8
        spans = (f"0:{num_blocks // 2}", f"{num_blocks // 2}:{num_blocks}")
        swarm = LocalSwarm(model_dir, spans, start_timeout=120, on_ready=lambda line: print("      " + line, flush=True))
        try:
            if trained:
                print(f"[1/4] Using the Llama trained on Python's standard library in {model_dir}", flush=True)
                print(f"      validation perplexity {record['validation_perplexity']:.1f} on held-out files", flush=True)
            else:
                print(f"[1/4] Creating a tiny random Llama checkpoint in {model_dir}", flush=True)
                make_tiny_model(model_dir, family="llama", preset="tiny")
                if args.model == "auto":
                    print(
                        "      its output is noise; `python -m petals_like.cli.make_tiny_model --trained` trains a small "
                        "Llama (~13 min, once) that the demo then uses",
                        flush=True,
                    )

            print(f"[2/4] Starting a DHT and two servers (blocks {spans[0]} and {spans[1]}) on 127.0.0.1", flush=True)
            swarm.start()

            print("[3/4] Generating through the swarm", flush=True)
            options = {"repetition_penalty": TRAINED_REPETITION_PENALTY} if trained else {}
            result = run_client(model_dir, swarm.peers, prompt, max_new_tokens, as_text=trained, **options)
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


def run_client(
    model_dir: Path, peers: list[str], prompt: str, max_new_tokens: int, *, as_text: bool = False, **options: Any
) -> dict:
    """Generate greedily through the swarm, print it, and compare it with local transformers.

    as_text: print the prompt and its continuation as indented lines (code from the trained model),
    rather than as a quoted string (which keeps a random model's control characters visible).
    options: generation options for both, e.g. repetition_penalty."""
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
        output = model.generate(input_ids, max_new_tokens=max_new_tokens, **options)
        elapsed = time.perf_counter() - started
        new_tokens = output.shape[1] - input_ids.shape[1]
        continuation = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=as_text)
        if as_text:
            print(f"      prompt {prompt!r}, continued greedily{' with ' + str(options) if options else ''}:")
            print("\n".join("      | " + line for line in (prompt + continuation).splitlines()))
        else:
            print(f"      prompt: {prompt!r}")
            print(f"      output: {continuation!r}")
        print(f"      {new_tokens} tokens in {elapsed:.2f} s = {new_tokens / elapsed:.1f} tokens/s")
        local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        reference = local.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, **options)
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

"""A client of the swarm for the network test bed: runs one task inside a host's namespace, prints JSON.

    python -m petals_like.testing.netbed_worker generate MODEL --initial_peers ... --max_new_tokens 16
    python -m petals_like.testing.netbed_worker lora MODEL --initial_peers ... --out DIR
    python -m petals_like.testing.netbed_worker relay_info MODEL --initial_peers ... --relay PEER_MULTIADDR

Every task ends with one line "RESULT {json}" (tokens, or where the gradients were saved, and how the
client reached the servers: which went through relays). `generate --step_pause S` prints "STEP k" after
each token and waits S seconds, so that a test can break something in the middle of a session.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from petals_like.utils.cli import setup_logging

PROMPT = [1, 15, 27, 300, 42, 7, 99, 120]  # token ids; the tiny test models know 512


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model")
    common.add_argument("--initial_peers", nargs="+", required=True)
    common.add_argument("--log_level", default="WARNING")
    common.add_argument("--request_timeout", type=float, default=60.0)
    common.add_argument("--connect_timeout", type=float, default=15.0)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = p.add_subparsers(dest="task", required=True)
    g = tasks.add_parser("generate", parents=[common])
    g.add_argument("--max_new_tokens", type=int, default=16)
    g.add_argument("--step_pause", type=float, default=0.0)
    g.add_argument("--wire", default=None)
    g.add_argument("--prompt_len", type=int, default=len(PROMPT))
    lora = tasks.add_parser("lora", parents=[common])
    lora.add_argument("--out", required=True)
    call = tasks.add_parser("call_info", parents=[common])  # rpc_info of one server, as routing would reach it
    call.add_argument("--peer", required=True)
    info = tasks.add_parser("relay_info", parents=[common])
    info.add_argument("--relay", required=True)
    a = p.parse_args(argv)
    setup_logging(a.log_level)

    if a.task == "relay_info":
        print("RESULT " + json.dumps(_relay_info(a.initial_peers, a.relay)), flush=True)
        return

    from petals_like import AutoDistributedModelForCausalLM

    kwargs = dict(request_timeout=a.request_timeout, connect_timeout=a.connect_timeout)
    if a.task == "generate" and a.wire:
        kwargs["wire"] = a.wire
    model = AutoDistributedModelForCausalLM.from_pretrained(a.model, a.initial_peers, torch_dtype="float32", **kwargs)
    try:
        if a.task == "call_info":
            result = _call_info(model, a.peer, a.request_timeout)
        else:
            result = _generate(model, a) if a.task == "generate" else _lora(model, a.out)
        result["relayed_calls"] = dict(model.node.routes.relayed_calls)
        result["ban_reasons"] = dict(model.routes.ban_reasons)
        result["using_relay"] = {peer: span.server_info.using_relay for peer, span in model.routes.spans.items()}
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        model.shutdown()


def _prompt(length: int) -> torch.Tensor:
    ids = (PROMPT * (length // len(PROMPT) + 1))[:length]
    return torch.tensor([ids])


def _generate(model, a: argparse.Namespace) -> dict:
    input_ids = _prompt(a.prompt_len)
    tokens: list[int] = []
    step_seconds: list[float] = []
    with model.inference_session(max_length=a.prompt_len + a.max_new_tokens) as session:
        started = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=1, session=session)
        prefill = time.perf_counter() - started
        tokens.append(int(out[0, -1]))
        print("STEP 1", flush=True)
        for step in range(2, a.max_new_tokens + 1):
            time.sleep(a.step_pause)
            started = time.perf_counter()
            out = model.generate(None, max_new_tokens=1, session=session)
            step_seconds.append(time.perf_counter() - started)
            tokens.append(int(out[0, -1]))
            print(f"STEP {step}", flush=True)
        peers = [link.span.peer_id for link in session._chain]
    return {"prompt": input_ids[0].tolist(), "tokens": tokens, "prefill_s": prefill, "step_s": step_seconds, "chain": peers}


def _lora(model, out: str) -> dict:
    from pathlib import Path

    import peft

    lora = model.add_lora(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # PEFT starts B at zero; random B makes every gradient non-trivial
        for name, weight in lora.weights.items():
            if name.endswith("_B"):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
    input_ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    output = model(input_ids, labels=input_ids)
    output.loss.backward()
    folder = Path(out)
    adapter = model.save_pretrained(folder / "adapter")
    torch.save({name: w.grad for name, w in lora.weights.items()}, folder / "grads.pt")
    torch.save(input_ids, folder / "input_ids.pt")
    return {"adapter": str(adapter), "loss": float(output.loss)}


def _call_info(model, peer: str, timeout: float) -> dict:
    from petals_like.wire import call_info

    model.node.run(model.routes.refresh(force=True), timeout=timeout)
    started = time.perf_counter()
    try:
        info = model.node.run(call_info(model.node.p2p, peer, timeout=timeout), timeout=timeout + 5)
        return {"info": sorted(info.to_meta()), "seconds": time.perf_counter() - started}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - started}


def _relay_info(initial_peers: list[str], relay: str) -> dict:
    from hivemind.p2p import PeerID

    from petals_like.dht.node import SwarmNode
    from petals_like.dht.reach import WireAddr
    from petals_like.dht.relay import relay_info

    node = SwarmNode(initial_peers, client_mode=True, name="relay-info")
    try:
        peer = PeerID.from_base58(relay.split("/p2p/")[-1])

        async def ask() -> dict:
            await node.p2p._client.connect(peer, [WireAddr(relay.split("/p2p/")[0])])
            return await relay_info(node.p2p, peer)

        return node.run(ask(), timeout=30)
    finally:
        node.shutdown()


if __name__ == "__main__":
    main()

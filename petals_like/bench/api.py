"""(o) The OpenAI-compatible API on the bench swarm, through the official `openai` client, against the
Python client in the same process and on the same swarm:

- one streaming chat vs one generate() with a streamer: tokens/s and time to first token;
- 16 concurrent streaming chats vs 16 concurrent generate() calls: aggregate tokens/s;
- a conversation's second turn (prompt ~1,000 tokens, of which the first turn's prompt and answer
  are cached on the servers) vs its first turn: time to first token.

Rounds alternate the two sides; medians are reported, with the per-round values.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import threading
import time
from typing import Callable

import torch

from petals_like.bench.harness import TokenTimer, run_concurrently


def _serve(model, model_dir):
    """The API app over the bench swarm's client, on uvicorn in a thread: (server, thread, base url)."""
    import uvicorn
    from transformers import AutoTokenizer

    from petals_like.api.app import create_app
    from petals_like.api.engine import CompletionEngine
    from petals_like.models.tiny import CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if getattr(tokenizer, "chat_template", None) is None:  # a bench model made before templates existed
        tokenizer.chat_template = CHAT_TEMPLATE
    app = create_app(CompletionEngine(model, tokenizer, model.config.max_position_embeddings), "bench")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start in 30 s")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, tokenizer, f"http://127.0.0.1:{port}/v1"


def _http_chat(client, messages: list[dict], max_tokens: int) -> dict:
    """One streaming chat: time to the first token's chunk (the API sends one per token, its content empty
    while the text is held back), tokens (usage), seconds in all."""
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model="bench",
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.role is None and first is None:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - started
    return {"first_token_s": first if first is not None else total, "tokens": tokens, "seconds": total}


def _python_chat(model, prompt_ids: list[int], max_tokens: int) -> dict:
    timer = TokenTimer()
    started = time.perf_counter()
    timer.started = started
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False, streamer=timer)
    total = time.perf_counter() - started
    first = timer.times[0] - started if timer.times else total
    return {"first_token_s": first, "tokens": out.shape[1] - len(prompt_ids), "seconds": total}


def _rate(run: dict) -> float:
    return run["tokens"] / run["seconds"]


def _median_of(runs: list[dict], fn: Callable[[dict], float]) -> float:
    return statistics.median(fn(r) for r in runs)


def _http_clients(url: str, conversations: list[list[dict]], max_tokens: int) -> tuple[list[dict], float]:
    """In the clients' process: one streaming chat per conversation, all at once, each on a thread of
    its own; (each chat's measurements, the wall seconds of all)."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    results: list = [None] * len(conversations)

    def chat(i: int) -> None:
        results[i] = _http_chat(client, conversations[i], max_tokens)

    seconds = run_concurrently(len(conversations), chat)
    return results, seconds


def _http_turns(url: str, history: str, rounds: int) -> list[dict]:
    """In the clients' process: per round, a new conversation's first turn and its second turn, whose
    prompt repeats the first turn's prompt and answer (cached on the servers): their times to first token."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    turns = []
    for r in range(rounds):
        conversation = [{"role": "user", "content": f"Round {r}. {history}"}]
        first = _http_chat(client, conversation, 16)
        answer = client.chat.completions.create(model="bench", messages=conversation, max_tokens=16, temperature=0)
        conversation += [
            {"role": "assistant", "content": answer.choices[0].message.content},
            {"role": "user", "content": "Go on."},
        ]
        second = _http_chat(client, conversation, 16)
        turns.append({"first_turn_ttft_s": first["first_token_s"], "second_turn_ttft_s": second["first_token_s"]})
    return turns


def api_vs_python(model, model_dir, rounds: int = 3, new_tokens: int = 64, sessions: int = 16) -> dict:
    """(o). The HTTP clients run in a process of their own, as users' programs would: in this one they
    would compete for the interpreter with the API server and the client model they measure."""
    import multiprocessing

    server, thread, tokenizer, url = _serve(model, model_dir)
    clients = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:

        def http(conversations: list[list[dict]], max_tokens: int) -> tuple[list[dict], float]:
            return clients.submit(_http_clients, url, conversations, max_tokens).result()

        def chat_ids(messages: list[dict]) -> list[int]:
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

        messages = [{"role": "user", "content": "Say something about swarms of servers."}]
        ids = chat_ids(messages)
        http([messages], 4)  # warm-up: the clients' process, routes found, the app's first request
        _python_chat(model, ids, 4)
        one = {"http": [], "python": []}
        many = {"http": [], "python": []}
        last_first = {"http": [], "python": []}  # when the last of the 16 got its first token
        for r in range(rounds):
            one["http"].append(http([messages], new_tokens)[0][0])
            one["python"].append(_python_chat(model, ids, new_tokens))
            # prompts of equal length, new to the servers on each side (none finds the other's in the prefix cache)
            prompts = {
                side: [
                    [{"role": "user", "content": f"Session {i} of round {r}, side {side}: say something."}]
                    for i in range(sessions)
                ]
                for side in "hp"
            }
            results, seconds = http(prompts["h"], new_tokens)
            many["http"].append(sum(x["tokens"] for x in results) / seconds)
            last_first["http"].append(max(x["first_token_s"] for x in results))
            results = [None] * sessions

            def python(i: int) -> None:
                results[i] = _python_chat(model, chat_ids(prompts["p"][i]), new_tokens)

            seconds = run_concurrently(sessions, python)
            many["python"].append(sum(x["tokens"] for x in results) / seconds)
            last_first["python"].append(max(x["first_token_s"] for x in results))

        # ~950 tokens of this byte-level vocabulary, or what the model's context allows for two turns
        history = "The swarm " * min(95, (model.config.max_position_embeddings - 160) // 20)
        turns = clients.submit(_http_turns, url, history, rounds).result()
        prompt_tokens = len(chat_ids([{"role": "user", "content": f"Round 0. {history}"}])) + 16 + 8
    finally:
        clients.shutdown()
        server.should_exit = True
        thread.join(30)

    http_rate, python_rate = _median_of(one["http"], _rate), _median_of(one["python"], _rate)
    http_ttft, python_ttft = (
        _median_of(one["http"], lambda r: r["first_token_s"]),
        _median_of(one["python"], lambda r: r["first_token_s"]),
    )
    first_ttft = statistics.median(t["first_turn_ttft_s"] for t in turns)
    second_ttft = statistics.median(t["second_turn_ttft_s"] for t in turns)
    return {
        "one_stream": {
            "http_tokens_per_s": round(http_rate, 2),
            "python_tokens_per_s": round(python_rate, 2),
            "ratio": round(http_rate / python_rate, 3),
            "http_first_token_ms": round(1000 * http_ttft, 1),
            "python_first_token_ms": round(1000 * python_ttft, 1),
            "first_token_extra_ms": round(1000 * (http_ttft - python_ttft), 1),
            "per_round_tokens_per_s": {side: [round(_rate(r), 2) for r in runs] for side, runs in one.items()},
        },
        f"{sessions}_streams": {
            "http_aggregate_tokens_per_s": round(statistics.median(many["http"]), 2),
            "python_aggregate_tokens_per_s": round(statistics.median(many["python"]), 2),
            "ratio": round(statistics.median(many["http"]) / statistics.median(many["python"]), 3),
            "last_first_token_ms": {side: round(1000 * statistics.median(values), 1) for side, values in last_first.items()},
            "per_round": {side: [round(x, 2) for x in values] for side, values in many.items()},
        },
        "second_turn": {
            "prompt_tokens_about": prompt_tokens,
            "first_turn_ttft_ms": round(1000 * first_ttft, 1),
            "second_turn_ttft_ms": round(1000 * second_ttft, 1),
            "ratio": round(second_ttft / first_ttft, 3),
            "per_round": turns,
        },
    }

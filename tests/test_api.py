"""The OpenAI-compatible API on a real swarm, through the official `openai` client: answers equal local
transformers with the same chat template, streaming or not; stop strings, seeds, n, logprobs, errors,
many streams at once, and a client that goes away mid-stream."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
import torch
import uvicorn
from transformers import AutoTokenizer

from petals_like.cli.api_server import build
from tests.swarm import Swarm, running_swarm, wait_until

KEY = "test-key"
NAME = "tiny-llama"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


class Served:
    """An app on uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 30, message="uvicorn started")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def swarm(tiny_model: Path) -> Iterator[Swarm]:
    with running_swarm(tiny_model, ["0:4", "4:8"]) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def api(swarm, tiny_model: Path):
    app, model = build(str(tiny_model), swarm.peers, name=NAME, api_key=KEY, torch_dtype="float32")
    served = Served(app)
    try:
        yield served, model
    finally:
        served.close()
        model.shutdown()


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api[0].url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def chat_ids(tokenizer, messages) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def greedy(reference, ids: list[int], max_new_tokens: int, **options) -> list[int]:
    out = reference.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, **options)
    return out[0, len(ids) :].tolist()


def text_of(tokenizer, new_ids: list[int]) -> str:
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def test_models_and_greedy_chat_equal_transformers(client, tokenizer, reference):
    assert [m.id for m in client.models.list().data] == [NAME]
    ids = chat_ids(tokenizer, MESSAGES)
    expected = greedy(reference, ids, 16)
    answer = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=16, temperature=0)
    assert answer.choices[0].message.content == text_of(tokenizer, expected)
    assert answer.choices[0].finish_reason == ("stop" if 2 in expected else "length")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), len(expected))

    stream = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        answer.choices[0].finish_reason
    ]
    assert chunks[-1].usage.completion_tokens == len(expected) and chunks[-1].choices == []


def test_text_completions_stream_and_not(client, tokenizer, reference):
    prompt = "The swarm"
    ids = tokenizer(prompt)["input_ids"]
    expected = text_of(tokenizer, greedy(reference, ids, 12))
    whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert whole.choices[0].text == expected
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    )
    assert streamed == expected


def test_stop_strings_cut_where_transformers_stops(client, tokenizer, reference):
    # a stop string of two printable ASCII characters, each a token of this byte-level tokenizer (id = 4 + byte)
    for prompt in ("A stop", "The swarm", "Hello", "abc def"):
        ids = tokenizer(prompt)["input_ids"]
        new = greedy(reference, ids, 20)
        k = next((k for k in range(3, len(new) - 1) if all(36 <= t <= 130 for t in new[k : k + 2])), None)
        if k is not None:
            break
    stop = tokenizer.decode(new[k : k + 2])
    assert len(stop) == 2 and len(tokenizer(stop, add_special_tokens=False)["input_ids"]) == 2
    stopped = greedy(reference, ids, 20, stop_strings=[stop], tokenizer=tokenizer)
    cut = text_of(tokenizer, stopped)
    assert cut.endswith(stop)
    for stream in (False, True):
        answer = client.completions.create(
            model=NAME, prompt=prompt, max_tokens=20, temperature=0, stop=[stop, "zzzz"], stream=stream
        )
        if stream:
            chunks = list(answer)
            text = "".join(c.choices[0].text for c in chunks)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            text, finish = answer.choices[0].text, [answer.choices[0].finish_reason]
            assert answer.usage.completion_tokens == len(stopped)
        assert text == cut[: -len(stop)] and finish == ["stop"]


def test_seed_makes_sampling_repeatable_and_n_gives_choices(client):
    def sample(seed: int) -> list[str]:
        answer = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=seed, n=3)
        assert [c.index for c in answer.choices] == [0, 1, 2]
        return [c.message.content for c in answer.choices]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_logprobs_equal_the_log_softmax_of_transformers_logits(client, tokenizer, reference):
    ids = chat_ids(tokenizer, MESSAGES)
    answer = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = answer.choices[0].logprobs.content
    new = greedy(reference, ids, 8)
    new = new[: new.index(2)] if 2 in new else new
    assert len(content) == len(new)
    with torch.no_grad():
        logits = reference(torch.tensor([ids + new])).logits[0, len(ids) - 1 : -1]
    want = torch.log_softmax(logits.float(), dim=-1)
    for step, (entry, token) in enumerate(zip(content, new)):
        assert entry.token == tokenizer.decode([token])
        assert abs(entry.logprob - float(want[step, token])) <= 1e-4
        assert [t.token for t in entry.top_logprobs] == [
            tokenizer.decode([i]) for i in torch.topk(want[step], 3).indices.tolist()
        ]


def test_bad_requests_get_openai_errors_and_the_server_serves_on(api, client, swarm, tiny_model: Path):
    served, _ = api
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw = httpx.post(f"{served.url}/chat/completions", content=b"{not json", headers=headers)
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="other", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x" * 5000, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url, api_key="wrong", max_retries=0).models.list()

    app, model = build(str(tiny_model), swarm.peers, name=NAME, torch_dtype="float32", allowed_servers=["QmNobody"])
    nowhere = Served(app)
    try:
        with pytest.raises(openai.InternalServerError) as e:
            openai.OpenAI(base_url=nowhere.url, api_key="x", max_retries=0).completions.create(
                model=NAME, prompt="hi", max_tokens=2
            )
        assert e.value.status_code == 503 and e.value.body["code"] == "swarm_unavailable"
    finally:
        nowhere.close()
        model.shutdown()
    assert client.completions.create(model=NAME, prompt="still here", max_tokens=3, temperature=0).choices[0].text is not None


def test_32_concurrent_streams_complete_and_are_batched(client, swarm, tokenizer, reference):
    prompts = [f"Stream {i}:" for i in range(32)]
    expected = [text_of(tokenizer, greedy(reference, tokenizer(p)["input_ids"], 8)) for p in prompts]
    before = [server.scheduler.stats.iterations for server in swarm.servers]
    results: list = [None] * len(prompts)

    def run(i: int) -> None:
        chunks = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=8, temperature=0, stream=True)
        results[i] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert results == expected
    iterations = [server.scheduler.stats.iterations - b for server, b in zip(swarm.servers, before)]
    steps = sum(len(tokenizer(e, add_special_tokens=False)["input_ids"]) for e in expected)  # upper bound of decode steps
    assert all(0 < n < steps for n in iterations), (iterations, steps)  # many sessions per iteration


def test_a_client_that_goes_away_mid_stream_frees_its_pages(api, swarm):
    served, _ = api
    pools = [server.sessions.pool for server in swarm.servers]

    def all_free() -> bool:
        return all(
            pool.num_free + len(server.sessions.prefix_index) == pool.num_pages for pool, server in zip(pools, swarm.servers)
        )

    wait_until(all_free, 10, message="pages free before")
    body = {"model": NAME, "prompt": "Go on and on", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{served.url}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # the answer is streaming: hang up
    wait_until(all_free, 10, message="the session's pages back in the pools")


def test_the_next_chat_turn_takes_the_history_from_the_prefix_cache(client, swarm, tokenizer):
    """Turn two's prompt starts with turn one's prompt and answer: the first server computes only the
    rest (whole pages of the history come from its prefix cache)."""
    messages = [{"role": "user", "content": "Tell me a long story about a swarm of small servers, please."}]
    first = client.chat.completions.create(model=NAME, messages=messages, max_tokens=40, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "More."}]
    prompt = chat_ids(tokenizer, messages)
    stats = swarm.servers[0].scheduler.stats
    before = stats.inference_tokens
    second = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, temperature=0)
    computed = stats.inference_tokens - before
    assert second.usage.prompt_tokens == len(prompt)
    assert computed <= len(prompt) - 48 + 4, (computed, len(prompt))  # at least 3 pages of 16 tokens reused


# ---- the chat page, in headless Chromium ----

RESULTS = Path(__file__).resolve().parent.parent / "test-results"


@pytest.fixture(scope="module")
def browser():
    import os
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing = "headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{missing}, and CI is set", pytrace=False)
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def test_the_chat_page_streams_an_answer_and_stops_one(api, browser, swarm, tokenizer, reference):
    served, _ = api
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    try:
        page.goto(served.url.removesuffix("/v1") + "/")
        page.fill("#api-key", KEY)
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "12")
        page.locator("#model", has_text=NAME).wait_for()
        page.fill("#message", "Name a colour.")
        page.press("#message", "Enter")
        page.wait_for_selector(".message.assistant[data-done=true]", timeout=60_000)
        ids = chat_ids(tokenizer, [{"role": "user", "content": "Name a colour."}])
        expected = text_of(tokenizer, greedy(reference, ids, 12))
        assert page.text_content(".message.assistant .text") == expected
        assert page.text_content(".message.user .text") == "Name a colour."
        page.locator("#route", has_text="Chain: ").wait_for()
        peers = {s.node.peer_id[-6:] for s in swarm.servers}
        assert all(p in page.text_content("#route") for p in peers)
        RESULTS.mkdir(exist_ok=True)
        shot = RESULTS / "chat.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 5_000

        # a long answer, stopped mid-stream: the page says so and the servers free the session's pages
        page.fill("#max-tokens", "400")
        page.fill("#message", "Go on and on.")
        page.press("#message", "Enter")
        second = page.locator(".message.assistant .text").nth(1)
        wait_until(lambda: len(second.text_content() or "") > 0, 60, message="the second answer streaming")
        page.click("#stop")
        page.wait_for_selector(".message.assistant[data-finish=stopped]", timeout=10_000)
        pools = [(server.sessions.pool, server.sessions.prefix_index) for server in swarm.servers]
        wait_until(lambda: all(p.num_free + len(i) == p.num_pages for p, i in pools), 10, message="pages back after Stop")
    finally:
        page.close()

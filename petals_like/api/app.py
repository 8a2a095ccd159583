"""The OpenAI-compatible HTTP API over the swarm (FastAPI): /v1/models, /v1/completions, /v1/chat/completions.

Requests and answers have OpenAI's shapes, so the official `openai` client and tools built on it work
unchanged; errors are {"error": {"message", "type", "param", "code"}} with OpenAI's statuses. Streaming
answers are server-sent events ending with `data: [DONE]`. Generation runs on worker threads through
one client model (api/engine.py); a client that disconnects mid-stream ends its generation at the
next step, and its session's pages go back to the servers' pools.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from importlib import resources
from typing import Any, AsyncIterator, Callable, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from petals_like.api.engine import MAX_TOP_LOGPROBS, Choice, CompletionEngine, ContextTooLong, Sampling, TokenLogprob
from petals_like.client.transport import RequestRefused
from petals_like.routing.planner import NoRouteError

logger = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_CHOICES = 16
STATIC_TYPES = {
    "chat.html": "text/html; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {  # the page runs no script but its own and loads nothing from elsewhere
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@functools.lru_cache(maxsize=None)
def _static(name: str) -> bytes:
    """A file of the package's static/ folder (the chat page: no CDN, nothing from elsewhere)."""
    return resources.files("petals_like.api").joinpath("static", name).read_bytes()


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# ---- request bodies: only what this server understands; unknown fields are ignored, as OpenAI's API does ----


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Optional[Union[str, list[str]]]) -> Optional[list[str]]:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > MAX_STOP_STRINGS or any(not s for s in stops)):
            raise ValueError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings")
        return stops

    def sampling(self, max_tokens: Optional[int], logprobs: Optional[int]) -> Sampling:
        return Sampling(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            n=self.n,
            stop=tuple(self.stop or ()),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Common):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=5)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _invalid("only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


# ---- the app ----


def create_app(
    engine: CompletionEngine,
    model_name: str,
    *,
    api_key: Optional[str] = None,
    max_workers: int = 64,
    route_of: Optional[Callable[[], list[str]]] = None,
) -> FastAPI:
    """The API app over `engine`. route_of: the servers of the latest chain (for the chat page)."""
    # a thread per running request: asyncio's default pool has only cpus + 4 of them
    workers = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="api")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="petals_like OpenAI-compatible API", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.workers = workers
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            problem = _invalid(f"the request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
        else:
            param = ".".join(location) or None
            problem = _invalid(f"{param or 'request'}: {first.get('msg', 'invalid value')}", param, "invalid_value")
        return JSONResponse(problem.body(), status_code=problem.status)

    if api_key is not None:
        app.add_middleware(_KeyCheck, key=api_key)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{model_name}`",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        return Response(_static("chat.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in STATIC_TYPES:
            raise APIError(404, f"no static file {name!r}", "invalid_request_error", code="not_found")
        return Response(_static(name), media_type=STATIC_TYPES[name], headers=SECURITY_HEADERS)

    @app.get("/api/route", include_in_schema=False)
    async def route() -> dict:
        """The servers of the latest inference chain (the chat page shows them)."""
        return {"route": route_of() if route_of is not None else []}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "petals_like"}]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        check_model(name)
        return {"id": model_name, "object": "model", "created": created, "owned_by": "petals_like"}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = _prompts(engine, body.prompt)
        sampling = body.sampling(body.max_tokens, body.logprobs)
        run = _Run(engine, workers, prompts, sampling, "cmpl", model_name)
        if body.stream:
            return _sse(run.stream(request, chat=False, include_usage=body.include_usage))
        results = await run.complete()
        choices = []
        for i, choice in enumerate(results):
            text = (engine.tokenizer.decode(prompts[i // body.n]) if body.echo else "") + choice.text
            logprobs = _completion_logprobs(engine, choice.logprobs) if body.logprobs is not None else None
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason})
        return run.envelope("text_completion", choices, usage=run.usage(results))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        if getattr(engine.tokenizer, "chat_template", None) is None:
            raise _invalid("this model's tokenizer has no chat template: use /v1/completions", "messages", "no_chat_template")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        encoded = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)
        top = body.top_logprobs if body.top_logprobs is not None else 0
        if body.top_logprobs is not None and not body.logprobs:
            raise _invalid("top_logprobs needs logprobs=true", "top_logprobs")
        sampling = body.sampling(body.max_completion_tokens or body.max_tokens, top if body.logprobs else None)
        run = _Run(engine, workers, [prompt], sampling, "chatcmpl", model_name)
        if body.stream:
            return _sse(run.stream(request, chat=True, include_usage=body.include_usage))
        results = await run.complete()
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": {"content": _chat_logprobs(engine, choice.logprobs)} if body.logprobs else None,
                "finish_reason": choice.finish_reason,
            }
            for i, choice in enumerate(results)
        ]
        return run.envelope("chat.completion", choices, usage=run.usage(results))

    return app


class _KeyCheck:
    """ASGI middleware: /v1/ requests need `Authorization: Bearer <key>`. Plain ASGI rather than
    @app.middleware("http"), which would pass every streamed chunk through an extra task and queue."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                problem = APIError(401, "Incorrect API key provided", "invalid_request_error", code="invalid_api_key")
                await JSONResponse(problem.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _prompts(engine: CompletionEngine, prompt: Any) -> list[list[int]]:
    """The token ids of each prompt of a completions request (a string, ids, or a list of either)."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise _invalid("prompt is empty", "prompt")
    vocab = engine.model.config.vocab_size
    prompts = []
    for item in items:
        ids = engine.tokenizer(item)["input_ids"] if isinstance(item, str) else list(item)
        if not ids or any(not 0 <= t < vocab for t in ids):
            raise _invalid(f"each prompt needs at least one token, with ids in [0, {vocab})", "prompt")
        prompts.append(ids)
    return prompts


class _Run:
    """One request's generation: its prompts x n choices, run on worker threads, whole or streamed."""

    def __init__(
        self, engine: CompletionEngine, workers, prompts: list[list[int]], sampling: Sampling, kind: str, model_name: str
    ):
        self.engine, self.workers, self.prompts, self.sampling = engine, workers, prompts, sampling
        self.id = f"{kind}-{uuid.uuid4().hex}"
        self.created, self.model_name = int(time.time()), model_name
        for ids in prompts:  # before anything starts: a 400 for the whole request
            try:
                engine.check_length(len(ids), sampling)
            except ContextTooLong as e:
                raise _invalid(str(e), "messages" if kind == "chatcmpl" else "prompt", "context_length_exceeded") from None
            except ValueError as e:
                raise _invalid(str(e), "prompt") from None

    def envelope(self, obj: str, choices: list[dict], usage: Optional[dict] = None) -> dict:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def usage(self, choices: list[Choice]) -> dict:
        prompt = sum(len(ids) for ids in self.prompts)
        completion = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _launch(self, on_delta, cancelled: threading.Event) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = []
        for p, ids in enumerate(self.prompts):
            callback = None if on_delta is None else (lambda i, *rest, p=p: on_delta(p * self.sampling.n + i, *rest))
            futures.append(loop.run_in_executor(self.workers, self.engine.run, ids, self.sampling, callback, cancelled))
        return futures

    async def complete(self) -> list[Choice]:
        cancelled = threading.Event()
        try:
            results = await asyncio.gather(*self._launch(None, cancelled))
        except BaseException as e:
            cancelled.set()
            raise _as_api_error(e) from e
        return [choice for choices in results for choice in choices]

    async def stream(self, request: Request, *, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def on_delta(index: int, text: str, logprobs: list[TokenLogprob], finish: Optional[str]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (index, text, logprobs, finish))

        obj = "chat.completion.chunk" if chat else "text_completion"
        total = len(self.prompts) * self.sampling.n
        try:
            futures = self._launch(on_delta, cancelled)
            done = asyncio.ensure_future(asyncio.gather(*futures))
            done.add_done_callback(lambda _: queue.put_nowait(None))  # after every delta: they were queued first
            if chat:
                for i in range(total):
                    delta = {"role": "assistant", "content": ""}
                    yield _event(self.envelope(obj, [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]))
            finished = False
            while not finished:
                items = [await queue.get()]
                while not queue.empty():  # what arrived meanwhile goes out in one write
                    items.append(queue.get_nowait())
                finished = items[-1] is None
                events = [_event(self.envelope(obj, [self._chunk(*item, chat)])) for item in items if item is not None]
                if events:
                    yield "".join(events)
            try:
                results = [c for choices in done.result() for c in choices]
            except BaseException as e:
                yield _event(_as_api_error(e).body())
                return
            if include_usage:
                yield _event(self.envelope(obj, [], usage=self.usage(results)))
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # the client went away (or we are done): generation stops at its next step

    def _chunk(self, index: int, text: str, logprobs: list[TokenLogprob], finish: Optional[str], chat: bool) -> dict:
        wanted = self.sampling.logprobs is not None
        if chat:
            lp = {"content": _chat_logprobs(self.engine, logprobs)} if wanted else None
            delta = {"content": text} if text or finish is None else {}  # a held-back token's chunk: empty content
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        lp = _completion_logprobs(self.engine, logprobs) if wanted else None
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}


def _as_api_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, NoRouteError):
        return APIError(503, f"The swarm cannot serve this model right now: {error}", "server_error", code="swarm_unavailable")
    if isinstance(error, RequestRefused):
        return APIError(400, str(error), "invalid_request_error", code="refused_by_server")
    logger.exception("Generation failed", exc_info=error)
    return APIError(503, f"Generation failed: {error!r}; retry", "server_error", code="generation_failed")


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _piece(engine: CompletionEngine, token_id: int) -> str:
    return engine.tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_logprobs(engine: CompletionEngine, logprobs: list[TokenLogprob]) -> list[dict]:
    def entry(token_id: int, value: float) -> dict:
        text = _piece(engine, token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return [dict(entry(t.token_id, t.logprob), top_logprobs=[entry(i, v) for i, v in t.top]) for t in logprobs]


def _completion_logprobs(engine: CompletionEngine, logprobs: list[TokenLogprob]) -> dict:
    tokens = [_piece(engine, t.token_id) for t in logprobs]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [t.logprob for t in logprobs],
        "top_logprobs": [{_piece(engine, i): v for i, v in t.top} for t in logprobs],
        "text_offset": offsets,
    }

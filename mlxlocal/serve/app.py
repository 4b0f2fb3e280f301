"""The HTTP side of `serve`: OpenAI's chat/completions wire format over the engine.

FastAPI parses and validates requests; every failure a client can cause is an OpenAI error object
(`{"error": {"message", "type", "param", "code"}}`) with 400/401/404/413/422/429, never a 500.
Streams are server-sent events ending in `data: [DONE]`; a client that closes its stream cancels
its sequence. Around the routes, three plain ASGI middlewares: one access-log line per request,
the API key (checked before the body is read, in constant time) and the body-size limit.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..constraints import ConstrainedAnswer, constraint_from_response_format
from ..errors import MlxLocalError
from ..generate import LoadedModel, Sampling, as_loaded, encode_prompt, render_chat
from .engine import Busy, Engine, Event, Job, TokenLogprob
from .schemas import ChatRequest, CompletionRequest, error_object

log = logging.getLogger("mlxlocal.serve")

MAX_BODY = 8 * 1024 * 1024  # bytes; far beyond any context's worth of text
DEFAULT_MAX_TOKENS = 2048  # when a request names none (and the context leaves room)
STATIC = Path(__file__).parent / "static"  # the chat page, when shipped, is served at /


class ApiError(Exception):
    """A request that cannot be served, as the status and OpenAI error object to answer with."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = error_object(str(self), self.type, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class Usage:
    """What the access log reports for a request; filled in as it is served."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str | None = None
    prompt: str | None = None  # logged only with log_prompts


def model_ids(lm: LoadedModel, adapters: dict[str, Any]) -> list[str]:
    """The ids clients name in `model`: the base's folder name, then each adapter's name."""
    return [lm.path.name, *adapters]


def create_app(
    model: str | Path | LoadedModel,
    adapters: dict[str, str | Path] | None = None,
    *,
    api_key: str | None = None,
    max_concurrency: int = 16,
    queue: int = 64,
    log_prompts: bool = False,
    max_body: int = MAX_BODY,
    prefix_cache: int | None = None,
) -> FastAPI:
    """The ASGI application: `model` (an MLX folder or a loaded model) loaded once, each named
    adapter folder (ours, mlx-lm's or PEFT) as another model id sharing its weights;
    `prefix_cache` bytes of KV caches are kept for reuse by prompts sharing a prefix."""
    from ..adapters.layers import adapted_copy

    lm = as_loaded(model)
    base = lm.path.name
    adapters = dict(adapters or {})
    for name, folder in adapters.items():
        if name == base or not name or any(c.isspace() for c in name):
            raise MlxLocalError(
                f"adapter name {name!r}: give each adapter a distinct name without spaces, "
                f"other than the base model's ({base})"
            )
        if not Path(folder).is_dir():
            raise MlxLocalError(f"adapter {name}: {folder} is no folder; give an adapters folder")
    variants = {base: lm.model}
    variants |= {name: adapted_copy(lm.model, folder) for name, folder in adapters.items()}
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.engine.close()

    app = FastAPI(title="mlxlocal", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)  # fmt: skip
    engine = Engine(lm, variants, max_concurrency=max_concurrency, queue=queue,
                    prefix_cache=prefix_cache)  # fmt: skip
    app.state.engine = engine
    app.state.lm = lm

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return _validation_error(e).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return ApiError(e.status_code, str(e.detail), code=_http_code(e.status_code)).response()

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return ApiError(500, f"internal error ({type(e).__name__})", type="server_error").response()

    @app.get("/health")
    async def health():
        if not engine.alive:
            return ApiError(503, f"the generation loop stopped: {engine.failure}",
                            type="server_error").response()  # fmt: skip
        return {"status": "ok", "models": list(variants), "load": engine.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(m, created) for m in variants]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str):
        _check_model(name, variants)
        return _model_card(name, created)

    def sampling_of(body) -> tuple[Sampling, list]:
        try:
            sampling = Sampling(temp=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                seed=body.seed)  # fmt: skip
        except MlxLocalError as e:
            raise ApiError(400, str(e)) from e
        processors = []
        if body.presence_penalty or body.frequency_penalty:
            from mlx_lm.sample_utils import make_logits_processors

            processors = make_logits_processors(
                presence_penalty=body.presence_penalty or None,
                frequency_penalty=body.frequency_penalty or None,
            )
        return sampling, processors

    def fit(ids: list[int], max_tokens: int | None, param: str) -> int:
        """max_tokens for this prompt: the request's if the context has room, else an error."""
        if not ids:
            raise ApiError(400, "the prompt is empty: give at least one token of text",
                           param="prompt" if param == "max_tokens" else "messages")  # fmt: skip
        context = lm.context
        if context is None:
            return max_tokens or DEFAULT_MAX_TOKENS
        if len(ids) >= context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but the model's context is "
                           f"{context}: shorten it", code="context_length_exceeded")  # fmt: skip
        room = context - len(ids)
        if max_tokens is None:
            return min(DEFAULT_MAX_TOKENS, room)
        if max_tokens > room:
            raise ApiError(
                400,
                f"{param} {max_tokens} is beyond the context: the prompt has {len(ids)} tokens "
                f"and the model's context is {context}, so at most {room} can be generated",
                param=param,
                code="context_length_exceeded",
            )
        return max_tokens

    def common_checks(body) -> None:
        _check_model(body.model, variants)
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported: send one request per answer", param="n")
        if len(body.stop_list()) > 16:
            raise ApiError(400, "at most 16 stop strings", param="stop")

    def prepare_chat(body: ChatRequest) -> tuple[list[int], int]:
        common_checks(body)
        if not body.messages:
            raise ApiError(400, "messages is empty: send at least one message", param="messages")
        if not lm.tokenizer.has_chat_template:
            raise ApiError(400, f"{base} has no chat template, so it cannot take messages; use "
                           "/v1/completions with a plain prompt", param="messages")  # fmt: skip
        messages = [m.for_template() for m in body.messages]
        try:
            ids = render_chat(lm.tokenizer, messages, body.tools)
        except MlxLocalError as e:
            raise ApiError(400, str(e), param="messages") from e
        if body.max_completion_tokens is not None:
            return ids, fit(ids, body.max_completion_tokens, "max_completion_tokens")
        return ids, fit(ids, body.max_tokens, "max_tokens")

    def prepare_completion(body: CompletionRequest) -> tuple[list[int], int]:
        common_checks(body)
        if body.echo or body.suffix:
            raise ApiError(400, "echo and suffix are not supported", param="echo")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request: send a string or one token list",
                               param="prompt")  # fmt: skip
            prompt = prompt[0]
        if isinstance(prompt, list):
            vocab = len(lm.tokenizer.get_vocab())
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        ids = encode_prompt(lm.tokenizer, prompt, chat_template=False)
        return ids, fit(ids, body.max_tokens, "max_tokens")

    def constrain(body) -> ConstrainedAnswer | None:
        """The answer's matcher under the request's response_format (None for text); the first
        constrained request reads the tokenizer into llguidance (seconds for a large one)."""
        try:
            constraint = constraint_from_response_format(body.response_format)
        except MlxLocalError as e:
            raise ApiError(400, str(e), param="response_format") from e
        if constraint is None:
            return None
        if body.stop_list():
            raise ApiError(400, "stop strings cannot be combined with a response_format: the "
                           "format decides where the answer ends", param="stop")  # fmt: skip
        try:
            return lm.constrained(constraint)
        except MlxLocalError as e:
            raise ApiError(400, str(e), param="response_format") from e

    async def answer(request: Request, body, prepare: Callable, chat: bool):
        usage = request.state.usage = Usage(model=body.model)
        if log_prompts:
            usage.prompt = json.dumps(
                [m.for_template() for m in body.messages] if chat else body.prompt,
                ensure_ascii=False,
            )
        ids, max_tokens = await run_in_threadpool(prepare, body)
        constrained = await run_in_threadpool(constrain, body)
        usage.prompt_tokens = len(ids)
        sampling, processors = sampling_of(body)
        if chat:
            top = (body.top_logprobs or 0) if body.logprobs else None
        else:
            top = body.logprobs
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(
            model=body.model,
            ids=ids,
            max_tokens=max_tokens,
            deliver=lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
            sampling=sampling,
            stop=body.stop_list(),
            top_logprobs=top,
            logits_processors=processors,
            constrained=constrained,
            whole=not body.stream,
        )
        try:
            engine.submit(job)
        except Busy as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from e  # fmt: skip
        except MlxLocalError as e:
            raise ApiError(503, str(e), type="server_error") from e
        reply = Reply(lm.tokenizer, body.model, chat, usage)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = reply.stream(events, include_usage, lambda: engine.cancel(job))
            return EventSourceResponse(chunks, ping=15)
        try:
            return await reply.whole(request, events)
        finally:
            engine.cancel(job)  # nothing if it finished; else the client went away

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await answer(request, body, prepare_chat, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await answer(request, body, prepare_completion, chat=False)

    if STATIC.is_dir():
        # The page at / and its files under /static/: a mount at / would also answer the API's
        # paths (GET /v1/chat/completions: its 404 instead of the router's 405).
        from fastapi.responses import FileResponse
        from starlette.staticfiles import StaticFiles

        @app.get("/")
        async def page():
            return FileResponse(STATIC / "index.html")

        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    app.add_middleware(BodyLimit, max_body=max_body)
    app.add_middleware(ApiKey, api_key=api_key)
    app.add_middleware(AccessLog, log_prompts=log_prompts)
    return app


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "mlxlocal"}


def _check_model(name: str, variants: dict[str, Any]) -> None:
    if name not in variants:
        raise ApiError(404, f"no model {name!r} here; the models are {', '.join(variants)} "
                       "(GET /v1/models lists them)", param="model",
                       code="model_not_found")  # fmt: skip


def _http_code(status: int) -> str | None:
    return {404: "not_found", 405: "method_not_allowed"}.get(status)


def _validation_error(e: RequestValidationError) -> ApiError:
    """The first problem FastAPI found, as a 400 (not JSON) or a 422 (not the right shape)."""
    errors = e.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": ""}
    if first.get("type") == "json_invalid":
        problem = (first.get("ctx") or {}).get("error", first.get("msg"))
        return ApiError(400, f"the body is not valid JSON ({problem})", code="invalid_json")
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return ApiError(400, "the body is empty: send a JSON object", code="invalid_json")
    # Union members appear in the location as type tags (prompt.str, stop.list[str]): not fields.
    tags = {"str", "int", "float", "bool", "none"}
    loc = [
        str(p)
        for p in first.get("loc", ())
        if p != "body" and not (isinstance(p, str) and (p in tags or "[" in p or "-" in p))
    ]
    param = ".".join(loc) or None
    where = f"{param}: " if param else "the body: "
    return ApiError(422, f"{where}{first.get('msg', 'invalid')}", param=param,
                    code="invalid_value")  # fmt: skip


class Reply:
    """Turns the engine's events into OpenAI's response objects and stream chunks."""

    def __init__(self, tokenizer, model: str, chat: bool, usage: Usage):
        self.tokenizer, self.model, self.chat, self.usage = tokenizer, model, chat, usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _usage(self) -> dict[str, int]:
        u = self.usage
        total = u.prompt_tokens + u.completion_tokens
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": total}  # fmt: skip

    def _logprobs(self, entries: list[TokenLogprob], offset: int) -> dict[str, Any] | None:
        decode = self.tokenizer.decode
        if self.chat:

            def item(token: int, logprob: float) -> dict[str, Any]:
                text = decode([token])
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            return {
                "content": [
                    {**item(e.token, e.logprob), "top_logprobs": [item(*t) for t in e.top]}
                    for e in entries
                ]
            }
        tokens = [decode([e.token]) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{decode([i]): lp for i, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def _choice(self, text: str | None, entries, finish, offset: int, delta: bool, first=False):
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            content = {"role": "assistant"} if first or not delta else {}
            if text is not None:
                content["content"] = text
            choice["delta" if delta else "message"] = content
        else:
            choice["text"] = text or ""
        choice["logprobs"] = self._logprobs(entries, offset) if entries is not None else None
        choice["finish_reason"] = finish
        return choice

    def _envelope(self, choices: list, object: str) -> dict[str, Any]:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}  # fmt: skip

    async def whole(self, request: Request, events: asyncio.Queue) -> dict[str, Any]:
        """Wait for the whole answer; a client that went away meanwhile ends the wait."""
        text, entries, logprobs, finish = [], [], False, None
        while finish is None:
            # Wait on one get() until it completes (no event is lost to a timeout), looking
            # every half second whether the client is still there.
            getting = asyncio.ensure_future(events.get())
            while not (await asyncio.wait({getting}, timeout=0.5))[0]:
                if await request.is_disconnected():
                    getting.cancel()
                    raise ApiError(499, "the client closed the connection")
            event: Event = getting.result()
            if event.error:
                raise ApiError(500, event.error, type="server_error")
            text.append(event.text)
            entries += event.logprobs
            logprobs = logprobs or bool(event.logprobs)
            self.usage.completion_tokens = event.completion_tokens
            finish = event.finish_reason
        choice = self._choice("".join(text), entries if logprobs else None, finish, 0, False)
        return {**self._envelope([choice], self.object), "usage": self._usage()}

    async def stream(self, events: asyncio.Queue, include_usage: bool,
                     cancel: Callable[[], None]) -> AsyncIterator[dict[str, str]]:  # fmt: skip
        """SSE chunks as the answer grows, ending in [DONE]; leaving early cancels the job."""
        object = "chat.completion.chunk" if self.chat else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(choices: list) -> dict[str, str]:
            return {"data": json.dumps({**self._envelope(choices, object), **extra})}

        try:
            if self.chat:
                yield chunk([self._choice("", None, None, 0, True, first=True)])
            finish, offset = None, 0
            while finish is None:
                event: Event = await events.get()
                if event.error:
                    yield {"data": json.dumps(error_object(event.error, "server_error"))}
                    break
                self.usage.completion_tokens = event.completion_tokens
                finish = event.finish_reason
                entries = event.logprobs or None
                if event.text or entries:
                    yield chunk([self._choice(event.text, entries, None, offset, True)])
                    offset += len(event.text)
                if finish is not None:
                    yield chunk([self._choice(None if self.chat else "", None, finish, 0, True)])
            if include_usage and finish is not None:
                data = {**self._envelope([], object), "usage": self._usage()}
                yield {"data": json.dumps(data)}
            yield {"data": "[DONE]"}
        finally:
            cancel()


class AccessLog:
    """One log line per request: client, method, path, status, model, tokens, seconds."""

    def __init__(self, app, log_prompts: bool = False):
        self.app, self.log_prompts = app, log_prompts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        state = scope.setdefault("state", {})

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            usage: Usage | None = state.get("usage")
            client = scope.get("client") or ("-", 0)
            parts = [f"{client[0]} {scope['method']} {scope['path']} {status[0]}"]
            if usage is not None:
                parts.append(f"model={usage.model} prompt_tokens={usage.prompt_tokens} "
                             f"completion_tokens={usage.completion_tokens}")  # fmt: skip
            parts.append(f"{time.perf_counter() - start:.3f}s")
            if self.log_prompts and usage is not None and usage.prompt is not None:
                parts.append(f"prompt={usage.prompt}")
            log.info(" ".join(parts))


class ApiKey:
    """With a key, every /v1/ request must carry `Authorization: Bearer KEY` (compared in
    constant time, before the body is read)."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
            error = ApiError(401, "missing or wrong API key: send the header "
                             "'Authorization: Bearer KEY'", code="invalid_api_key")  # fmt: skip
            return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """Bodies past `max_body` bytes get a 413 before the application sees them."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"the body is larger than {self.max_body} bytes",
                             code="request_too_large")  # fmt: skip
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit():
            error = ApiError(400, "Content-Length is not a number", code="invalid_header")
            return await error.response()(scope, receive, send)
        if int(length) > self.max_body:
            return await too_large.response()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            size += len(message.get("body", b""))
            if size > self.max_body:
                return await too_large.response()(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

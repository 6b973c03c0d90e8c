"""`build_app`: the FastAPI application of ``hf-paged serve`` (routes, auth, errors, lifespan)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..cache.geometry import max_model_len
from ..engine import AsyncEngine, Engine
from ..engine.process_client import EngineProcessClient
from .config import ServerConfig
from .errors import APIError, error_response
from .metrics import CONTENT_TYPE_LATEST, MetricsSink, ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from .serving import OpenAIServing

__all__ = ["ServerConfig", "build_app"]

logger = logging.getLogger(__name__)

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 500, 503)}


def build_app(engine: Engine | EngineProcessClient, tokenizer, config: ServerConfig) -> FastAPI:
    """The OpenAI-compatible app serving ``engine``.

    An `Engine` gets its `AsyncEngine` client at once; an `EngineProcessClient` (the engine in a
    process of its own, ``hf-paged serve --engine-process``) is used as the client itself. The
    app's lifespan shuts the client down at exit (aborting what is still in flight and freeing
    the KV pool). ``config.max_model_len`` is
    resolved (model default, capped to the KV pool) in place. ``app.state`` holds ``engine_client``,
    ``metrics`` and ``config``.

    Example:
        >>> app = build_app(engine, tok, ServerConfig(model_name="tiny"))  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    if isinstance(engine, Engine):
        _resolve_max_model_len(engine.kv_pool.num_blocks * engine.block_size, max_model_len(engine.model), config)
        client = AsyncEngine(engine, max_waiting=config.max_waiting)
        state = engine
    else:  # an EngineProcessClient: its sinks get the engine state the process reports
        _resolve_max_model_len(engine.capacity_tokens, engine.max_model_len, config)
        client = engine
        client.max_waiting = config.max_waiting
        state = engine.state
    metrics = ServerMetrics(config.model_name)
    sink = MetricsSink(metrics, lambda: client.num_waiting)
    sink.publish(state)
    client.add_sink(sink)
    serving = OpenAIServing(client, tokenizer, config, vocab_size=engine.vocab_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info("serving %r", config.model_name)
        try:
            yield
        finally:
            # Uvicorn has closed the connections by now (waiting up to its graceful timeout), so
            # nobody waits for what still runs: abort it, its blocks return, the thread exits.
            # (`hf-paged serve` lets in-flight requests drain earlier, when the signal arrives.)
            await asyncio.to_thread(client.shutdown, 0.0)
            logger.info("engine stopped")

    app = FastAPI(title="hf-paged", summary="OpenAI-compatible server over hf_paged's Engine", lifespan=lifespan)
    app.state.engine_client = client
    app.state.metrics = metrics
    app.state.config = config
    _install_error_handlers(app)
    app.add_middleware(_BodyLimit, max_bytes=config.max_request_bytes)
    if config.api_key:  # added last, so it runs first: nothing is read for an unauthenticated client
        app.add_middleware(_BearerAuth, api_key=config.api_key)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        """Text completion (``stream=true``: server-sent events ending with ``data: [DONE]``)."""
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion through the chat template (``stream=true``: server-sent events)."""
        return await serving.chat(body, request)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        """The one served model."""
        return ModelList(data=[ModelCard(id=config.model_name, max_model_len=config.max_model_len)])

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine runs, 503 otherwise (saying why)."""
        if client.alive:
            return JSONResponse({"status": "ok"})
        return error_response(503, f"the engine is not running: {client.error or 'shut down'}")

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition."""
        metrics.requests_waiting.set(client.num_waiting)  # also while a step runs
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _resolve_max_model_len(capacity: int, model_limit: int | None, config: ServerConfig) -> None:
    """Set ``config.max_model_len``: the model's limit by default, checked against it, capped to the KV pool."""
    if config.max_model_len and model_limit and config.max_model_len > model_limit:
        if not config.allow_long_max_model_len:
            raise ValueError(
                f"max_model_len {config.max_model_len} is more than the model's max_position_embeddings "
                f"({model_limit}); pass --allow-long-max-model-len (ServerConfig.allow_long_max_model_len=True) "
                f"to use it anyway"
            )
        logger.warning(
            "max_model_len %d is more than the model's max_position_embeddings (%d): outputs past it may be garbage",
            config.max_model_len, model_limit,
        )
    wanted = config.max_model_len or model_limit or capacity
    if wanted > capacity:
        logger.warning(
            "max_model_len %d is more than the KV pool holds (%d tokens); capping it to %d", wanted, capacity, capacity
        )
        wanted = capacity
    config.max_model_len = wanted


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Malformed JSON arrives here too (FastAPI reports it as a "json_invalid" error).
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        # Union members show up in the location ("prompt", "str"); the field is the first part.
        param = loc[0] if loc else None
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            param = None
        elif first.get("type") == "extra_forbidden":
            message = f"unknown field {'.'.join(loc)!r}: this server does not support it"
        else:
            where = ".".join(loc) if loc else "body"
            msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
            message = f"invalid request: {where}: {msg}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more error(s))"
        return error_response(400, message, param, "invalid_value" if param else "invalid_json")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}")


class _BearerAuth:
    """ASGI middleware: ``/v1/*`` needs ``Authorization: Bearer <api_key>`` (401 otherwise).

    Checked before the body is read, so an unauthenticated client learns nothing else.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                response = error_response(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is a 413, by its ``Content-Length`` (which the
    HTTP server holds the body to) or, for a chunked body, read here up to the limit before the app
    sees it, so one client cannot make the server buffer an unbounded body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self._max = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self._max:
                await self._too_large(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
            if len(body) > self._max:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"the request body is larger than {self._max} bytes", code="request_too_large")
        await response(scope, receive, send)

"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncLLM, run by uvicorn.

    client ──HTTP──► route ──► OpenAIServing{Completion,Chat} ──► AsyncLLM ──ZMQ──► engine core
                      ◄── JSON, or SSE `data: {...}` chunks ending with `data: [DONE]`

A stop signal (SIGINT/SIGTERM) aborts in-flight requests, so their streams end at once with
finish_reason "abort"; uvicorn then drains connections and the lifespan stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from types import FrameType
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from kvflow import __version__
from kvflow.entrypoints.openai.body import add_body_schemas, body_schema
from kvflow.entrypoints.openai.errors import OpenAIError, error_response, install_error_handlers
from kvflow.entrypoints.openai.http_protocol import guarded_protocol
from kvflow.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
)
from kvflow.entrypoints.openai.serving_chat import OpenAIServingChat, render_chat
from kvflow.entrypoints.openai.serving_completion import OpenAIServingCompletion
from kvflow.entrypoints.openai.serving_engine import (
    ServingContext,
    cancel_on_disconnect,
    sse_stream,
)
from kvflow.errors import EngineDeadError
from kvflow.tracing import extract_trace_headers

logger = logging.getLogger(__name__)

# Paths a load balancer or scraper may call without the API key (as in vLLM).
OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics"})
GRACEFUL_SHUTDOWN_S = 5  # after this, uvicorn cancels whatever is still running
# "1" or "true" adds /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's
# VLLM_ALLOW_RUNTIME_LORA_UPDATING): whoever can reach the server can then load any local folder.
RUNTIME_LORA_ENV = "KVFLOW_ALLOW_RUNTIME_LORA_UPDATING"

router = APIRouter()
runtime_lora_router = APIRouter()


def answers(ok: type[BaseModel] | None = None, stream: bool = False) -> dict[int | str, Any]:
    """A route's documented answers: its model (and SSE when it streams), errors in OpenAI's shape.

    "default" covers the rest (and keeps FastAPI from documenting a 422 it never sends).
    """
    error = {"model": ErrorResponse, "description": "an error, in OpenAI's shape"}
    documented: dict[int | str, Any] = {status: {**error, "description": why}
                                        for status, why in _ERRORS.items()}
    documented["default"] = error
    if ok is not None:
        documented[200] = {"model": ok, "description": "the result"}
        if stream:
            documented[200]["content"] = {"text/event-stream": {
                "schema": {"type": "string", "description": "chunks as `data: {...}` events"}}}
    return documented


_ERRORS = {400: "an invalid request", 404: "an unknown model or path",
           408: "the request did not arrive in time", 413: "the body is too large",
           503: "overloaded (see Retry-After), or the engine is dead"}
EMPTY_OK: dict[int | str, Any] = {
    200: {"description": "the engine is alive (no body)", "content": {}},
    503: {"model": ErrorResponse, "description": "the engine is dead"}}
TEXT_OK: dict[int | str, Any] = {
    200: {"description": "done", "content": {"text/plain": {"schema": {"type": "string"}}}}}
BODY_MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeCompletionRequest,
               TokenizeChatRequest, DetokenizeRequest, LoadLoRAAdapterRequest,
               UnloadLoRAAdapterRequest)


def _ctx(raw: Request) -> ServingContext:
    ctx: ServingContext = raw.app.state.serving
    return ctx


async def _wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


async def _respond(raw: Request, work: Awaitable[BaseModel | AsyncIterator[BaseModel]]
                   ) -> Response:
    """JSON for a whole response, SSE for a stream; a client that leaves cancels the work."""
    result: BaseModel | AsyncIterator[BaseModel] = await cancel_on_disconnect(
        work, lambda: _wait_for_disconnect(raw))
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(), media_type="application/json")
    return StreamingResponse(sse_stream(result), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


# Routes take the raw request: ServingContext.parse reads the body within its limits and
# validates it off the event loop (body_schema keeps the OpenAPI schema's body models).
@router.post("/v1/completions", openapi_extra=body_schema(CompletionRequest),
             responses=answers(CompletionResponse, stream=True))
async def create_completion(raw: Request) -> Response:
    request = await _ctx(raw).parse(raw, CompletionRequest)
    trace = extract_trace_headers(raw.headers)
    return await _respond(raw, raw.app.state.completions.create(request, trace))


@router.post("/v1/chat/completions", openapi_extra=body_schema(ChatCompletionRequest),
             responses=answers(ChatCompletionResponse, stream=True))
async def create_chat_completion(raw: Request) -> Response:
    request = await _ctx(raw).parse(raw, ChatCompletionRequest)
    trace = extract_trace_headers(raw.headers)
    return await _respond(raw, raw.app.state.chat.create(request, trace))


@router.get("/v1/models")
async def list_models(raw: Request) -> ModelList:
    ctx = _ctx(raw)
    root = str(ctx.engine.config.model_config.path)
    return ModelList(data=ctx.models.cards(root, ctx.max_model_len))


@router.get("/v1/models/{model_id:path}", responses=answers())
async def retrieve_model(model_id: str, raw: Request) -> ModelCard:
    for card in (await list_models(raw)).data:
        if card.id == model_id:
            return card
    raise OpenAIError(f"The model `{model_id}` does not exist.", 404, "model")


@router.get("/health", response_class=Response, responses=EMPTY_OK)
async def health(raw: Request) -> Response:
    try:
        await _ctx(raw).engine.check_health()
    except EngineDeadError as exc:
        return error_response(str(exc), 503)
    return Response(status_code=200)


@router.get("/ping", response_class=Response, responses=EMPTY_OK)
async def ping(raw: Request) -> Response:
    return await health(raw)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/metrics")
async def metrics(raw: Request) -> Response:
    ctx = _ctx(raw)
    ctx.metrics.update_frontend(ctx.engine.get_num_unfinished_requests(),
                                ctx.engine.processor.mm_totals())
    if ctx.engine.errored:
        ctx.metrics.engine_dead()
    else:
        try:
            stats = await asyncio.wait_for(ctx.engine.get_scheduler_stats(), timeout=5)
            ctx.metrics.update_from_stats(stats, ctx.models.lora_requests)
            if ctx.metrics.engines is not None:  # data-parallel replicas, one series each
                per_engine = await asyncio.wait_for(ctx.engine.get_engine_stats(), timeout=5)
                ctx.metrics.engines.update(per_engine, ctx.engine.engine_core.routed_counts())
        except Exception as exc:  # a scrape still answers with what it has
            logger.warning("cannot refresh engine metrics: %r", exc)
    return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)


@router.post("/tokenize", openapi_extra=body_schema(TokenizeCompletionRequest,
                                                    TokenizeChatRequest), responses=answers())
async def tokenize(raw: Request) -> TokenizeResponse:
    ctx = _ctx(raw)
    request = await ctx.parse(raw, TokenizeCompletionRequest | TokenizeChatRequest)
    ctx.check_model(request.model)
    if isinstance(request, TokenizeChatRequest):
        text, _ = await render_chat(ctx, request.messages, request.add_generation_prompt,
                                    request.continue_final_message, request.chat_template_kwargs,
                                    request.chat_template)
        param = "messages"
    else:
        text, param = request.prompt, "prompt"
    ids = await ctx.tokenize(text, request.add_special_tokens, param) if text else []
    strs = None
    if request.return_token_strs:
        strs = await ctx.run(ctx.engine.get_tokenizer().convert_ids_to_tokens, ids)
    return TokenizeResponse(count=len(ids), max_model_len=ctx.max_model_len, tokens=ids,
                            token_strs=strs)


@router.post("/detokenize", openapi_extra=body_schema(DetokenizeRequest), responses=answers())
async def detokenize(raw: Request) -> DetokenizeResponse:
    ctx = _ctx(raw)
    request = await ctx.parse(raw, DetokenizeRequest)
    ctx.check_model(request.model)
    vocab = ctx.vocab_size
    if any(not 0 <= t < vocab for t in request.tokens):
        raise OpenAIError(f"tokens must be ids in 0..{vocab - 1}", 400, "tokens")
    text = await ctx.run(ctx.engine.get_tokenizer().decode, request.tokens)
    return DetokenizeResponse(prompt=text)


@runtime_lora_router.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
                          openapi_extra=body_schema(LoadLoRAAdapterRequest),
                          responses={**answers(), **TEXT_OK})
async def load_lora_adapter(raw: Request) -> PlainTextResponse:
    ctx = _ctx(raw)
    request = await ctx.parse(raw, LoadLoRAAdapterRequest)
    return PlainTextResponse(await ctx.models.load_lora_adapter(request))


@runtime_lora_router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
                          openapi_extra=body_schema(UnloadLoRAAdapterRequest),
                          responses={**answers(), **TEXT_OK})
async def unload_lora_adapter(raw: Request) -> PlainTextResponse:
    ctx = _ctx(raw)
    request = await ctx.parse(raw, UnloadLoRAAdapterRequest)
    return PlainTextResponse(await ctx.models.unload_lora_adapter(request))


def runtime_lora_updating() -> bool:
    return os.environ.get(RUNTIME_LORA_ENV, "0").strip().lower() in ("1", "true")


# ---- development endpoints (KVFLOW_SERVER_DEV_MODE=1, as vLLM's VLLM_SERVER_DEV_MODE) ------
DEV_MODE_ENV = "KVFLOW_SERVER_DEV_MODE"
dev_router = APIRouter()


def dev_mode() -> bool:
    return os.environ.get(DEV_MODE_ENV, "0").strip().lower() in ("1", "true")


async def _engine_call(work: Awaitable[Any], param: str | None = None) -> None:
    """An engine control call: a ValueError (bad argument, sleep mode off) is a 400."""
    try:
        await work
    except ValueError as exc:
        raise OpenAIError(str(exc), 400, param) from exc


@dev_router.post("/sleep", response_class=Response, responses=EMPTY_OK)
async def sleep(raw: Request, level: int = 1) -> Response:
    """Free the KV cache (level 1) and the weights (level 2); requests wait for wake_up."""
    await _engine_call(_ctx(raw).engine.sleep(level), "level")
    return Response(status_code=200)


@dev_router.post("/wake_up", response_class=Response, responses=EMPTY_OK)
async def wake_up(raw: Request) -> Response:
    """Restore the weights and the KV cache (or only ?tags=weights / ?tags=kv_cache)."""
    tags = raw.query_params.getlist("tags") or None
    await _engine_call(_ctx(raw).engine.wake_up(tags), "tags")
    return Response(status_code=200)


@dev_router.get("/is_sleeping")
async def is_sleeping(raw: Request) -> dict[str, bool]:
    return {"is_sleeping": await _ctx(raw).engine.is_sleeping()}


@dev_router.post("/reset_prefix_cache", response_class=Response, responses=EMPTY_OK)
async def reset_prefix_cache(raw: Request) -> Response:
    await _engine_call(_ctx(raw).engine.reset_prefix_cache())
    return Response(status_code=200)


class APIKeyMiddleware:
    """401 for any request without `Authorization: Bearer <key>` (except OPEN_PATHS)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):
                response = error_response(
                    "Unauthorized: send a valid API key as `Authorization: Bearer <key>`", 401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(ctx: ServingContext, api_key: str | None = None) -> FastAPI:
    """The ASGI app; its lifespan stops the engine when the server shuts down."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await ctx.abort_all()
        ctx.engine.shutdown()
        ctx.close()

    app = FastAPI(title="kvflow", version=__version__, lifespan=lifespan)
    app.state.serving = ctx
    app.state.completions = OpenAIServingCompletion(ctx)
    app.state.chat = OpenAIServingChat(ctx)
    app.include_router(router)
    if runtime_lora_updating():
        logger.warning("%s is set: clients may load and unload LoRA adapters from local "
                       "folders", RUNTIME_LORA_ENV)
        app.include_router(runtime_lora_router)
    if dev_mode():
        logger.warning("%s is set: clients may put the engine to sleep and reset its caches",
                       DEV_MODE_ENV)
        app.include_router(dev_router)
    add_body_schemas(app, BODY_MODELS)
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app


class GracefulServer(uvicorn.Server):
    """uvicorn's server, plus hooks (listening, stop signal) and a stop when the engine dies."""

    # A dead engine stops the server within about this long (plus uvicorn's 0.1 s tick).
    ENGINE_CHECK_INTERVAL_S = 0.25

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None],
                 on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._on_exit = on_exit
        self.engine_died = False

    async def exit_when_engine_dies(self, is_dead: Callable[[], bool]) -> None:
        """Shut down once `is_dead()`, so a supervisor can restart the whole server.

        A graceful shutdown: in-flight requests have already been handed the engine's error,
        and uvicorn lets their responses (a 503, an SSE error event) finish first.
        """
        while not self.should_exit:  # a stop signal first: a normal exit, not a death
            if is_dead():
                logger.error("the engine core died: stopping the server (exit code 1) so that "
                             "a supervisor can restart it")
                self.engine_died = True
                self.should_exit = True
                return
            await asyncio.sleep(self.ENGINE_CHECK_INTERVAL_S)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self._on_exit()
        super().handle_exit(sig, frame)


def bind_socket(host: str, port: int) -> socket.socket:
    """Claim the port before the model loads, so a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def serve_http(app: FastAPI, sock: socket.socket, on_started: Callable[[], None],
                     **uvicorn_kwargs: Any) -> bool:
    """Serve until a stop signal or the engine's death; True when the engine died.

    A stop signal aborts in-flight requests; a dead engine has failed them already.
    """
    ctx: ServingContext = app.state.serving
    loop = asyncio.get_running_loop()
    aborting: set[asyncio.Task[None]] = set()

    def on_exit() -> None:  # runs in a signal handler: hand over to the loop
        def start_abort() -> None:
            task = loop.create_task(ctx.abort_all())
            aborting.add(task)
            task.add_done_callback(aborting.discard)
        loop.call_soon_threadsafe(start_abort)

    config = uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            http=guarded_protocol(ctx.limits.request_read_timeout_s),
                            **uvicorn_kwargs)
    server = GracefulServer(config, on_started, on_exit)
    watcher = loop.create_task(server.exit_when_engine_dies(lambda: ctx.engine.errored))
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()
    return server.engine_died

"""The `kvflow serve`, `kvflow chat` and `kvflow bench serve` subcommands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from kvflow.config import AsyncEngineArgs
from kvflow.entrypoints.cli import add_verbose_arg
from kvflow.entrypoints.openai.limits import ServerLimits
from kvflow.entrypoints.openai.serving_models import parse_lora_module

if TYPE_CHECKING:
    from fastapi import FastAPI

    from kvflow.entrypoints.openai.serving_engine import ServingContext

SubParsers = argparse._SubParsersAction


def add_parsers() -> list[Callable[[SubParsers], None]]:
    """What `kvflow.entrypoints.cli` adds to the `kvflow` command."""
    return [_serve_parser, _chat_parser, _bench_parser]


# ---- serve ----------------------------------------------------------------------------
def _serve_parser(sub: SubParsers) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("model", nargs="?", default=None,
                   help="model folder, GGUF file or packaged name (default: the packaged model)")
    p.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                   help="the same as the positional MODEL (vLLM's older spelling)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in `model` (default: the model argument)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` (default: $KVFLOW_API_KEY)")
    p.add_argument("--disable-access-log", action="store_true",
                   help="do not log one line per HTTP request")
    p.add_argument("--lora-modules", nargs="+", type=parse_lora_module, default=None,
                   metavar="NAME=PATH",
                   help="LoRA adapters to serve (needs --enable-lora), each `name=path` or "
                   "JSON '{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'; "
                   "clients pick one by its name in `model`")
    ServerLimits.add_cli_args(p)
    AsyncEngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_serve)


def _engine_args(args: argparse.Namespace) -> AsyncEngineArgs:
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert isinstance(engine_args, AsyncEngineArgs)
    if engine_args.num_threads is None and engine_args.data_parallel_backend != "ray":
        # replicas on this machine share its cores (Ray replicas reserve --num-threads CPUs
        # each on their own nodes, 1 by default)
        replicas = max(1, engine_args.data_parallel_size)
        engine_args.num_threads = max(1, _engine_threads() // replicas)
    return engine_args


def _engine_threads() -> int:
    """Torch threads for the engine core when serving: all cores but one.

    The server process needs a core for HTTP, detokenizing and streaming; torch threads
    that share cores with it spin at every barrier (on 2 cores, ~4-10x slower steps).
    """
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(torch.get_num_threads(), (cores or 1) - 1))


def _exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    # Until uvicorn takes over (and after it re-raises the signal once it has shut down
    # gracefully), SIGTERM unwinds normally, so the engine process is always stopped.
    raise SystemExit(0)


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Start the engine-core process with SIGINT ignored.

    Ctrl-C in a terminal signals the whole process group; the server must stay in charge of
    stopping (it ends the streams, then stops the core), so the core must not die first.
    A spawned child keeps an ignored disposition; the server restores its own at once after.
    """
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def usage_text(base_url: str, model: str, api_key: str | None) -> str:
    key_header = ' -H "Authorization: Bearer $KVFLOW_API_KEY"' if api_key else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    return "\n".join([
        f"kvflow is serving {model!r} at {base_url}/v1 (Ctrl-C to stop)",
        "Query it with curl:",
        f"  curl {base_url}/v1/chat/completions -H 'Content-Type: application/json'"
        f"{key_header} -d '{body}'",
        "or with the OpenAI Python client:",
        "  from openai import OpenAI",
        f'  client = OpenAI(base_url="{base_url}/v1", api_key="{"<key>" if api_key else "none"}")',
        f'  reply = client.chat.completions.create(model="{model}", '
        'messages=[{"role": "user", "content": "Hello!"}])',
        "  print(reply.choices[0].message.content)",
    ])


def cmd_serve(args: argparse.Namespace) -> int:
    if args.lora_modules and not args.enable_lora:  # before anything loads
        print("kvflow serve: error: --lora-modules needs --enable-lora", file=sys.stderr)
        return 2
    from kvflow.engine.async_llm import AsyncLLM
    from kvflow.entrypoints.openai.server import bind_socket, build_app
    from kvflow.entrypoints.openai.serving_engine import ServingContext
    from kvflow.entrypoints.openai.serving_models import StaticLoRAError
    from kvflow.metrics import ServerMetrics

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args.model = args.model or args.model_option
    limits = ServerLimits.from_cli_args(args)  # a bad limit fails before the model loads
    api_key = args.api_key or os.environ.get("KVFLOW_API_KEY") or None
    sock = bind_socket(args.host, args.port)
    port = sock.getsockname()[1]
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
    engine_died = False
    try:
        with _children_ignore_sigint():
            engine = AsyncLLM.from_engine_args(_engine_args(args))
        # Everything loaded so far lives as long as the server: keep it out of every GC pass.
        gc.collect()
        gc.freeze()
        try:
            served = args.served_model_name or [args.model or engine.config.model_config.model]
            dp = engine.config.data_parallel_config
            metrics = ServerMetrics(served[0], lora=engine.config.lora_config is not None,
                                    num_engines=dp.size if dp else 1)
            ctx = ServingContext(engine, served, metrics, limits,
                                 lora_modules=args.lora_modules or ())
            app = build_app(ctx, api_key)
            text = usage_text(f"http://{shown_host}:{port}", served[0], api_key)
            engine_died = asyncio.run(_serve(app, ctx, sock, text, args))
        finally:
            engine.shutdown()
    except KeyboardInterrupt:
        pass
    except StaticLoRAError as exc:
        print(f"kvflow serve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        sock.close()
    # Non-zero after the engine died (as vLLM's server): a supervisor restarts the server.
    return 1 if engine_died else 0


async def _serve(app: FastAPI, ctx: ServingContext, sock: socket.socket, text: str,
                 args: argparse.Namespace) -> bool:
    """Load the --lora-modules adapters (StaticLoRAError: the server does not start), then
    serve; True when the engine died."""
    from kvflow.entrypoints.openai.server import serve_http

    try:
        await ctx.models.init_static_loras()
    except BaseException:
        ctx.close()  # the app's lifespan, which would close it, never runs
        raise
    if ctx.models.lora_requests:
        text += ("\nLoRA adapters (name one in `model`): "
                 + ", ".join(ctx.models.lora_requests))
    return await serve_http(app, sock, lambda: print(text, flush=True),
                            log_level=args.log_level.lower(),
                            access_log=not args.disable_access_log)


# ---- chat -----------------------------------------------------------------------------
def _chat_parser(sub: SubParsers) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (replies streamed)")
    p.add_argument("model", nargs="?", default=None,
                   help="model to load in-process (default: the packaged model)")
    p.add_argument("--url", default=None,
                   help="chat with a running server instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--model-name", default=None, help="model name to ask a --url server for")
    p.add_argument("--api-key", default=None, help="API key of a --url server")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    add_verbose_arg(p)
    AsyncEngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_chat)


class LocalChat:
    """Replies from an engine in this process."""

    def __init__(self, args: argparse.Namespace) -> None:
        from kvflow.engine.async_llm import AsyncLLM

        with _children_ignore_sigint():
            self.engine = AsyncLLM.from_engine_args(_engine_args(args))
        self.max_tokens = args.max_tokens
        self.temperature = args.temperature

    async def reply(self, messages: list[dict[str, str]], write: Callable[[str], None]) -> str:
        from kvflow.sampling_params import RequestOutputKind, SamplingParams

        prompt = self.engine.processor.apply_chat_template(messages)
        params = SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature,
                                output_kind=RequestOutputKind.DELTA)
        parts: list[str] = []
        async for out in self.engine.generate(prompt, params, f"chat-{uuid.uuid4().hex}"):
            parts.append(out.outputs[0].text)
            write(out.outputs[0].text)
        return "".join(parts)

    async def aclose(self) -> None:
        self.engine.shutdown()


class RemoteChat:
    """Replies from a running OpenAI-compatible server, streamed over SSE."""

    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        headers = {}
        key = args.api_key or os.environ.get("KVFLOW_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers,
                                        timeout=httpx.Timeout(600.0, connect=10.0))
        self.model = args.model_name
        self.max_tokens = args.max_tokens
        self.temperature = args.temperature

    async def reply(self, messages: list[dict[str, str]], write: Callable[[str], None]) -> str:
        from kvflow.entrypoints.bench_serve import iter_sse

        if self.model is None:
            models = (await self.client.get("/v1/models")).raise_for_status().json()
            self.model = models["data"][0]["id"]
        body = {"model": self.model, "messages": messages, "stream": True,
                "max_tokens": self.max_tokens, "temperature": self.temperature}
        parts: list[str] = []
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise RuntimeError(f"HTTP {response.status_code}: {response.text}")
            async for event in iter_sse(response):
                if "error" in event:
                    raise RuntimeError(event["error"].get("message", "stream failed"))
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content") or ""
                    parts.append(text)
                    write(text)
        return "".join(parts)

    async def aclose(self) -> None:
        await self.client.aclose()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_chat(args: argparse.Namespace) -> int:
    backend: LocalChat | RemoteChat = RemoteChat(args) if args.url else LocalChat(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    loop = asyncio.new_event_loop()
    print("kvflow chat: type a message; /exit or Ctrl-D quits, Ctrl-C stops a reply.")
    try:
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print()
                break
            if line.strip() in ("/exit", "/quit"):
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            reply = _run_reply(loop, backend, messages)
            messages.append({"role": "assistant", "content": reply})
    finally:
        loop.run_until_complete(backend.aclose())
        loop.close()
    return 0


def _run_reply(loop: asyncio.AbstractEventLoop, backend: LocalChat | RemoteChat,
               messages: list[dict[str, str]]) -> str:
    """Stream one reply; Ctrl-C cancels it (the engine aborts the request) and keeps it."""
    task = loop.create_task(backend.reply(list(messages), _write))
    try:
        reply = loop.run_until_complete(task)
    except KeyboardInterrupt:
        task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(task)
        print(" [stopped]")
        return ""
    except Exception as exc:
        print(f"\n[error: {exc}]")
        return ""
    print()
    return reply


# ---- bench ----------------------------------------------------------------------------
def _bench_parser(sub: SubParsers) -> None:
    from kvflow.entrypoints.bench_serve import add_bench_serve_args

    p = sub.add_parser("bench", help="benchmarks")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    serve = bench_sub.add_parser(
        "serve", help="load an OpenAI-compatible server and report latency and throughput")
    add_bench_serve_args(serve)
    serve.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from kvflow.entrypoints.bench_serve import main

    try:
        result: dict[str, Any] = main(args)
    except Exception as exc:  # e.g. no server there, or the warm-up request failed
        print(f"kvflow bench serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0 if result.get("completed", 0) > 0 else 1

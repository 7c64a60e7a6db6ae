"""A LoRA-serving app in this process, served by uvicorn on a loop thread, and test adapters.

In-process (unlike RemoteServer) so that a test can reach the engine the server uses: ask it
for list_loras(), or run the same request through AsyncLLM directly.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import uvicorn

from kvflow.config import AsyncEngineArgs
from kvflow.engine.async_llm import AsyncLLM
from kvflow.entrypoints.openai.http_protocol import guarded_protocol
from kvflow.entrypoints.openai.limits import ServerLimits
from kvflow.entrypoints.openai.server import RUNTIME_LORA_ENV, bind_socket, build_app
from kvflow.entrypoints.openai.serving_engine import ServingContext
from kvflow.entrypoints.openai.serving_models import LoRAModulePath
from kvflow.lora.request import LoRARequest
from kvflow.metrics import ServerMetrics
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams
from tests.entrypoints.hostile import wait_for_no_leftovers
from tests.lora.adapters import make_adapter

T = TypeVar("T")


def make_test_adapters(base: Path, folder: Path) -> dict[str, Path]:
    """Good adapters (sql, chat, other) and bad ones (each refused for one reason)."""
    paths = {
        "sql": make_adapter(base, folder / "sql", 8, ["q_proj", "v_proj"], seed=1),
        "chat": make_adapter(base, folder / "chat", 4, ["o_proj", "down_proj", "k_proj"],
                             seed=2),
        "other": make_adapter(base, folder / "other", 8, ["q_proj", "gate_proj"], seed=3),
        "dora": make_adapter(base, folder / "dora", 4, ["q_proj"], seed=4, use_dora=True),
        "big": make_adapter(base, folder / "big", 32, ["q_proj"], seed=5),  # rank > 16
    }
    corrupt = folder / "corrupt"
    shutil.copytree(paths["sql"], corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # the header promises more
    paths["corrupt"] = corrupt
    paths["missing"] = folder / "no-such-adapter"
    return paths


class LoRAServer:
    """build_app over an AsyncLLM of this process; a context manager."""

    def __init__(self, engine_args: AsyncEngineArgs, served: list[str],
                 lora_modules: list[LoRAModulePath], runtime_updating: bool,
                 limits: ServerLimits | None = None) -> None:
        self.engine = AsyncLLM.from_engine_args(engine_args)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._serving: Any = None
        try:
            self.ctx = ServingContext(self.engine, served, ServerMetrics(served[0], lora=True),
                                      limits or ServerLimits(), lora_modules=lora_modules)
            self.call(self.ctx.models.init_static_loras())
            with pytest.MonkeyPatch.context() as env:
                if runtime_updating:
                    env.setenv(RUNTIME_LORA_ENV, "True")
                else:
                    env.delenv(RUNTIME_LORA_ENV, raising=False)
                self.app = build_app(self.ctx)
            self.server, self.port, self._serving = self.serve(self.app)
        except BaseException:
            self.close()
            raise

    def serve(self, app: Any, lifespan: str = "on") -> tuple[uvicorn.Server, int, Any]:
        """Serve an app on a free port from the loop thread; wait until it listens."""
        sock = bind_socket("127.0.0.1", 0)
        config = uvicorn.Config(app, log_config=None, log_level="warning", lifespan=lifespan,
                                http=guarded_protocol(self.ctx.limits.request_read_timeout_s))
        server = uvicorn.Server(config)
        serving = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), self.loop)
        deadline = time.monotonic() + 30
        while not server.started:
            assert not serving.done(), serving.exception()
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return server, sock.getsockname()[1], serving

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the server's loop (where the engine's output handler lives)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url("/v1"), api_key="none", max_retries=0,
                             **kwargs)

    def post(self, path: str, body: Any, timeout: float = 60) -> httpx.Response:
        content = body if isinstance(body, bytes) else None
        return httpx.post(self.url(path), json=None if content else body, content=content,
                          headers={"content-type": "application/json"}, timeout=timeout)

    def generate(self, ids: list[int], params: SamplingParams, lora: LoRARequest | None,
                 request_id: str) -> list[int]:
        """Greedy token ids of the same request made through AsyncLLM directly."""
        async def run() -> list[int]:
            last: RequestOutput | None = None
            async for out in self.engine.generate({"prompt_token_ids": ids}, params,
                                                  request_id, lora_request=lora):
                last = out
            assert last is not None
            return list(last.outputs[0].token_ids)
        return self.call(run())

    def assert_no_leaks(self) -> None:
        """The server tests' check (no request state, no KV block held), then the engine's."""
        leftovers = wait_for_no_leftovers(self)  # type: ignore[arg-type]
        assert not leftovers, f"request state left: {leftovers}"
        assert not self.ctx.in_flight and not self.ctx.models._queuing
        assert self.call(self.engine.get_num_unfinished_requests_in_core()) == 0
        assert not self.engine.has_unfinished_requests()

    def close(self) -> None:
        try:
            if self._serving is not None:
                self.server.should_exit = True
                self._serving.result(30)  # the lifespan aborts, stops the engine, closes ctx
        finally:
            self.engine.shutdown()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def __enter__(self) -> LoRAServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Sleep mode over HTTP (issue 19, "Must show" 3, server side). With KVFLOW_SERVER_DEV_MODE=1
and --enable-sleep-mode, POST /sleep frees the engine core's KV cache (its RSS drops), waits
for in-flight requests, holds new ones until POST /wake_up, and the greedy text after waking
(at level 1 or 2, waking all at once or in parts) equals the text before. Bad levels and tags
are OpenAI-shaped 400s; /sleep without --enable-sleep-mode is a 400, without dev mode a 404.
Every test on a server ends with a leak check (the /metrics leak gauges back to 0; a client
that gave up while its request was held leaves nothing either).

One `kvflow serve` process on the tiny random Llama with a 0.25 GiB KV cache (touched at
start, so sleeping returns it to the system); a second, short one without sleep mode; the
no-dev-mode app is built in-process (its routes are fixed when the app is built).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import openai
import psutil
import pytest
from fastapi.testclient import TestClient

from kvflow.entrypoints.openai.server import DEV_MODE_ENV, build_app
from kvflow.entrypoints.openai.serving_engine import ServingContext
from tests.entrypoints.conftest import RemoteServer
from tests.entrypoints.hostile import assert_error, wait_for_no_leftovers
from tests.entrypoints.vision_server import counters

MODEL = "tiny-llama"
# two full 16-token KV blocks and more: a repeat hits the prefix cache
PROMPT = "The capital of France is Paris, and the capital of Italy is Rome. " * 3
HITS = "kvflow:prefix_cache_hits_total"
MAX_TOKENS = 8
STREAM_TOKENS = 48
KV_GB = 0.25
KV_BYTES = int(KV_GB * 2**30)
DEV_ENV = {DEV_MODE_ENV: "1"}
ENGINE_ARGS = ["--dtype", "float32", "--served-model-name", MODEL, "--max-model-len", "1024",
               "--num-threads", "1", "--disable-log-stats", "--disable-access-log"]
HOLD_S = 1.0  # a held request is still unanswered this long after it was sent
DEV_PATHS = [("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping"),
             ("POST", "/reset_prefix_cache")]


@pytest.fixture(scope="module")
def server(tiny_llama_path: Path) -> Iterator[RemoteServer]:
    args = [str(tiny_llama_path), *ENGINE_ARGS, "--kv-cache-memory-gb", str(KV_GB),
            "--enable-sleep-mode"]
    with RemoteServer(args, env=DEV_ENV) as remote:
        yield remote


def greedy(server: RemoteServer, max_tokens: int = MAX_TOKENS) -> str:
    """The greedy completion of PROMPT, all `max_tokens` of it."""
    out = server.client(timeout=120).completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=max_tokens,
        extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length", out
    assert out.usage is not None and out.usage.completion_tokens == max_tokens, out.usage
    return out.choices[0].text


def dev_call(server: RemoteServer, method: str, path: str, **params: Any) -> httpx.Response:
    return httpx.request(method, server.url(path), params=params, timeout=60)


def control(server: RemoteServer, path: str, **params: Any) -> None:
    """POST /sleep or /wake_up; it must succeed."""
    response = dev_call(server, "POST", path, **params)
    assert response.status_code == 200, (response.status_code, response.text[:500])


def is_sleeping(server: RemoteServer) -> bool:
    response = dev_call(server, "GET", "/is_sleeping")
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert set(body) == {"is_sleeping"} and isinstance(body["is_sleeping"], bool), body
    return bool(body["is_sleeping"])


def prefix_cache_hits(server: RemoteServer) -> float:
    return counters(server.url("/metrics"))[HITS]


def engine_rss(server: RemoteServer) -> int:
    return int(psutil.Process(server.engine_pid()).memory_info().rss)


def test_level_1_frees_the_kv_cache_and_holds_requests_until_wake_up(
        server: RemoteServer, record_property: Any) -> None:
    before = greedy(server)
    assert greedy(server) == before
    hits = prefix_cache_hits(server)
    assert hits > 0  # the prompt's blocks are cached
    resident = engine_rss(server)
    control(server, "/sleep", level=1)
    dropped = resident - engine_rss(server)
    record_property("level_1_rss_drop_mib", round(dropped / 2**20))
    assert is_sleeping(server)
    assert dropped >= 0.5 * KV_BYTES, f"engine core RSS fell by {dropped / 2**20:.0f} MiB only"
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(greedy, server)
        time.sleep(HOLD_S)
        assert not held.done(), "a request sent while asleep was answered before wake_up"
        assert is_sleeping(server)
        assert httpx.get(server.url("/health"), timeout=10).status_code == 200
        with pytest.raises(openai.APITimeoutError):  # a client that gives up while held
            server.client(timeout=HOLD_S).completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS)
        control(server, "/wake_up")
        assert held.result(timeout=120) == before
    # sleep dropped the index with the KV: the first run after waking computed everything
    assert prefix_cache_hits(server) == hits
    assert not is_sleeping(server)
    assert greedy(server) == before
    assert prefix_cache_hits(server) > hits  # the index is rebuilt from the new KV
    assert wait_for_no_leftovers(server) == {}


def test_sleep_waits_for_the_request_in_flight(server: RemoteServer) -> None:
    stream = server.client(timeout=120).completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=STREAM_TOKENS, stream=True,
        extra_body={"ignore_eos": True})
    chunks = iter(stream)
    texts = [next(chunks).choices[0].text]  # the request is in the engine now
    finish = None
    with ThreadPoolExecutor(1) as pool:
        slept = pool.submit(control, server, "/sleep", level=1)
        for chunk in chunks:
            texts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        slept.result(timeout=120)  # 200: the core refuses to sleep with a request in it
    assert finish == "length"  # not aborted: it ran to the end
    assert is_sleeping(server)
    control(server, "/wake_up")
    assert "".join(texts) == greedy(server, STREAM_TOKENS)
    assert wait_for_no_leftovers(server) == {}


def test_level_2_wakes_in_parts(server: RemoteServer, record_property: Any) -> None:
    before = greedy(server)
    resident = engine_rss(server)
    control(server, "/sleep", level=2)
    record_property("level_2_rss_drop_mib", round((resident - engine_rss(server)) / 2**20))
    assert is_sleeping(server)
    control(server, "/wake_up", tags="weights")
    assert is_sleeping(server)  # the KV cache still sleeps
    control(server, "/wake_up", tags="kv_cache")
    assert not is_sleeping(server)
    assert greedy(server) == before
    assert wait_for_no_leftovers(server) == {}


def test_bad_level_and_tag_are_400s(server: RemoteServer) -> None:
    error = assert_error(dev_call(server, "POST", "/sleep", level=3), 400, param="level",
                         contains="level")
    assert "3" in error["message"], error
    # not an integer: FastAPI's validation, as a 400 (its param is "query.level")
    assert_error(dev_call(server, "POST", "/sleep", level="two"), 400, contains="level")
    error = assert_error(dev_call(server, "POST", "/wake_up", tags="bogus"), 400, param="tags")
    assert "bogus" in error["message"], error
    assert not is_sleeping(server)  # a refused call changes nothing
    greedy(server)
    assert wait_for_no_leftovers(server) == {}


def test_without_sleep_mode_sleep_is_a_400(tiny_llama_path: Path) -> None:
    args = [str(tiny_llama_path), *ENGINE_ARGS, "--kv-cache-memory-gb", "0.05"]
    with RemoteServer(args, env=DEV_ENV) as remote:
        assert_error(dev_call(remote, "POST", "/sleep"), 400, contains="sleep mode is off")
        assert not is_sleeping(remote)
        greedy(remote)
        assert wait_for_no_leftovers(remote) == {}


def test_without_dev_mode_the_paths_are_404s(monkeypatch: pytest.MonkeyPatch) -> None:
    # The routes are chosen when the app is built, and none is called: a stand-in context.
    ctx = cast(ServingContext, SimpleNamespace())
    monkeypatch.delenv(DEV_MODE_ENV, raising=False)
    app = build_app(ctx)
    client = TestClient(app)  # not entered: its lifespan would stop the engine
    for method, path in DEV_PATHS:
        response = cast(httpx.Response, client.request(method, path))  # httpx2 there: alike
        assert_error(response, 404)
    assert not {path for _, path in DEV_PATHS} & set(app.openapi()["paths"])
    monkeypatch.setenv(DEV_MODE_ENV, "1")
    paths = build_app(ctx).openapi()["paths"]
    assert {(method, path) for method, path in DEV_PATHS
            if method.lower() in paths.get(path, {})} == set(DEV_PATHS)

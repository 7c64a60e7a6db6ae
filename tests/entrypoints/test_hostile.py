"""Hostile clients against a real `kvflow serve` (issue 14).

Each abuse gets a fast, OpenAI-shaped 4xx (a 503 under overload) while /health keeps
answering, memory stays flat, and no request state is left behind: every case runs under
`hostile.watch` (a /health poller, an RSS sampler, then a /metrics leak check).

    server   TINY_ARGS: the request bounds (sections A-G, J, K)
    guarded  client templates trusted, batch of 2 + 2 waiting, 2 s body deadline (B, H, I)
    victim   TINY_ARGS again, for the known gaps that keep a server busy for a while (slow)

A case marked xfail(strict=False) is a known transient memory peak while a body is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.entrypoints.conftest import TINY_ARGS, RemoteServer
from tests.entrypoints.hostile import (
    assert_error,
    post,
    read_response,
    send_partial_body,
    watch,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
TOKENIZE = "/tokenize"
HELLO = [{"role": "user", "content": "Hi"}]
BIG = 10**30
INT64_MAX = 2**63 - 1
VOCAB = 49_152
CPU_BOMB = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
MEMORY_BOMB = "{{ 'x' * 2000000000 }}"
# The second server: client templates allowed, a batch of 2 plus 2 waiting, a 2 s body deadline.
GUARDED_ARGS = [*TINY_ARGS, "--trust-request-chat-template", "--max-num-seqs", "2",
                "--max-waiting-requests", "2", "--request-read-timeout-s", "2"]
TEMPLATE_TIMEOUT_S = 1.5  # the server's default --chat-template-timeout-s


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    with RemoteServer(TINY_ARGS) as remote:
        yield remote


@pytest.fixture(scope="module")
def guarded() -> Iterator[RemoteServer]:
    with RemoteServer(GUARDED_ARGS) as remote:
        yield remote


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": HELLO, "max_tokens": 2, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"prompt": "Hi", "max_tokens": 2, **fields}


def _short(path: str) -> str:
    return {CHAT: "chat", COMPLETIONS: "cmpl", TOKENIZE: "tokenize"}.get(path, path)


def case(path: str, body: Any, param: str | None, status: int = 400, contains: str | None = None,
         *, id: str) -> Any:
    return pytest.param(path, body, status, param, contains, id=id)


def refused(server: RemoteServer, path: str, body: Any, status: int, param: str | None,
            contains: str | None = None) -> dict[str, Any]:
    """Send one hostile request under the watchers; it must be refused fast and cleanly.

    A big body comes as a function that builds it: tables of them cost nothing to collect.
    """
    body = body() if callable(body) else body
    # serialized first: a long json.dumps here would hold the GIL the /health poller needs
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    with watch(server):
        error = assert_error(post(server, path, body), status, param, contains=contains)
    return error


def both(**fields: Any) -> list[tuple[str, dict[str, Any]]]:
    """The same fields on /v1/completions and /v1/chat/completions (a fix may miss one)."""
    return [(COMPLETIONS, completion(**fields)), (CHAT, chat(**fields))]


def both_lazy(make_fields: Callable[[], dict[str, Any]]
              ) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """As `both`, for fields too big to build at collection."""
    return [(COMPLETIONS, lambda: completion(**make_fields())),
            (CHAT, lambda: chat(**make_fields()))]


# ---- A. n and best_of --------------------------------------------------------------------
N_CASES = [
    case(path, body(n=n), "n", id=f"{name}-n={n}")
    for name, path, body in (("cmpl", COMPLETIONS, completion), ("chat", CHAT, chat))
    for n in (2**63, 2**64 + 1, -(2**63) - 1, 1_000_000, 129)
] + [
    case(COMPLETIONS, completion(n=1e300), "n", id="cmpl-n-float"),
    case(COMPLETIONS, completion(best_of=BIG), "best_of", id="cmpl-best_of-huge"),
    case(CHAT, chat(best_of=BIG), "best_of", id="chat-best_of-huge"),
    case(COMPLETIONS, completion(best_of=129), "best_of", id="cmpl-best_of-129"),
    case(CHAT, chat(n=129, best_of=129), "n", id="chat-n-and-best_of-129"),
    # prompts x n past the server's capacity (max_num_seqs + waiting bound) can never run
    case(COMPLETIONS, completion(prompt=["Hi"] * 256, n=128), "n", id="prompts-x-n"),
    case(COMPLETIONS, completion(prompt=[[1, 2]] * 256, n=128), "n", id="id-prompts-x-n"),
]


@pytest.mark.parametrize("path,body,status,param,contains", N_CASES)
def test_huge_n_and_best_of(server: RemoteServer, path: str, body: Any, status: int,
                            param: str, contains: str | None) -> None:
    refused(server, path, body, status, param, contains)


# ---- B. chat templates from the request -----------------------------------------------
TEMPLATE_CASES = [
    case(TOKENIZE, {"messages": HELLO, "chat_template_kwargs": {"chat_template": "x"}},
         "chat_template_kwargs", id="tokenize-kwargs-template"),
    case(CHAT, chat(chat_template_kwargs={"chat_template": "x"}), "chat_template_kwargs",
         id="chat-kwargs-template"),
    case(CHAT, chat(chat_template_kwargs={"chat_template": 5}), "chat_template_kwargs",
         id="chat-kwargs-template-not-str"),
    case(CHAT, chat(chat_template="x"), "chat_template", id="chat-template"),
    case(TOKENIZE, {"messages": HELLO, "chat_template": "x"}, "chat_template",
         id="tokenize-template"),
    case(CHAT, chat(chat_template=CPU_BOMB), "chat_template", id="chat-template-bomb"),
    case(CHAT, chat(chat_template_kwargs={"tools": [{"type": "function"}]}),
         "chat_template_kwargs", id="chat-kwargs-tools"),
    case(TOKENIZE, {"messages": HELLO, "chat_template_kwargs": {"documents": [{"t": "x"}]}},
         "chat_template_kwargs", id="tokenize-kwargs-documents"),
    *[case(path, {**body, "chat_template_kwargs": {key: value}}, "chat_template_kwargs",
           id=f"{name}-kwargs-{key}")
      for name, path, body in (("chat", CHAT, chat()), ("tokenize", TOKENIZE, {"messages": HELLO}))
      for key, value in (("tokenize", True), ("return_dict", True), ("messages", []),
                         ("tokenizer_kwargs", {}), ("return_tensors", "pt"))],
    case(CHAT, chat(chat_template_kwargs="x"), "chat_template_kwargs", id="chat-kwargs-not-dict"),
]


@pytest.mark.parametrize("path,body,status,param,contains", TEMPLATE_CASES)
def test_request_templates_refused(server: RemoteServer, path: str, body: Any, status: int,
                                   param: str, contains: str | None) -> None:
    refused(server, path, body, status, param, contains)


BOMBS = [
    pytest.param(CHAT, {"chat_template": CPU_BOMB}, id="chat-cpu-bomb"),
    pytest.param(TOKENIZE, {"chat_template_kwargs": {"chat_template": CPU_BOMB}},
                 id="tokenize-kwargs-cpu-bomb"),
    pytest.param(CHAT, {"chat_template": MEMORY_BOMB}, id="chat-memory-bomb"),
    pytest.param(TOKENIZE, {"chat_template": MEMORY_BOMB}, id="tokenize-memory-bomb"),
    pytest.param(CHAT, {"chat_template": "{{ 'x'|center(2000000000) }}"}, id="filter-bomb"),
    pytest.param(CHAT, {"chat_template": "{{ [0] * 1000000000 }}"}, id="list-bomb"),
    pytest.param(CHAT, {"chat_template": "{% set ns = namespace(s='x') %}{% for i in range(40) %}"
                        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"}, id="concat-bomb"),
    pytest.param(CHAT, {"chat_template": "{{ 7 ** 100000000 }}"}, id="power-bomb"),
    pytest.param(CHAT, {"chat_template": "{% for i in range(100000) %}{{ 'x' * 80000 }}"
                        "{% endfor %}"}, id="output-bomb"),
    pytest.param(CHAT, {"chat_template": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"},
                 id="recursion-bomb"),
    pytest.param(CHAT, {"chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"},
                 id="sandbox-escape"),
    pytest.param(CHAT, {"chat_template": "{% if %}"}, id="syntax-error"),
]


@pytest.mark.parametrize("path,fields", BOMBS)
def test_template_bombs_are_400(guarded: RemoteServer, path: str, fields: dict[str, Any]) -> None:
    body = {"messages": HELLO, **fields, **({"max_tokens": 2} if path == CHAT else {})}
    with watch(guarded):
        # the render's deadline, the worker's restart, and slack for two shared cores
        assert_error(post(guarded, path, body), 400, "messages",
                     within_s=TEMPLATE_TIMEOUT_S + 3)
    assert guarded.proc.poll() is None


BENIGN_TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"


def test_benign_request_template_works(guarded: RemoteServer) -> None:
    with watch(guarded):
        # right after a bomb killed the renderer, the next template is not slowed by it
        post(guarded, CHAT, chat(chat_template=CPU_BOMB))
        for fields in ({"chat_template": BENIGN_TEMPLATE},
                       {"chat_template_kwargs": {"chat_template": BENIGN_TEMPLATE}}):
            tokens = post(guarded, TOKENIZE, {"messages": HELLO, **fields})
            assert tokens.status_code == 200, tokens.text
            assert tokens.elapsed.total_seconds() < 3
            expected = post(guarded, TOKENIZE, {"prompt": "[user] Hi\n",
                                                "add_special_tokens": False}).json()
            assert tokens.json()["tokens"] == expected["tokens"]
        reply = post(guarded, CHAT, chat(chat_template=BENIGN_TEMPLATE))
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens"] == expected["count"]


def test_template_bombs_do_not_stall_other_requests(guarded: RemoteServer) -> None:
    async def scenario() -> list[float]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=50)) as c:
            stop = asyncio.Event()

            async def attacker() -> None:
                while not stop.is_set():
                    await c.post(guarded.url(CHAT), json=chat(chat_template=CPU_BOMB))

            attackers = [asyncio.ensure_future(attacker()) for _ in range(6)]
            await asyncio.sleep(1.0)
            latencies = []
            for _ in range(3):
                reply = await c.post(guarded.url(COMPLETIONS), json=completion(max_tokens=1))
                assert reply.status_code == 200, reply.text
                latencies.append(reply.elapsed.total_seconds())
            stop.set()
            await asyncio.gather(*attackers)
            return latencies

    with watch(guarded):
        latencies = asyncio.run(scenario())
    assert sorted(latencies)[len(latencies) // 2] < TEMPLATE_TIMEOUT_S, latencies


# ---- C. bad_words -------------------------------------------------------------------------
BAD_WORDS_CASES = [
    case(path, body, "bad_words", id=f"{_short(path)}-20000-words")
    for path, body in both_lazy(lambda: {"bad_words": [f"w{i}" for i in range(20_000)]})
] + [
    case(COMPLETIONS, completion(bad_words=["w" * 2000]), "bad_words", id="one-long-word"),
    case(CHAT, chat(bad_words=["ok", "w" * 2000]), "bad_words", id="chat-one-long-word"),
]


@pytest.mark.parametrize("path,body,status,param,contains", BAD_WORDS_CASES)
def test_too_many_bad_words(server: RemoteServer, path: str, body: Any, status: int,
                            param: str, contains: str | None) -> None:
    refused(server, path, body, status, param, contains)


def test_1000_bad_words_are_served(server: RemoteServer) -> None:
    with watch(server):
        reply = post(server, COMPLETIONS, completion(bad_words=[f"w{i}" for i in range(1000)]))
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["finish_reason"] == "length"


# ---- D. integers out of range ------------------------------------------------------------
OVERFLOW_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("seed-2**64", {"seed": 2**64}, "seed"),
    ("seed-below-int64", {"seed": -(2**63) - 1}, "seed"),
    ("top_k", {"top_k": BIG}, "top_k"),
    ("priority", {"priority": BIG}, "priority"),
    ("priority-negative", {"priority": -BIG}, "priority"),
    ("max_tokens", {"max_tokens": BIG}, "max_tokens"),
    ("max_tokens-int64", {"max_tokens": INT64_MAX}, "max_tokens"),
    ("min_tokens", {"min_tokens": BIG}, "min_tokens"),
    ("n3-seed-2**64", {"n": 3, "seed": 2**64}, "seed"),
    ("prompt_logprobs", {"prompt_logprobs": BIG}, "prompt_logprobs"),
    ("truncate_prompt_tokens", {"truncate_prompt_tokens": BIG}, "truncate_prompt_tokens"),
    ("stop_token_ids", {"stop_token_ids": [BIG]}, "stop_token_ids"),
    ("stop_token_ids-int64", {"stop_token_ids": [INT64_MAX]}, "stop_token_ids"),
    ("allowed_token_ids", {"allowed_token_ids": [BIG]}, "allowed_token_ids"),
    ("logit_bias-key", {"logit_bias": {str(BIG): 1}}, "logit_bias"),
    ("logit_bias-value", {"logit_bias": {"1": 1e308}}, "logit_bias"),
]
OVERFLOW_CASES = [
    case(path, body, param, id=f"{_short(path)}-{name}")
    for name, fields, param in OVERFLOW_FIELDS for path, body in both(**fields)
] + [
    case(CHAT, chat(max_completion_tokens=BIG), "max_completion_tokens", id="chat-max_compl"),
    case(CHAT, chat(logprobs=True, top_logprobs=BIG), "top_logprobs", id="chat-top_logprobs"),
    case(COMPLETIONS, completion(logprobs=BIG), "logprobs", id="cmpl-logprobs"),
    case(COMPLETIONS, completion(prompt=[BIG]), None, id="cmpl-token-id"),
    case(COMPLETIONS, completion(prompt=[[1], [INT64_MAX]]), None, id="cmpl-nested-token-id"),
    case("/detokenize", {"tokens": [BIG]}, "tokens", id="detokenize-token-id"),
]


@pytest.mark.parametrize("path,body,status,param,contains", OVERFLOW_CASES)
def test_out_of_range_integers(server: RemoteServer, path: str, body: Any, status: int,
                               param: str | None, contains: str | None) -> None:
    refused(server, path, body, status, param, contains)


def test_edge_of_int64_is_served(server: RemoteServer) -> None:
    # n children get seeds seed, seed+1, ...: at INT64_MAX they must not overflow
    with watch(server):
        for path, body in both(n=3, seed=INT64_MAX, priority=-(2**63), top_k=INT64_MAX):
            reply = post(server, path, body)
            assert reply.status_code == 200, reply.text
            assert len(reply.json()["choices"]) == 3


def _overflow_burst(count: int) -> list[tuple[str, dict[str, Any]]]:
    """A mix of requests refused at parsing and refused later, by the engine's own checks."""
    late: list[dict[str, Any]] = [{"stop_token_ids": [VOCAB + 5]},
                                  {"logit_bias": {str(VOCAB + 5): 1}},
                                  {"min_tokens": 5, "max_tokens": 2}]
    mixed = [fields for _, fields, _ in OVERFLOW_FIELDS] + late
    return [both(**mixed[i % len(mixed)])[i % 2] for i in range(count)]


def test_burst_of_300_overflows(server: RemoteServer) -> None:
    requests = _overflow_burst(300)

    async def fire() -> list[httpx.Response | BaseException]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            sends = [client.post(server.url(path), json=body) for path, body in requests]
            return await asyncio.gather(*sends, return_exceptions=True)

    with watch(server):
        replies = asyncio.run(fire())
    failures = [r for r in replies if isinstance(r, BaseException)]
    assert not failures, failures[:3]  # no connection reset, no timeout
    for reply in replies:
        assert isinstance(reply, httpx.Response)
        assert_error(reply, 400, within_s=30)  # queued behind 299 others


# ---- E. invalid Unicode --------------------------------------------------------------------
SURROGATE_BODIES = [
    pytest.param(COMPLETIONS, rb'{"prompt": "a\ud800b", "max_tokens": 1}', "prompt", id="prompt"),
    pytest.param(COMPLETIONS, rb'{"prompt": ["ok", "a\udc00"], "max_tokens": 1}', "prompt.1",
                 id="prompt-list"),
    pytest.param(CHAT, rb'{"messages": [{"role": "user", "content": "a\ud800"}]}',
                 "messages.0.content", id="chat-content"),
    pytest.param(CHAT, rb'{"messages": [{"role": "user", "content": '
                 rb'[{"type": "text", "text": "\udbff"}]}]}', "messages.0.content.0.text",
                 id="chat-content-part"),
    pytest.param(CHAT, rb'{"messages": [{"role": "us\ud800er", "content": "a"}]}',
                 "messages.0.role", id="chat-role"),
    pytest.param(CHAT, rb'{"messages": [{"role": "user", "content": "a", "name": "\udfff"}]}',
                 "messages.0.name", id="chat-name"),
    pytest.param(COMPLETIONS, rb'{"prompt": "a", "stop": ["\ud800"]}', "stop.0", id="stop-list"),
    pytest.param(CHAT, rb'{"messages": [{"role": "user", "content": "a"}], "stop": "x\ud800"}',
                 "stop", id="chat-stop"),
    pytest.param(COMPLETIONS, rb'{"prompt": "a", "bad_words": ["\ud83d"]}', "bad_words.0",
                 id="bad_words"),
    pytest.param(CHAT, rb'{"messages": [{"role": "user", "content": "a"}], '
                 rb'"chat_template_kwargs": {"x": "\ud800"}}', "chat_template_kwargs.x",
                 id="chat-template-kwargs"),
    pytest.param(TOKENIZE, rb'{"prompt": "\udc00\ud800"}', "prompt", id="tokenize-prompt"),
    pytest.param(TOKENIZE, rb'{"messages": [{"role": "user", "content": "a\ud800"}]}',
                 "messages.0.content", id="tokenize-chat"),
    # the field's own name holds the lone surrogate: the answer names it escaped
    pytest.param(COMPLETIONS, rb'{"prompt": "a", "\ud800": 1}', None, id="object-key"),
    pytest.param(CHAT, rb'{"messages": [{"role": "user", "content": "a"}], '
                 rb'"chat_template_kwargs": {"k\udfffey": 1}}', None, id="nested-object-key"),
]


@pytest.mark.parametrize("path,data,param", SURROGATE_BODIES)
def test_lone_surrogates(server: RemoteServer, path: str, data: bytes, param: str | None) -> None:
    escape = data.lower().find(b"\\ud")
    error = refused(server, path, data, 400, param, "surrogate")
    assert f"line 1 column {escape + 1}" in error["message"], error


INVALID_UTF8 = [
    pytest.param(COMPLETIONS, b'{"prompt": "a\xff\xfeb"}', id="prompt-ff"),
    pytest.param(CHAT, b'{"messages": [{"role": "user", "content": "a\xc3"}]}', id="chat-cut"),
    pytest.param(COMPLETIONS, b'{"prompt": "\xed\xa0\x80"}', id="utf8-surrogate"),
    pytest.param(TOKENIZE, b'{"prompt": "\xc0\xaf"}', id="tokenize-overlong"),
    pytest.param(COMPLETIONS, b'{"prompt": "a", "stop": ["\xf8\x88\x80\x80\x80"]}', id="stop"),
]


@pytest.mark.parametrize("path,data", INVALID_UTF8)
def test_invalid_utf8(server: RemoteServer, path: str, data: bytes) -> None:
    offset = next(i for i, b in enumerate(data) if b >= 0x80)
    error = refused(server, path, data, 400, None, "not UTF-8")
    assert f"offset {offset}" in error["message"], error


def test_valid_escapes_are_not_mistaken(server: RemoteServer) -> None:
    with watch(server):
        for data in (rb'{"prompt": "a\ud83d\ude00", "max_tokens": 1}',  # a pair: one emoji
                     rb'{"prompt": "a\\ud800", "max_tokens": 1}',  # an escaped backslash
                     '{"prompt": "€ 你好", "max_tokens": 1}'.encode()):
            reply = post(server, COMPLETIONS, data)
            assert reply.status_code == 200, (data, reply.text)


# ---- F. big bodies and long prompts ----------------------------------------------------
def ten_mb() -> str:
    return "a " * 5_000_000


BIG_PROMPT_CASES = [
    case(COMPLETIONS, lambda: completion(prompt=ten_mb()), "prompt", id="cmpl-10MB"),
    case(COMPLETIONS, lambda: completion(prompt=["Hi", ten_mb()]), "prompt",
         id="cmpl-10MB-in-list"),
    case(CHAT, lambda: chat(messages=[{"role": "user", "content": ten_mb()}]), "messages",
         id="chat-10MB"),
    # 250k parts (6 MB): +130 MB while parsed; 500k (12 MB) reach +257 MB (reported)
    case(CHAT, lambda: chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}]
                                       * 250_000}]), "messages", id="chat-250k-parts"),
    case(TOKENIZE, lambda: {"prompt": ten_mb()}, "prompt", id="tokenize-10MB"),
    case(TOKENIZE, lambda: {"messages": [{"role": "user", "content": ten_mb()}]}, "messages",
         id="tokenize-chat-10MB"),
    case(COMPLETIONS, lambda: completion(prompt="你" * 1_000_000), "prompt", id="cmpl-3MB-cjk"),
    case(COMPLETIONS, lambda: completion(prompt=list(range(100_000))), "prompt",
         id="cmpl-100k-ids"),
    case(COMPLETIONS, lambda: completion(prompt=[[1, 2], list(range(100_000))]), "prompt",
         id="cmpl-nested-100k-ids"),
    case(COMPLETIONS, lambda: completion(prompt=[1] * 2_000_000), "prompt", id="cmpl-2M-ids"),
    case(COMPLETIONS, completion(prompt=list(range(1024))), "prompt", id="cmpl-1024-ids"),
    case(COMPLETIONS, lambda: completion(prompt="a" * 20_000_000), None, 413, id="cmpl-20MB"),
    case(CHAT, lambda: chat(messages=[{"role": "user", "content": "a" * 20_000_000}]), None,
         413, id="chat-20MB"),
    case(TOKENIZE, lambda: {"prompt": "a" * 20_000_000}, None, 413, id="tokenize-20MB"),
    case("/detokenize", lambda: {"tokens": [1] * 9_000_000}, None, 413, id="detokenize-20MB"),
    case(COMPLETIONS, lambda: b'{"prompt": ' + b"[" * 1_000_000 + b"]" * 1_000_000 + b"}",
         None, id="deeply-nested"),
]


@pytest.mark.parametrize("path,body,status,param,contains", BIG_PROMPT_CASES)
def test_big_prompts(server: RemoteServer, path: str, body: Any, status: int,
                     param: str | None, contains: str | None) -> None:
    refused(server, path, body, status, param, contains)


def test_20mb_without_content_length(server: RemoteServer) -> None:
    def chunks() -> Iterator[bytes]:  # chunked encoding: the size is only known while reading
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"a" * 1_000_000
        yield b'"}'

    with watch(server):
        reply = httpx.post(server.url(COMPLETIONS), content=chunks(), timeout=60,
                           headers={"content-type": "application/json"})
        assert "content-length" not in reply.request.headers
        assert_error(reply, 413)


# ---- G. long lists ------------------------------------------------------------------------
LIST_CASES = [
    *[case(path, body, "stop", id=f"{_short(path)}-50000-stops")
      for path, body in both_lazy(lambda: {"stop": [f"s{i}" for i in range(50_000)]})],
    case(COMPLETIONS, completion(stop="s" * 2000), "stop", id="one-long-stop"),
    case(COMPLETIONS, lambda: completion(prompt=["x"] * 20_000), "prompt", id="20000-prompts"),
    case(COMPLETIONS, lambda: completion(prompt=[[1]] * 20_000), "prompt",
         id="20000-id-prompts"),
    case(COMPLETIONS, completion(prompt=["x"] * 257), "prompt", id="257-prompts"),
    *[case(path, body, "allowed_token_ids", id=f"{_short(path)}-1M-allowed")
      for path, body in both_lazy(lambda: {"allowed_token_ids": list(range(VOCAB)) * 21})],
    *[case(path, body, "logit_bias", id=f"{_short(path)}-100k-logit_bias")
      for path, body in both_lazy(lambda: {"logit_bias": {str(i): 1 for i in range(100_000)}})],
    case(CHAT, chat(stop_token_ids=list(range(2000))), "stop_token_ids", id="2000-stop-ids"),
    case(COMPLETIONS, completion(allowed_token_ids=list(range(VOCAB, VOCAB + 10))),
         "allowed_token_ids", id="allowed-outside-vocab"),
]


@pytest.mark.parametrize("path,body,status,param,contains", LIST_CASES)
def test_long_lists(server: RemoteServer, path: str, body: Any, status: int,
                    param: str, contains: str | None) -> None:
    refused(server, path, body, status, param, contains)


def _items(prefix: bytes, item: bytes, count: int) -> Callable[[], bytes]:
    """A body that is `count` copies of `item` in the list `prefix` opens (built when sent)."""
    return lambda: prefix + b",".join([item] * count) + b"]}"


# A 15 MB body of one-byte items is millions of Python objects while it is parsed; it may not
# hold the loop (measured: /health < 1.3 s) nor grow the server for good (residue < 60 MB).
# Millions of ints peak at +180-200 MB; millions of one-character strings at +220-350 MB,
# past the 300 MB bound (reported: ~23x a 15 MB body, x4 bodies parsed at once).
STRINGS_PEAK = pytest.mark.xfail(strict=False, raises=AssertionError, reason=(
    "4M one-character strings peak at +220-350 MB of server RSS"))
MAX_BODY_LIST_CASES = [
    pytest.param(COMPLETIONS, _items(b'{"prompt": "x", "stop": [', b'"a"', 4_000_000), "stop",
                 id="4M-stops", marks=STRINGS_PEAK),
    pytest.param(CHAT, _items(b'{"messages": [{"role": "user", "content": "x"}], "bad_words": [',
                              b'"a"', 4_000_000), "bad_words", id="chat-4M-bad_words",
                 marks=STRINGS_PEAK),
    pytest.param(COMPLETIONS, _items(b'{"prompt": [', b'"a"', 4_000_000), "prompt",
                 id="4M-prompts", marks=STRINGS_PEAK),
    pytest.param(COMPLETIONS, _items(b'{"prompt": "x", "allowed_token_ids": [', b"1", 7_500_000),
                 "allowed_token_ids", id="7M-allowed"),
    pytest.param(CHAT, _items(b'{"messages": [{"role": "user", "content": "x"}], '
                              b'"stop_token_ids": [', b"1", 7_500_000), "stop_token_ids",
                 id="chat-7M-stop_token_ids"),
]


@pytest.mark.parametrize("path,body,param", MAX_BODY_LIST_CASES)
def test_max_size_bodies_of_tiny_items(server: RemoteServer, path: str,
                                       body: Callable[[], bytes], param: str) -> None:
    data = body()
    assert 14 * 2**20 < len(data) < 16 * 2**20
    refused(server, path, data, 400, param)


# ---- H. slow clients --------------------------------------------------------------------
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, TOKENIZE])
def test_half_sent_body_is_408(guarded: RemoteServer, path: str) -> None:
    with watch(guarded):
        answer = send_partial_body(guarded.port, path, 1000, b'{"prompt":', wait_s=8)
    assert answer.status == 408, answer
    assert answer.seconds < 5, answer  # the 2 s deadline, plus slack
    error = json.loads(answer.body)["error"]
    assert error["code"] == 408 and error["type"] and error["message"]


def test_many_half_sent_bodies(guarded: RemoteServer) -> None:
    async def one() -> int | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                     b"Content-Type: application/json\r\n\r\n" + b'{"prompt": "' + b"a" * 1000)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        writer.close()
        return int(head.split()[1])

    async def many() -> list[int | None]:
        return list(await asyncio.gather(*[one() for _ in range(50)]))

    with watch(guarded):
        assert asyncio.run(many()) == [408] * 50


def test_slow_large_bodies_do_not_block_others(server: RemoteServer) -> None:
    """Clients trickling big bodies (deadline 30 s here) hold no slot another client needs."""
    slow = []
    try:
        with watch(server):
            for _ in range(8):
                sock = socket.create_connection(("127.0.0.1", server.port))
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 3000000\r\n\r\n"
                             b'{"prompt": "')
                slow.append(sock)
            try:
                honest = post(server, COMPLETIONS, completion(prompt="a " * 1_000_000),
                              timeout_s=8)
            except httpx.TimeoutException:
                raise AssertionError("a 2 MB request waited > 8 s behind 8 slow clients") from None
            assert_error(honest, 400, "prompt")
    finally:
        for sock in slow:
            sock.close()


def test_half_sent_headers_are_dropped(guarded: RemoteServer) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        answer = read_response(sock, wait_s=8)
    assert answer.seconds < 7, answer  # answered (408) or closed, not held


def test_malformed_http_is_json(server: RemoteServer) -> None:
    for request in (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
                    b"garbage\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(request)
            answer = read_response(sock, wait_s=5)
        assert answer.status == 400, answer
        assert b"application/json" in answer.head.lower(), answer


# ---- I. overload --------------------------------------------------------------------------
def _overload(server: RemoteServer, requests: list[tuple[str, dict[str, Any]]]
              ) -> list[httpx.Response]:
    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            sends = [client.post(server.url(path), json=body) for path, body in requests]
            return list(await asyncio.gather(*sends))

    return asyncio.run(fire())


def _rejected_total(server: RemoteServer) -> float:
    text = httpx.get(server.url("/metrics"), timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kvflow:requests_rejected_overload_total"))


@pytest.mark.parametrize("path,make", [(COMPLETIONS, completion), (CHAT, chat)])
def test_overload_is_503_with_retry_after(guarded: RemoteServer, path: str, make: Any) -> None:
    rejected = _rejected_total(guarded)
    body = make(max_tokens=24, ignore_eos=True)
    with watch(guarded):
        replies = _overload(guarded, [(path, body)] * 12)
    busy = [r for r in replies if r.status_code == 503]
    served = [r for r in replies if r.status_code == 200]
    assert len(busy) + len(served) == 12, [r.text for r in replies]
    assert busy and 2 <= len(served) <= 4  # a batch of 2, 2 waiting
    for reply in busy:
        assert_error(reply, 503)
        assert int(reply.headers["retry-after"]) >= 1
    for reply in served:
        usage = reply.json()["usage"]
        assert usage["completion_tokens"] == 24
    assert _rejected_total(guarded) - rejected == len(busy)
    with watch(guarded):  # and serving again once the burst is over
        assert post(guarded, path, make(max_tokens=1)).status_code == 200


def test_overload_holds_for_concurrent_streams(guarded: RemoteServer) -> None:
    count = 30

    async def one(client: httpx.AsyncClient, statuses: list[int], known: asyncio.Event) -> None:
        body = completion(max_tokens=200, ignore_eos=True, stream=True)
        async with client.stream("POST", guarded.url(COMPLETIONS), json=body) as reply:
            statuses.append(reply.status_code)
            if len(statuses) == count:
                known.set()
            await known.wait()  # hold every admitted stream until all have their answer

    async def burst() -> list[int]:
        statuses: list[int] = []
        known = asyncio.Event()
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=50)) as c:
            await asyncio.gather(*[one(c, statuses, known) for _ in range(count)])
        return statuses

    with watch(guarded):
        statuses = asyncio.run(burst())
    assert statuses.count(200) <= 4, statuses  # a batch of 2, 2 waiting


def test_too_many_sequences_for_the_small_server(guarded: RemoteServer) -> None:
    # capacity 4 (a batch of 2, 2 waiting): more sequences could never run at once
    refused(guarded, COMPLETIONS, completion(n=5), 400, "n", "5 sequences")
    refused(guarded, COMPLETIONS, completion(prompt=["a", "b", "c"], n=2), 400, "n")
    refused(guarded, COMPLETIONS, completion(prompt=["a"] * 5), 400, "prompt")
    refused(guarded, CHAT, chat(n=5), 400, "n")


def test_abandoned_streams_leave_nothing(guarded: RemoteServer) -> None:
    async def one(client: httpx.AsyncClient) -> int:
        body = completion(max_tokens=200, ignore_eos=True, stream=True)
        async with client.stream("POST", guarded.url(COMPLETIONS), json=body) as reply:
            if reply.status_code == 200:
                async for _ in reply.aiter_lines():
                    break  # one event, then hang up
            return reply.status_code

    async def many() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            return list(await asyncio.gather(*[one(client) for _ in range(8)]))

    with watch(guarded):
        statuses = asyncio.run(many())
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses


def test_burst_of_hang_ups_leaves_nothing(server: RemoteServer) -> None:
    """60 clients that leave mid-stream or time out mid-request, n of 1 or 3, 1 or 3 prompts."""
    chance = random.Random(14)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        path, make = (COMPLETIONS, completion) if i % 2 else (CHAT, chat)
        prompts = {"prompt": ["a", "b", "c"]} if path == COMPLETIONS and i % 4 == 1 else {}
        streaming = i % 6 < 3
        body = make(max_tokens=100, ignore_eos=True, n=chance.choice([1, 3]), stream=streaming,
                    **prompts)
        if streaming:
            async with client.stream("POST", server.url(path), json=body) as reply:
                events = chance.randint(0, 10)
                async for _ in reply.aiter_lines():
                    events -= 1
                    if events < 0:
                        break
            return
        with contextlib.suppress(httpx.TimeoutException):
            await client.post(server.url(path), json=body, timeout=chance.uniform(0.05, 2.0))

    async def burst() -> None:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as c:
            await asyncio.gather(*[one(c, i) for i in range(60)])

    with watch(server, leak_timeout_s=15):
        asyncio.run(burst())


# ---- J. logprob bytes ---------------------------------------------------------------------
def _joined_bytes(tokens: list[dict[str, Any]]) -> bytes:
    return b"".join(bytes(t["bytes"]) for t in tokens)


def test_chat_logprob_bytes_are_the_tokens_own(server: RemoteServer) -> None:
    body = chat(messages=[{"role": "user", "content": "Say 你好世界 in Chinese characters only"}],
                max_tokens=24, temperature=0, logprobs=True, top_logprobs=2)
    with watch(server):
        reply = post(server, CHAT, body).json()
        stream = httpx.post(server.url(CHAT), json={**body, "stream": True}, timeout=60)
    choice = reply["choices"][0]
    tokens = choice["logprobs"]["content"]
    if choice["finish_reason"] == "stop":
        tokens = tokens[:-1]  # the end-of-turn token: in the logprobs, not in the text
    content = choice["message"]["content"]
    assert _joined_bytes(tokens) == content.encode()
    partial = [t for t in tokens if not _decodes(bytes(t["bytes"]))]
    assert partial, "the reply has no token holding part of a character: pick another prompt"
    for token in tokens:
        assert all(0 <= b < 256 for b in token["bytes"])
        assert len(token["top_logprobs"]) == 2
        assert all(isinstance(top["bytes"], list) for top in token["top_logprobs"])
    events = [json.loads(line[6:]) for line in stream.text.splitlines()
              if line.startswith("data: {")]
    streamed = [t for e in events for c in e["choices"]
                for t in (c.get("logprobs") or {}).get("content") or []]
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert text == content
    assert _joined_bytes(streamed[:len(tokens)]) == content.encode()


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---- known gaps that take a server down for a while (own server, killed after) ------------
@pytest.fixture(scope="module")
def victim() -> Iterator[RemoteServer]:
    remote = RemoteServer(TINY_ARGS)
    try:
        yield remote
    finally:  # its threads may still be busy with what these cases sent: no clean stop owed
        remote.kill()
        remote.log_file.close()
        os.unlink(remote.log_file.name)


@pytest.mark.slow
def test_bad_words_at_their_limits_with_n(victim: RemoteServer) -> None:
    """Each child carries its own bad-word token ids in the core: their volume times n is bound.

    Before that bound: n=16 +590 MB in the engine core (+240 MB kept), n=128 +4.7 GB.
    """
    chance = random.Random(0)
    words = ["".join(chance.choice("abcdefghij klmnop") for _ in range(1000))
             for _ in range(1024)]
    with watch(victim):
        refused(victim, COMPLETIONS, completion(n=16, bad_words=words), 400, "bad_words")
        refused(victim, CHAT, chat(n=2, bad_words=words[:200]), 400, "bad_words")
        # at the bound (256 words x 1000 characters, n=1): served, the core stays in bounds
        reply = post(victim, COMPLETIONS, completion(bad_words=words[:256]), timeout_s=120)
        assert reply.status_code == 200, reply.text


# Decoding a 15 MB body of millions of small objects peaks at +300-350 MB for a moment (two
# bodies are decoded at a time); the counts are refused before pydantic and the memory
# goes back at once (measured: 403 -> peak 703 -> 410 MB).
DECODE_PEAK = pytest.mark.xfail(strict=False, raises=AssertionError, reason=(
    "decoding millions of small JSON objects peaks at +300-350 MB of server RSS"))
HEAVY_CASES = [
    # 1.2M messages: refused on their count before rendering (the template rendered them all,
    # and a render that timed out went on in its thread: 10-13 s, /health 8-10 s or
    # reset, +850 MB per request, kept while the render runs)
    pytest.param(CHAT, _items(b'{"max_tokens": 1, "messages": [', b'{"role": "u"}', 1_150_000),
                 "messages", id="chat-1.2M-messages", marks=DECODE_PEAK),
    pytest.param(TOKENIZE, _items(b'{"messages": [', b'{"role": "u"}', 1_150_000), "messages",
                 id="tokenize-1.2M-messages", marks=DECODE_PEAK),
    # 3.5M token-id prompts: refused on their count before pydantic (was 11-13 s, /health
    # 2.6-4.7 s, +480 MB); decoding 3.5M lists still peaks at +350 MB for a moment
    pytest.param(COMPLETIONS, _items(b'{"prompt": [', b"[1]", 3_500_000), "prompt",
                 id="cmpl-3.5M-id-prompts", marks=DECODE_PEAK),
    # /detokenize takes at most max_model_len ids (3.5M ids were decoded: 5 s, +280 MB)
    pytest.param("/detokenize", _items(b'{"tokens": [', b"220", 3_500_000), "tokens",
                 id="detokenize-3.5M-ids"),
]


@pytest.mark.slow
@pytest.mark.parametrize("path,body,param", HEAVY_CASES)
def test_max_size_bodies_of_small_objects(victim: RemoteServer, path: str,
                                          body: Callable[[], bytes], param: str) -> None:
    data = body()
    assert len(data) < 16 * 2**20
    refused(victim, path, data, 400, param)


# ---- K. the OpenAPI schema, and a property-based run over it -------------------------------
def test_openapi_documents_what_the_server_answers(server: RemoteServer) -> None:
    schema = httpx.get(server.url("/openapi.json"), timeout=10).json()
    for path in (COMPLETIONS, CHAT, TOKENIZE, "/detokenize"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"400", "404"} <= set(responses), (path, sorted(responses))
    model = schema["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    assert "422" not in model and "404" in model, sorted(model)
    for path in ("/health", "/ping"):
        ok = schema["paths"][path]["get"]["responses"]["200"]
        assert "application/json" not in ok.get("content", {}), (path, ok)


def _tame(case: Any) -> Any:
    """Generated requests stay cheap: a couple of tokens, a couple of sequences."""
    body = case.body
    if isinstance(body, dict) and ("prompt" in body or "messages" in body):
        body["max_tokens"] = 2
        body.pop("max_completion_tokens", None)
        for key in ("n", "best_of"):
            if isinstance(body.get(key), int) and not isinstance(body[key], bool):
                body[key] = min(body[key], 2)
    return case


# /health and /ping answer an empty 200 that the schema says is JSON (reported above).
NO_BODY_CHECK = {"GET /health", "GET /ping"}
FUZZ_EXAMPLES = 50  # per operation and mode, derandomized: ~40 s on two shared cores


def _fuzz(server: RemoteServer, operation: Any, mode: Any, seen: set[int]) -> None:
    """Hypothesis over one operation's generated requests, each sent and checked."""
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    checks: list[Any] = [not_a_server_error]
    if operation.label not in NO_BODY_CHECK:
        checks.append(response_schema_conformance)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=operation.as_strategy(generation_mode=mode).map(_tame))
    def check(case: Any) -> None:
        response = case.call(base_url=server.url(), timeout=30)
        seen.add(response.status_code)
        case.validate_response(response, checks=checks)
        assert response.elapsed < 10, (operation.label, case.body)  # seconds
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert error["code"] == response.status_code, error

    check()


@pytest.mark.slow
def test_fuzz_the_openapi_schema(server: RemoteServer) -> None:
    """Schemathesis over /openapi.json, valid and invalid requests: never a 5xx, 200s match
    their schema, every error is OpenAI-shaped JSON, nothing is left behind."""
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis.core.result import Err

    schema = schemathesis.openapi.from_url(server.url("/openapi.json"), timeout=30)
    seen: dict[str, set[int]] = {}
    with watch(server):
        for result in schema.get_all_operations():
            assert not isinstance(result, Err), result.err()  # the schema is invalid
            operation = result.ok()
            for mode in (schemathesis.GenerationMode.POSITIVE,
                         schemathesis.GenerationMode.NEGATIVE):
                try:
                    _fuzz(server, operation, mode, seen.setdefault(operation.label, set()))
                except Unsatisfiable:  # nothing to make invalid (no body, no parameters)
                    assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
    assert {200, 400} <= seen["POST /v1/completions"], seen
    assert {200, 400} <= seen["POST /v1/chat/completions"], seen

"""Request bodies: JSON decoding with errors that say where, validation, the OpenAPI schema."""

from __future__ import annotations

import pytest
from fastapi import FastAPI

from kvflow.entrypoints.openai.body import add_body_schemas, body_schema, decode_json, parse
from kvflow.entrypoints.openai.errors import OpenAIError
from kvflow.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest


def problem(data: bytes) -> str:
    with pytest.raises(OpenAIError) as info:
        decode_json(data)
    assert info.value.status == 400
    return info.value.message


def param_of(data: bytes) -> str | None:
    with pytest.raises(OpenAIError) as info:
        decode_json(data)
    return info.value.param


def test_lone_surrogates_are_named_with_their_place() -> None:
    message = problem(b'{"prompt": "a\\ud800b"}')
    assert message.startswith("prompt: invalid Unicode")
    assert "lone surrogate \\ud800 at line 1 column 14" in message
    assert "lone surrogate \\udc00 at line 2 column 8" in problem(b'{"x": 1,\n"s": ["\\udc00"]}')
    body = b'{"messages": [{"role": "user", "content": "ok"}, {"role": "a\\udbff"}]}'
    assert param_of(body) == "messages.1.role"
    assert param_of(b'{"stop": ["fine", "\\udc00"]}') == "stop.1"
    # a whole pair is one character, and fine
    assert decode_json(b'{"s": "\\ud83d\\ude00"}') == {"s": "\U0001f600"}


def test_invalid_utf8_and_malformed_json() -> None:
    assert "not UTF-8 (byte 0xff at offset 13)" in problem(b'{"prompt": "a\xffb"}')
    assert "line 1 column" in problem(b'{"prompt": ')
    assert "nested too deeply" in problem(b"[" * 100_000 + b"]" * 100_000)


def test_parse_names_the_parameter() -> None:
    with pytest.raises(OpenAIError) as info:
        parse(b'{"prompt": "x", "seed": 18446744073709551616}', CompletionRequest)
    assert info.value.param == "seed" and info.value.status == 400
    with pytest.raises(OpenAIError) as info:
        parse(b'{"prompt": [1, "a"]}', CompletionRequest)
    assert info.value.param == "prompt"
    with pytest.raises(OpenAIError, match="JSON object"):
        parse(b"[1, 2]", CompletionRequest)


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2], [[1, 2], [3]], []])
def test_every_prompt_form_parses(prompt: object) -> None:
    import json

    request = parse(json.dumps({"prompt": prompt}).encode(), CompletionRequest)
    assert request.prompt == prompt


def test_a_big_token_id_prompt_parses_quickly() -> None:
    import time

    body = b'{"prompt": [' + b",".join([b"12345"] * 1_000_000) + b"]}"
    start = time.process_time()
    parse(body, CompletionRequest)
    assert time.process_time() - start < 2.0  # pydantic's four-way union took ~1.3 s per 1M


def test_openapi_names_the_body_models() -> None:
    app = FastAPI()

    @app.post("/c", openapi_extra=body_schema(CompletionRequest, ChatCompletionRequest))
    async def route() -> None:
        return None

    add_body_schemas(app, [CompletionRequest, ChatCompletionRequest])
    schema = app.openapi()
    body = schema["paths"]["/c"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"anyOf": [{"$ref": "#/components/schemas/CompletionRequest"},
                              {"$ref": "#/components/schemas/ChatCompletionRequest"}]}
    components = schema["components"]["schemas"]
    assert "prompt" in components["CompletionRequest"]["properties"]
    assert "ChatMessage" in components  # a nested model's definition moved to components


async def test_byte_budget_lets_each_body_hold_only_its_share() -> None:
    import asyncio

    from kvflow.entrypoints.openai.body import ByteBudget

    budget = ByteBudget(100)
    order: list[str] = []

    async def body(name: str, size: int, hold_s: float) -> None:
        async with budget.hold(size):
            order.append(f"{name}+")
            await asyncio.sleep(hold_s)
        order.append(f"{name}-")

    slow = asyncio.create_task(body("slow", 60, 0.2))
    await asyncio.sleep(0)
    await asyncio.gather(body("small", 30, 0.0), body("big", 50, 0.0))
    await slow
    assert order.index("small+") < order.index("slow-")  # fits beside the slow one
    assert order.index("big+") > order.index("slow-")  # waits for its share
    assert budget.used == 0

"""A request body: read within a size and a time limit, then parsed and validated off the loop.

    bytes ──(size ≤ --max-request-body-mb: 413; whole body within the read timeout: 408)──►
    JSON (msgspec; invalid UTF-8 or a lone surrogate: 400 saying where) ──► pydantic model

FastAPI would parse and validate on the event loop, where a 16 MB body of token ids holds it
for seconds; routes here take the raw request and call `read_request` instead. The OpenAPI
schema still names each route's body model (`body_schema`, `add_body_schemas`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import msgspec
import pydantic_core
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, TypeAdapter, ValidationError

from kvflow.entrypoints.openai.errors import OpenAIError, validation_message

T = TypeVar("T")

# A \uD800-\uDBFF escape not followed by a \uDC00-\uDFFF one, or a trailing half on its own.
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


async def read_body(raw: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, or 413 past `max_bytes` (checked before reading when announced)."""
    announced = raw.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0

    async def receive_all() -> None:
        nonlocal size
        async for chunk in raw.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive_all(), timeout_s)
    except TimeoutError:
        raise OpenAIError(f"the request body did not arrive within {timeout_s:g} s",
                          408) from None
    return b"".join(chunks)


class ByteBudget:
    """Bytes that bodies being received may hold together; a body waits for its share.

    Event-loop only (no lock needed): `hold` is entered and left on the loop's thread.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._freed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        while self.used + size > self.total:
            self._freed.clear()
            await self._freed.wait()
        self.used += size
        try:
            yield
        finally:
            self.used -= size
            self._freed.set()


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(f"the request body is larger than {max_bytes / 2**20:g} MiB "
                       "(--max-request-body-mb)", 413)


def decode_json(data: bytes) -> Any:
    """Python objects of a JSON body; malformed JSON or invalid Unicode is a 400 saying where."""
    try:
        return msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        message, param = _json_problem(data, exc)
        raise OpenAIError(message, 400, param) from None


def _json_problem(data: bytes, exc: Exception) -> tuple[str, str | None]:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as bad:
        return (f"invalid Unicode: the body is not UTF-8 (byte 0x{data[bad.start]:02x} at "
                f"offset {bad.start})"), None
    lone = _LONE_SURROGATE.search(data)
    if lone is not None:
        param = _surrogate_path(data)
        field = f"{param}: " if param else ""
        return (f"{field}invalid Unicode: a lone surrogate {lone.group().decode()} at "
                f"{_line_column(data, lone.start())} (a string must hold whole characters)"), param
    if isinstance(exc, RecursionError):
        return "malformed JSON body: nested too deeply", None
    try:  # pydantic's parser says where the problem is; msgspec does not always
        pydantic_core.from_json(data)
    except ValueError as detail:
        return f"malformed JSON body: {detail}", None
    return f"malformed JSON body: {exc}", None


def _surrogate_path(data: bytes) -> str | None:
    """The field holding the first lone surrogate ("messages.0.content"), for `param`."""
    try:
        obj = json.loads(data)  # unlike msgspec, Python's parser keeps lone surrogates
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and not _encodable(value):
            return path or None
        children = (value.items() if isinstance(value, dict)
                    else enumerate(value) if isinstance(value, list) else ())
        for key, child in reversed(list(children)):
            name = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
            child_path = f"{path}.{name}" if path else name
            if isinstance(key, str) and not _encodable(key):
                return child_path
            stack.append((child_path, child))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _line_column(data: bytes, offset: int) -> str:
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return f"line {line} column {column}"


def validate(adapter: TypeAdapter[T], obj: Any) -> T:
    """The body as its model; pydantic's complaints become one 400 naming the parameter."""
    if not isinstance(obj, dict):
        raise OpenAIError("the request body must be a JSON object", 400)
    try:
        return adapter.validate_python(obj)
    except ValidationError as exc:
        message, param = validation_message(exc.errors(include_url=False))
        raise OpenAIError(message, 400, param) from None


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def parse(data: bytes, model: Any,
          precheck: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """bytes → validated request model (runs in a worker thread).

    `precheck` sees the decoded JSON first: counts are cheap to check there, while pydantic
    would first build an object for each of a million items.
    """
    adapter = _ADAPTERS.get(model)
    if adapter is None:
        adapter = _ADAPTERS[model] = TypeAdapter(model)
    obj = decode_json(data)
    if precheck is not None and isinstance(obj, dict):
        precheck(obj)
    return validate(adapter, obj)


# ---- OpenAPI --------------------------------------------------------------------------
def body_schema(*models: type[BaseModel]) -> dict[str, Any]:
    """A route's `openapi_extra`: its body is one of these models."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


def add_body_schemas(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """Put the body models in the app's OpenAPI components (routes only reference them)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        app.openapi_schema = schema
        return schema

    setattr(app, "openapi", openapi)  # noqa: B010 (FastAPI's documented override)


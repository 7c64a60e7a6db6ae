"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvflow.errors import EngineDeadError
from kvflow.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# vLLM's spelling of the error type for each status (the OpenAI client maps on the status).
_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class OpenAIError(Exception):
    """An error a handler returns to the client with its HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.headers = headers


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    err_type = _TYPES.get(status) or _phrase(status)
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.replace(" ", "") + "Error"
    except ValueError:
        return "Error"


def error_response(message: str, status: int, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status, headers=headers)


def error_from_exception(exc: BaseException) -> OpenAIError:
    """Map what the engine raises to a client-facing error (ValueError: the request's fault)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return OpenAIError(str(exc), 503)
    if isinstance(exc, ValueError):
        return OpenAIError(str(exc), 400, _param_of(str(exc)))
    logger.error("request failed: %r", exc, exc_info=exc)
    return OpenAIError(f"internal error: {type(exc).__name__}: {exc}", 500)


def _param_of(message: str) -> str | None:
    """The engine starts its messages with the parameter's name ("top_p must be ...")."""
    first = message.split(" ", 1)[0]
    return first if first in _PARAM_NAMES else None


_PARAM_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams)) | {"priority"}


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """pydantic's errors as one message, and the parameter of the first."""
    errors = list(errors)
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('msg', '')}", None
    param = _param_path(first.get("loc", ())) or None
    parts = [f"{_param_path(err.get('loc', ())) or 'body'}: {err.get('msg', 'invalid')}"
             for err in errors[:5]]
    return "; ".join(dict.fromkeys(parts)), param


# pydantic names the member of a union that failed ("stop" → "str", "list[str]"): not a path.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|dict|list|none|function-\w+)(\[.*\])?$")


def _param_path(loc: Any) -> str:
    """("body", "messages", 0, "role") → "messages.0.role"."""
    parts: list[str] = []
    for part in loc:
        if part == "body" and not parts:
            continue
        if isinstance(part, str) and _UNION_MEMBER.match(part):
            break
        parts.append(str(part))
    return ".".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Every error, including FastAPI's own 404/405/422, leaves in OpenAI's shape."""

    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc.message, exc.status, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # vLLM answers 400 (not FastAPI's 422) to bodies that are not valid requests.
        message, param = validation_message(exc.errors())
        return error_response(message, 400, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(f"malformed JSON body: {exc}", 400)

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(str(exc), 503)

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        err = error_from_exception(exc)
        return error_response(err.message, err.status, err.param)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette's last resort answers text/plain; a client always gets OpenAI's shape.
        err = error_from_exception(exc)
        return error_response(err.message, err.status, err.param)

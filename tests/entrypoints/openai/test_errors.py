"""Every failure leaves in OpenAI's JSON shape, unexpected exceptions included."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from kvflow.entrypoints.openai.errors import OpenAIError, install_error_handlers


def test_unexpected_exceptions_and_headers_are_json() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/overflow")
    async def overflow() -> None:
        raise OverflowError("int too big to convert")

    @app.get("/busy")
    async def busy() -> None:
        raise OpenAIError("overloaded", 503, headers={"Retry-After": "1"})

    client = TestClient(app, raise_server_exceptions=False)
    response = client.get("/overflow")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == 500 and "OverflowError" in error["message"]
    response = client.get("/busy")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "ServiceUnavailableError"

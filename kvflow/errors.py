"""Errors that kvflow raises to its users."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine core has died; no request can make progress."""

    def __init__(self, message: str = "The engine core has died; restart the engine.") -> None:
        super().__init__(message)


class EngineGenerateError(RuntimeError):
    """An unexpected error ended one request; the engine keeps serving the others."""


class ModelLoadError(ValueError):
    """A model could not be found, verified, converted or loaded."""

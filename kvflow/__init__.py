"""kvflow: an asynchronous LLM inference engine with vLLM's interface, CPU first."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvflow.config import EngineArgs
from kvflow.errors import EngineDeadError, EngineGenerateError
from kvflow.lora.request import LoRARequest
from kvflow.outputs import CompletionOutput, Logprob, RequestOutput
from kvflow.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"

if TYPE_CHECKING:
    from kvflow.engine.llm import LLM

__all__ = [
    "LLM", "EngineArgs", "SamplingParams", "RequestOutputKind", "StructuredOutputsParams",
    "RequestOutput", "CompletionOutput", "Logprob", "EngineDeadError", "EngineGenerateError",
    "LoRARequest",
    "__version__",
]

_LAZY = {
    "LLM": "kvflow.engine.llm",
    "LLMEngine": "kvflow.engine.llm_engine",
    "AsyncLLM": "kvflow.engine.async_llm",
    "AsyncLLMEngine": "kvflow.engine.async_llm",
    "AsyncEngineArgs": "kvflow.config",
}


def __getattr__(name: str) -> Any:
    """Import the engine classes on first use, so `import kvflow` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvflow' has no attribute {name!r}")

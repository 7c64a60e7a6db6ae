"""Build core Requests without a model or a client."""

from __future__ import annotations

import torch

from kvflow.core.request import Request
from kvflow.engine.protocol import EngineCoreRequest
from kvflow.sampling_params import SamplingParams

_seq = iter(range(1, 1_000_000))


def make_request(request_id: str, prompt: list[int], max_tokens: int = 16, priority: int = 0,
                 arrival: float = 0.0, max_model_len: int = 4096, **params: object) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)  # type: ignore[arg-type]
    req = EngineCoreRequest(request_id, list(prompt), sp, [0], arrival, priority)
    return Request(req, max_model_len, next(_seq), torch.device("cpu"))

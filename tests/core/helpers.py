"""Build core Requests without a model or a client."""

from __future__ import annotations

import torch

from kvflow.core.request import Request
from kvflow.engine.protocol import EngineCoreRequest, MultiModalFeature
from kvflow.sampling_params import SamplingParams

_seq = iter(range(1, 1_000_000))


def make_request(request_id: str, prompt: list[int], max_tokens: int = 16, priority: int = 0,
                 arrival: float = 0.0, max_model_len: int = 4096,
                 images: list[tuple[str, int, int]] | None = None, **params: object) -> Request:
    """`images`: (content hash, offset, length) of each image's placeholders in the prompt."""
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)  # type: ignore[arg-type]
    features = [MultiModalFeature(key, offset, length, pixels=b"", shape=[0])
                for key, offset, length in images or ()]
    req = EngineCoreRequest(request_id, list(prompt), sp, [0], arrival, priority,
                            mm_features=features or None)
    return Request(req, max_model_len, next(_seq), torch.device("cpu"))

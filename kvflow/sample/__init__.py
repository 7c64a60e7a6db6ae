"""Batched token sampling: per-step metadata, the sampler and logprobs."""

from kvflow.sample.logprobs import LogprobsTensors, compute_prompt_logprobs
from kvflow.sample.metadata import SamplingMetadata
from kvflow.sample.sampler import Sampler, SamplerOutput

__all__ = [
    "LogprobsTensors",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "compute_prompt_logprobs",
]

"""A request as the engine core tracks it."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import torch

from kvflow.engine.protocol import EngineCoreRequest, FinishReason, MultiModalFeature
from kvflow.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvflow.lora.adapter import LoRAAdapter
    from kvflow.structured.matcher import GrammarState


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


class Request:
    """A request inside the core.

    Invariant: `num_computed_tokens <= num_tokens`; each step schedules some of the
    difference, so prefill, chunked prefill, decode, prefix-cache hits and recompute after
    preemption are all the same rule: computed tokens catch up with known tokens.
    """

    __slots__ = (
        "request_id", "prompt_token_ids", "sampling_params", "eos_token_ids", "arrival_time",
        "priority", "lora", "status", "all_token_ids", "num_computed_tokens",
        "num_cached_tokens", "block_hashes", "stop_reason", "generator", "max_tokens",
        "max_model_len", "num_preemptions", "seq", "grammar", "lora_skips", "mm_features",
        "kv_loads", "queued_time", "scheduled_time", "model_execute_time",
        "spec_token_ids", "spec_acceptance", "num_draft_computed",
    )

    def __init__(self, req: EngineCoreRequest, max_model_len: int, seq: int,
                 device: torch.device) -> None:
        self.request_id = req.request_id
        self.prompt_token_ids = req.prompt_token_ids
        self.sampling_params: SamplingParams = req.sampling_params
        self.eos_token_ids = frozenset(req.eos_token_ids)
        self.arrival_time = req.arrival_time
        self.priority = req.priority
        # The adapter this request runs with, set by the core (held until the request ends,
        # so evicting or reloading the adapter never changes what it computes).
        self.lora: LoRAAdapter | None = None
        self.lora_skips = 0  # steps passed over because its adapter had no slot
        self.status = RequestStatus.WAITING
        self.all_token_ids: list[int] = list(req.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # set when first scheduled
        self.block_hashes: list[int] = []  # hashes of the full blocks, in order
        self.stop_reason: int | str | None = None
        self.max_model_len = max_model_len
        max_tokens = self.sampling_params.max_tokens
        self.max_tokens = max_tokens if max_tokens is not None else max_model_len
        self.num_preemptions = 0
        self.seq = seq  # arrival order inside the core: breaks priority ties
        self.generator: torch.Generator | None = None
        if self.sampling_params.seed is not None and self.sampling_params.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.sampling_params.seed)
        # Structured output: set by the core, advanced past each sampled token. Once the
        # grammar is complete its mask allows only EOS, so the request stops as usual.
        self.grammar: GrammarState | None = None
        # Images, in prompt order: each one's content hash and placeholder span
        self.mm_features: list[MultiModalFeature] = req.mm_features or []
        self.kv_loads = 0  # times blocks were loaded back from the second KV tier for it
        # tracing only (0.0 otherwise): received by the core, first scheduled, model time
        self.queued_time = 0.0
        self.scheduled_time = 0.0
        self.model_execute_time = 0.0
        # Speculative decoding: tokens proposed to follow all_token_ids (verified next step,
        # never part of all_token_ids before they are accepted), and a moving average of the
        # share of its proposals accepted (proposers skip requests where it stays low)
        self.spec_token_ids: list[int] = []
        self.spec_acceptance = 1.0
        self.num_draft_computed = 0  # positions whose K/V a draft model holds (draft_model)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def lora_key(self) -> str | None:
        """The adapter's identity in prefix-cache hashes: a digest of its files' content."""
        return None if self.lora is None else self.lora.digest

    @property
    def cache_salt(self) -> str | None:
        return self.sampling_params.cache_salt

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def check_stop(self) -> RequestStatus | None:
        """After a token was appended: the finished status, or None to go on."""
        params = self.sampling_params
        last = self.all_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if last in (params.stop_token_ids or ()):
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens or self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

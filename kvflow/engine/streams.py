"""Fan-out of n > 1 into child requests, and the per-request output collector of AsyncLLM."""

from __future__ import annotations

import asyncio
import copy

from kvflow.outputs import CompletionOutput, RequestOutput
from kvflow.sampling_params import RequestOutputKind, SamplingParams


class ParentRequest:
    """A request with n > 1: n child requests in the core, one stream for the caller."""

    def __init__(self, request_id: str, params: SamplingParams) -> None:
        self.request_id = request_id
        self.n = params.n
        self.params = params
        self.child_ids = [f"{i}_{request_id}" for i in range(self.n)]
        self.completions: list[CompletionOutput | None] = [None] * self.n
        self.num_finished = 0

    def child_params(self, index: int) -> SamplingParams:
        """Each child samples once; a seeded parent gives child i the seed + i (int64 wraps).

        A shallow copy: the lists (stop strings, bad-word ids) are shared and never changed.
        """
        params = copy.copy(self.params)
        params.n = 1
        if params.seed is not None:
            params.seed = (params.seed + index + 2**63) % 2**64 - 2**63
        return params

    def add_child_output(self, completion: CompletionOutput,
                         child_finished: bool) -> tuple[list[CompletionOutput], bool] | None:
        """What to emit for one child's output: (completions, parent finished), or None."""
        if child_finished:
            self.num_finished += 1
        finished = self.num_finished == self.n
        if self.params.output_kind == RequestOutputKind.FINAL_ONLY:
            self.completions[completion.index] = completion
            if not finished:
                return None
            return [c for c in self.completions if c is not None], True
        return [completion], finished


class RequestOutputCollector:
    """Hands one request's outputs from the output handler to its consumer, never blocking.

    A consumer that lags gets merged outputs instead of a growing queue: DELTA outputs are
    concatenated; other kinds keep only the newest (it already holds everything).
    """

    def __init__(self, output_kind: RequestOutputKind) -> None:
        self.delta = output_kind == RequestOutputKind.DELTA
        self.output: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        current = self.output
        if current is None or isinstance(item, BaseException):
            self.output = item
        elif isinstance(current, RequestOutput):
            if self.delta:
                _merge_delta(current, item)
            else:
                self.output = item
        self.ready.set()

    async def get(self) -> RequestOutput:
        while self.output is None:
            await self.ready.wait()
        return self._take()

    def get_nowait(self) -> RequestOutput | None:
        return self._take() if self.output is not None else None

    def _take(self) -> RequestOutput:
        item = self.output
        self.output = None
        self.ready.clear()
        if isinstance(item, BaseException):
            raise item
        assert item is not None
        return item


def _merge_delta(into: RequestOutput, new: RequestOutput) -> None:
    """Append a newer DELTA output to a pending one (per completion index)."""
    by_index = {c.index: c for c in into.outputs}
    for completion in new.outputs:
        old = by_index.get(completion.index)
        if old is None:
            into.outputs.append(completion)
            by_index[completion.index] = completion
            continue
        old.text += completion.text
        old.token_ids = list(old.token_ids) + list(completion.token_ids)
        if old.logprobs is not None and completion.logprobs is not None:
            old.logprobs = list(old.logprobs) + list(completion.logprobs)
        old.cumulative_logprob = completion.cumulative_logprob
        old.finish_reason = completion.finish_reason
        old.stop_reason = completion.stop_reason
    into.finished = new.finished
    into.num_cached_tokens = new.num_cached_tokens
    if into.prompt_logprobs is None:
        into.prompt_logprobs = new.prompt_logprobs

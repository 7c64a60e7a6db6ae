"""The scheduler: which requests run this step, with how many tokens each.

One rule drives everything: each request's `num_computed_tokens` catches up with its
`num_tokens`. A step gives each running request min(remaining, budget) tokens (1 for a
decode, a chunk for a long prompt), then admits waiting requests while the token budget,
`max_num_seqs` and KV blocks allow. When a running request cannot get a block, the
policy's victim is preempted: its blocks are freed and it recomputes later.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvflow.config import SchedulerConfig
from kvflow.core.encoder_cache import EncoderCacheManager
from kvflow.core.kv_cache import KVCacheManager
from kvflow.core.request import Request, RequestStatus
from kvflow.core.request_queue import RequestQueue, make_request_queue
from kvflow.engine.protocol import EngineCoreOutput, LogprobsLists, RequestTimings, SchedulerStats
from kvflow.spec_decode.metrics import SpecDecodingStats

if TYPE_CHECKING:
    from kvflow.kv_offload.manager import OffloadManager


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step."""

    request: Request
    num_new_tokens: int  # known tokens to compute, then the proposals
    block_ids: list[int]
    # proposed tokens verified this step: the last num_new_tokens - 1 inputs of a decode
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def completes_sequence(self) -> bool:
        """True when this step computes the last known token, so a token is sampled."""
        num_known = self.num_new_tokens - len(self.spec_token_ids)
        return self.request.num_computed_tokens + num_known == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """What the model runner must compute this step."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # images whose embeddings the runner may drop (evicted from the encoder cache)
    freed_encoder_ids: list[str] = field(default_factory=list)

    @property
    def total_num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass(slots=True)
class StepResult:
    """Per scheduled request, the sampled token (None for a partial prefill chunk)."""

    sampled: list[int | None]
    logprobs: list[LogprobsLists | None] | None = None  # one row per token emitted
    prompt_logprobs: list[LogprobsLists | None] | None = None
    # rows that verified proposals: the tokens emitted after sampled[i] (the accepted
    # proposals but the first, then the target's own next token); None: no such row
    spec_tokens: list[list[int]] | None = None


# Steps a request may be passed by later ones because its LoRA adapter has no slot.
LORA_MAX_SKIPS = 16
# Loads from the second KV tier per request (more would mean its blocks keep being evicted
# between the load and its admission: it recomputes instead).
MAX_KV_LOADS = 2


class Scheduler:
    """Continuous batching with chunked prefill, a fcfs/priority policy and preemption."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: RequestQueue = make_request_queue(config.policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_steps = 0
        self.spec_stats = SpecDecodingStats()
        # the second KV tier (set by the core) and the requests waiting for its loads:
        # request id -> (request, blocks being loaded, their hashes)
        self.offload: OffloadManager | None = None
        self.loading: dict[str, tuple[Request, list[int], list[int]]] = {}
        # image embeddings (LLaVA models): what the runner keeps, and this step's budget
        self.encoder_budget = config.encoder_budget
        self.encoder_cache = EncoderCacheManager(
            max(config.encoder_cache_size, config.encoder_budget)) if config.encoder_budget \
            else None

    # ---- request lifecycle ---------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.waiting.add(request)
        self.requests[request.request_id] = request

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests (abort or client-side stop); returns those that were still alive."""
        ended = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request_id in self.loading:  # its copies finish first: they write its blocks
                assert self.offload is not None
                self._end_load(request_id, self.offload.wait(request_id))
            elif request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self.kv.free(request)
            self._release_images(request)
            ended.append(request)
        return ended

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_schedulable_requests(self) -> bool:
        return bool(self.running) or bool(self.waiting) or bool(self.loading)

    # ---- scheduling ------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.offload is not None:
            for request_id, loaded in self.offload.finished_loads():
                self.waiting.add_front(self._end_load(request_id, loaded))
        budget = self.config.max_num_batched_tokens
        self.encoder_budget = self.config.encoder_budget
        budget, preempted = self._schedule_running(out, budget)
        if not preempted:
            self._schedule_waiting(out, budget)
        for item in out.scheduled:
            item.block_ids = self.kv.block_ids(item.request.request_id)
        if self.encoder_cache is not None:
            self.encoder_cache.end_step()
            out.freed_encoder_ids = self.encoder_cache.take_freed()
        return out

    def _fit_images(self, request: Request, start: int, num_new: int) -> int:
        """Tokens of the chunk that can run: every image the chunk reaches must be encoded
        already, or be encoded this step within the encoder budget and the cache's space;
        otherwise the chunk ends just before that image's placeholders (vLLM's rule: an
        image is encoded whole, in one step)."""
        cache = self.encoder_cache
        if cache is None or start >= _images_end(request):
            return num_new  # (decodes, text-only requests)
        for feature in request.mm_features:
            if feature.offset >= start + num_new:
                break
            if feature.offset + feature.length <= start:
                continue  # its placeholders are computed: the KV cache holds the image
            rid, identifier = request.request_id, feature.identifier
            if cache.holds(identifier, rid) or cache.lookup(identifier, rid):
                continue
            if feature.length <= self.encoder_budget and cache.can_allocate(feature.length):
                cache.allocate(identifier, feature.length, rid)
                self.encoder_budget -= feature.length
                continue
            return max(0, feature.offset - start)
        return num_new

    def _release_images(self, request: Request, computed_only: bool = False) -> None:
        """Drop the request's references to image embeddings (with computed_only, of the
        images whose placeholders are all computed)."""
        if self.encoder_cache is None:
            return
        for feature in request.mm_features:
            if computed_only and feature.offset + feature.length > request.num_computed_tokens:
                break
            self.encoder_cache.release(feature.identifier, request.request_id)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> tuple[int, bool]:
        preempted = False
        scheduled: dict[str, ScheduledRequest] = {}
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._fit_images(request, request.num_computed_tokens, min(
                request.num_tokens - request.num_computed_tokens, budget))
            if num_new == 0:
                i += 1  # its next image waits for encoder budget or cache space
                continue
            # each later running request keeps at least one token of the budget: proposals
            # are what a short budget drops, and proposals without room for their slots
            drafts = self._drafts(request, num_new, budget - (len(self.running) - i - 1))
            if drafts and self.kv.allocate_slots(request, num_new + len(drafts)):
                scheduled[request.request_id] = ScheduledRequest(
                    request, num_new + len(drafts), [], drafts)
                budget -= num_new + len(drafts)
                i += 1
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = self._pick_victim()
                preempted = True
                undone = scheduled.pop(victim.request_id, None)
                if undone is not None:
                    budget += undone.num_new_tokens
                    i -= 1  # the victim sat before request in self.running
                self._preempt(victim)
                if victim is request:
                    num_new = 0
                    break
            if num_new == 0:
                continue  # request itself was preempted; running[i] is now the next one
            scheduled[request.request_id] = ScheduledRequest(request, num_new, [])
            budget -= num_new
            i += 1
        out.scheduled.extend(scheduled.values())
        return budget, preempted

    def _drafts(self, request: Request, num_new: int, budget: int) -> list[int]:
        """The proposals a decode verifies this step, within the budget and its limits (a
        longer run could only be cut by max_tokens or max_model_len)."""
        proposed = request.spec_token_ids
        if not proposed or num_new != 1 or request.num_tokens - request.num_computed_tokens != 1:
            return []
        room = min(budget - 1, request.max_tokens - request.num_output_tokens - 1,
                   request.max_model_len - request.num_tokens - 1)
        return proposed[:max(room, 0)]

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time, r.seq))
        return self.running[-1]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        self._release_images(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_draft_computed = 0  # its blocks, the draft's K/V with them, are gone
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add_front(request)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        # At most max_loras distinct adapters run at once (the model's slots). A request whose
        # adapter would be one too many waits and later ones may pass it, as in vLLM; once
        # it has waited LORA_MAX_SKIPS steps nothing passes it any more, so it cannot starve.
        active = {r.lora.uid for r in self.running if r.lora is not None}
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            if (request.lora is not None and request.lora.uid not in active
                    and len(active) >= self.config.max_loras):
                skipped.append(self.waiting.pop())
                request.lora_skips += 1
                if request.lora_skips > LORA_MAX_SKIPS:
                    break
                continue
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            tier2 = self._second_tier_hits(request, len(hit_blocks))
            if tier2:  # load those blocks first; the request is admitted once they are back
                if not self._start_load(request, hit_blocks, tier2):
                    break
                continue
            num_new = request.num_tokens - num_hit
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            wanted = min(num_new, budget)
            num_new = self._fit_images(request, num_hit, wanted)
            if num_new == 0 or (num_new < wanted and not self.config.enable_chunked_prefill) \
                    or not self.kv.allocate_slots(request, num_new, hit_blocks):
                self._release_images(request)
                break
            self.waiting.pop()
            self.kv.record_lookup(request, num_hit)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
                if request.queued_time:  # traced
                    request.scheduled_time = time.time()
            request.num_computed_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new, []))
            budget -= num_new
            if request.lora is not None:
                active.add(request.lora.uid)
        for request in reversed(skipped):
            self.waiting.add_front(request)

    # ---- the second KV tier ------------------------------------------------------------
    def _second_tier_hits(self, request: Request, num_hit_blocks: int) -> list[int]:
        """Hashes of the blocks after the prefix hits that the second tier holds."""
        if (self.offload is None or request.kv_loads >= MAX_KV_LOADS
                or not request.block_hashes):  # (no hashes: prompt logprobs, caching off)
            return []
        limit = (request.num_tokens - 1) // self.kv.block_size  # the last token is computed
        wanted = request.block_hashes[num_hit_blocks:limit]
        return wanted[:self.offload.count_hits(wanted)]

    def _start_load(self, request: Request, hit_blocks: list[int], hashes: list[int]) -> bool:
        assert self.offload is not None
        block_ids = self.kv.allocate_for_load(request, hit_blocks, len(hashes))
        if block_ids is None:
            return False
        self.waiting.pop()
        request.kv_loads += 1
        self.loading[request.request_id] = (request, block_ids, hashes)
        self.offload.start_load(request.request_id, list(zip(block_ids, hashes, strict=True)))
        return True

    def _end_load(self, request_id: str, loaded: bool) -> Request:
        """Loaded blocks join the prefix cache (the request, admitted again, hits them)."""
        request, block_ids, hashes = self.loading.pop(request_id)
        self.kv.finish_load(request, block_ids, hashes, loaded)
        return request

    # ---- after the forward pass --------------------------------------------------------
    def update_from_output(
        self, out: SchedulerOutput, result: StepResult
    ) -> list[EngineCoreOutput]:
        """Advance computed counts, append sampled tokens, finish stopped requests."""
        outputs: list[EngineCoreOutput] = []
        self.num_steps += 1
        for i, item in enumerate(out.scheduled):
            request = item.request
            computed = request.num_computed_tokens
            self.num_prompt_tokens += max(
                0, min(request.num_prompt_tokens, computed + item.num_new_tokens) - computed
            )
            request.num_computed_tokens += item.num_new_tokens
            if computed < _images_end(request):  # the chunk reached image placeholders
                self._release_images(request, computed_only=True)
            token = result.sampled[i]
            prompt_lp = result.prompt_logprobs[i] if result.prompt_logprobs else None
            if token is None:
                if prompt_lp is not None:
                    outputs.append(
                        EngineCoreOutput(request.request_id, [], new_prompt_logprobs=prompt_lp)
                    )
                continue
            tokens = [token]
            if item.spec_token_ids:
                tokens += result.spec_tokens[i] if result.spec_tokens else []
                self._verified(item, len(tokens) - 1)
            status, tokens = _append_until_stop(request, tokens)
            self.num_generation_tokens += len(tokens)
            logprobs = result.logprobs[i] if result.logprobs else None
            output = EngineCoreOutput(
                request.request_id,
                tokens,
                new_logprobs=_first_rows(logprobs, len(tokens)),
                new_prompt_logprobs=prompt_lp,
                num_cached_tokens=max(request.num_cached_tokens, 0),
            )
            if request.queued_time:  # traced: the core's timestamps, once
                output.timings = RequestTimings(request.queued_time, request.scheduled_time)
                request.queued_time = 0.0
            if status is not None:
                self._finish(request, status)
                output.finish_reason = status.finish_reason
                output.stop_reason = request.stop_reason
            outputs.append(output)
        return outputs

    def _verified(self, item: ScheduledRequest, num_accepted: int) -> None:
        """Proposals checked: only the accepted ones (and the token before them) count as
        computed; the slots written for the rejected ones are overwritten later."""
        request, num_drafts = item.request, len(item.spec_token_ids)
        request.num_computed_tokens -= num_drafts - num_accepted
        request.spec_token_ids = []
        self.spec_stats.observe(num_drafts, num_accepted)
        rate = num_accepted / num_drafts
        request.spec_acceptance = 0.7 * request.spec_acceptance + 0.3 * rate

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.running.remove(request)
        self.kv.free(request)
        self._release_images(request)
        del self.requests[request.request_id]

    def stats(self) -> SchedulerStats:
        lora = self.config.max_loras > 0  # (counting walks the queue: only when LoRA is on)
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            num_kv_blocks=self.kv.num_blocks,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_steps=self.num_steps,
            running_lora_adapters=_adapter_counts(self.running) if lora else {},
            waiting_lora_adapters=_adapter_counts(self.waiting.requests()) if lora else {},
            max_lora=self.config.max_loras,
            spec_num_drafts=self.spec_stats.num_drafts,
            spec_num_draft_tokens=self.spec_stats.num_draft_tokens,
            spec_num_accepted_tokens=self.spec_stats.num_accepted_tokens,
            spec_num_accepted_tokens_per_pos=list(self.spec_stats.num_accepted_tokens_per_pos),
            **self._encoder_stats(),
        )

    def _encoder_stats(self) -> dict[str, int]:
        cache = self.encoder_cache
        if cache is None:
            return {}
        return {"mm_encoder_cache_queries": cache.queries, "mm_encoder_cache_hits": cache.hits}


def _append_until_stop(request: Request, tokens: list[int]
                       ) -> tuple[RequestStatus | None, list[int]]:
    """Append the step's tokens one by one; a stop (EOS, stop token, max_tokens) inside an
    accepted run drops the tokens after it. Returns the status and the tokens kept."""
    for n, token in enumerate(tokens, 1):
        request.append_token(token)
        status = request.check_stop()
        if status is not None:
            return status, tokens[:n]
    return None, tokens


def _first_rows(lists: LogprobsLists | None, n: int) -> LogprobsLists | None:
    if lists is None or len(lists.ranks) <= n:
        return lists
    return LogprobsLists(lists.token_ids[:n], lists.logprobs[:n], lists.ranks[:n])


def _images_end(request: Request) -> int:
    """Where the request's last image placeholder ends (0 without images)."""
    last = request.mm_features[-1] if request.mm_features else None
    return 0 if last is None else last.offset + last.length


def _adapter_counts(requests: Iterable[Request]) -> dict[str, int]:
    return dict(Counter(r.lora.name for r in requests if r.lora is not None))

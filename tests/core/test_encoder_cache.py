"""The encoder cache (which image embeddings the runner keeps) alone, then under the
scheduler with fake outputs: encoder budget cuts, eviction, preemption, finishing."""

from __future__ import annotations

import itertools

import torch

from kvflow.config import SchedulerConfig
from kvflow.core.encoder_cache import EncoderCacheManager
from kvflow.core.kv_cache import KVCacheManager
from kvflow.core.request import Request, RequestStatus
from kvflow.core.scheduler import Scheduler, SchedulerOutput, StepResult
from kvflow.engine.protocol import EngineCoreRequest, MultiModalFeature
from kvflow.sampling_params import SamplingParams


# ---- EncoderCacheManager alone --------------------------------------------------------------
def test_allocate_then_lookup_adds_users() -> None:
    cache = EncoderCacheManager(100)
    assert not cache.lookup("a", "r1")  # a miss adds nobody
    assert "a" not in cache and cache.num_referenced == 0
    assert cache.can_allocate(25)
    cache.allocate("a", 25, "r1")
    cache.end_step()  # the step that reserved it was scheduled
    cache.check_invariants()
    assert cache.num_free == 75 and cache.holds("a", "r1") and not cache.holds("a", "r2")
    assert cache.lookup("a", "r2")  # encoded already: r2 shares it
    assert cache.users["a"] == {"r1", "r2"} and cache.num_free == 75
    assert (cache.queries, cache.hits) == (2, 1)
    cache.check_invariants()


def test_a_reservation_given_up_in_its_own_step_leaves_nothing() -> None:
    """A request that reserved an image but was not scheduled (no KV blocks, preempted):
    the entry was never encoded, so it goes whole: no freeable entry, no query, no eviction
    report."""
    cache = EncoderCacheManager(100)
    assert cache.can_allocate(25)
    cache.allocate("a", 25, "r1")
    cache.release("a", "r1")
    assert "a" not in cache and cache.num_free == 100 and not cache.freeable
    assert (cache.queries, cache.take_freed()) == (0, [])
    cache.check_invariants()


def test_release_makes_freeable_without_freeing_space() -> None:
    cache = EncoderCacheManager(100)
    cache.allocate("a", 25, "r1")
    cache.end_step()  # the step that reserved it was scheduled
    cache.lookup("a", "r2")
    cache.release("a", "r1")
    assert "a" not in cache.freeable and cache.num_referenced == 1  # r2 still needs it
    cache.release("a", "r2")
    cache.check_invariants()
    assert "a" in cache.freeable and "a" in cache and cache.num_free == 75
    assert cache.num_referenced == 0 and cache.take_freed() == []
    cache.release("a", "r2")  # releasing twice, or what was never held, changes nothing
    cache.release("missing", "r1")
    cache.check_invariants()
    assert list(cache.freeable) == ["a"]


def test_eviction_only_when_needed_oldest_first_reported_once() -> None:
    cache = EncoderCacheManager(100)
    for identifier in "abc":
        cache.allocate(identifier, 30, "r1")
        cache.end_step()  # the step that reserved it was scheduled
    cache.release("b", "r1")
    cache.release("a", "r1")  # freeable, oldest first: b, a; c still referenced
    assert cache.can_allocate(10)  # fits in the free space: nothing evicted
    assert set(cache.sizes) == {"a", "b", "c"} and cache.take_freed() == []
    assert cache.can_allocate(40)  # needs one eviction: the oldest, b
    cache.allocate("d", 40, "r2")
    cache.end_step()  # the step that reserved it was scheduled
    cache.check_invariants()
    assert set(cache.sizes) == {"a", "c", "d"} and cache.num_free == 0
    assert cache.take_freed() == ["b"] and cache.take_freed() == []
    assert not cache.can_allocate(31)  # a (30) is all that may go; c and d are referenced
    assert "a" in cache and cache.take_freed() == []  # a failed attempt evicts nothing
    assert not cache.can_allocate(101)  # more than the capacity
    cache.check_invariants()


def test_a_hit_on_a_freeable_entry_revives_it() -> None:
    cache = EncoderCacheManager(60)
    cache.allocate("a", 30, "r1")
    cache.end_step()  # the step that reserved it was scheduled
    cache.allocate("b", 30, "r1")
    cache.end_step()  # the step that reserved it was scheduled
    cache.release("a", "r1")
    cache.release("b", "r1")
    assert cache.lookup("a", "r2")  # a leaves the freeable list: only b may be evicted
    cache.check_invariants()
    assert list(cache.freeable) == ["b"] and cache.num_referenced == 1
    assert not cache.can_allocate(31)
    assert cache.can_allocate(30)
    assert cache.take_freed() == ["b"]
    cache.release("a", "r2")  # released again, a is now the newest freeable entry
    cache.allocate("c", 30, "r3")
    cache.end_step()  # the step that reserved it was scheduled
    cache.release("c", "r3")
    assert list(cache.freeable) == ["a", "c"]
    cache.check_invariants()


def test_reset() -> None:
    cache = EncoderCacheManager(100)
    cache.allocate("a", 25, "r1")
    cache.end_step()  # the step that reserved it was scheduled
    cache.allocate("b", 25, "r2")
    cache.end_step()  # the step that reserved it was scheduled
    cache.release("b", "r2")
    assert not cache.reset()  # a is referenced: nothing changes
    assert set(cache.sizes) == {"a", "b"} and cache.take_freed() == []
    cache.release("a", "r1")
    assert cache.reset()
    cache.check_invariants()
    assert not cache.sizes and not cache.freeable and cache.num_free == 100
    assert sorted(cache.take_freed()) == ["a", "b"]


# ---- under the scheduler ---------------------------------------------------------------------
IMAGE_TOKEN = 9999
TOKENS_PER_IMAGE = 25
_seq = itertools.count(1)
_text = itertools.count(1)  # distinct text tokens: no prefix sharing between requests


def image_request(request_id: str, prompt_len: int, images: list[tuple[str, int]],
                  max_tokens: int = 4) -> Request:
    """A request whose prompt holds each (identifier, offset) image's placeholder run."""
    prompt = [next(_text) for _ in range(prompt_len)]
    features = []
    for identifier, offset in images:
        prompt[offset:offset + TOKENS_PER_IMAGE] = [IMAGE_TOKEN] * TOKENS_PER_IMAGE
        features.append(MultiModalFeature(identifier, offset, TOKENS_PER_IMAGE, pixels=b"",
                                          shape=[0]))
    assert len(prompt) == prompt_len
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    req = EngineCoreRequest(request_id, prompt, params, [0], 0.0, 0, mm_features=features)
    return Request(req, 4096, next(_seq), torch.device("cpu"))


def make_scheduler(encoder_budget: int, budget: int = 64, num_blocks: int = 64,
                   block_size: int = 16) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget,
                             enable_chunked_prefill=True, policy="fcfs", stream_interval=1,
                             encoder_budget=encoder_budget)
    return Scheduler(config, KVCacheManager(num_blocks, block_size, True), max_model_len=4096)


def fake_step(s: Scheduler) -> SchedulerOutput:
    """Schedule, 'compute', sample token 7 where a token is due; check the encoder cache."""
    out = s.schedule()
    sampled = [7 if item.completes_sequence else None for item in out.scheduled]
    s.update_from_output(out, StepResult(sampled))
    assert s.encoder_cache is not None
    s.encoder_cache.check_invariants()
    return out


def chunks(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(item.request.request_id, item.num_new_tokens) for item in out.scheduled]


def run_to_end(s: Scheduler, max_steps: int = 1000) -> list[str]:
    """Every identifier the runner was told to drop, in order."""
    freed: list[str] = []
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            return freed
        freed += fake_step(s).freed_encoder_ids
    raise AssertionError("scheduler did not finish: deadlock?")


def assert_no_leaks(s: Scheduler) -> None:
    assert not s.requests and not s.running and not s.waiting
    assert s.kv.num_free_blocks == s.kv.num_blocks and not s.kv.req_blocks
    s.kv.check_invariants()
    assert s.encoder_cache is not None and s.encoder_cache.num_referenced == 0
    s.encoder_cache.check_invariants()


def test_chunk_ends_before_an_image_over_the_encoder_budget() -> None:
    s = make_scheduler(encoder_budget=30)  # one 25-token image per step
    s.add_request(image_request("r1", 40, [("a", 5)]))
    s.add_request(image_request("r2", 40, [("b", 10)]))
    out = fake_step(s)
    # r1 takes the step's encoder budget; r2 stops right before its placeholders
    assert chunks(out) == [("r1", 40), ("r2", 10)]
    assert s.encoder_cache is not None
    assert "b" not in s.encoder_cache and out.freed_encoder_ids == []
    out = fake_step(s)  # a is done with (all its placeholders computed): evicted for b
    assert chunks(out) == [("r1", 1), ("r2", 30)]
    assert out.freed_encoder_ids == ["a"]
    assert run_to_end(s) == []
    # a and b each counted once, when reserved (b's wait in step 1 is no query); nothing hit
    assert (s.encoder_cache.queries, s.encoder_cache.hits) == (2, 0)
    assert_no_leaks(s)


def test_placeholders_split_over_chunks_encode_once() -> None:
    s = make_scheduler(encoder_budget=25, budget=16)
    s.add_request(image_request("r", 40, [("a", 4)], max_tokens=2))
    assert s.encoder_cache is not None
    steps = [chunks(fake_step(s)) for _ in range(3)]
    assert steps == [[("r", 16)], [("r", 16)], [("r", 8)]]
    assert (s.encoder_cache.queries, s.encoder_cache.hits) == (1, 0)  # looked up once
    assert run_to_end(s) == []
    assert list(s.encoder_cache.freeable) == ["a"]  # kept for a later request
    assert_no_leaks(s)


def test_second_image_of_a_prompt_waits_for_the_next_step() -> None:
    s = make_scheduler(encoder_budget=25)  # the cache holds one image at a time too
    s.add_request(image_request("r", 70, [("a", 5), ("b", 35)]))
    out = fake_step(s)
    assert chunks(out) == [("r", 35)]  # up to b's placeholders
    out = fake_step(s)
    assert chunks(out) == [("r", 35)] and out.freed_encoder_ids == ["a"]
    run_to_end(s)
    assert_no_leaks(s)


def test_a_shared_image_is_allocated_once_per_step() -> None:
    s = make_scheduler(encoder_budget=25)
    s.add_request(image_request("r1", 30, [("x", 2)]))
    s.add_request(image_request("r2", 30, [("x", 3)]))
    out = fake_step(s)
    assert chunks(out) == [("r1", 30), ("r2", 30)]  # r2 needs no encoder budget: a hit
    assert s.encoder_cache is not None
    assert (s.encoder_cache.queries, s.encoder_cache.hits) == (2, 1)
    run_to_end(s)
    assert_no_leaks(s)


def test_an_image_that_never_fits_does_not_block_others() -> None:
    s = make_scheduler(encoder_budget=25, budget=32)
    s.add_request(image_request("r1", 40, [("a", 0)]))
    s.add_request(image_request("r2", 40, [("b", 0)]))
    out = fake_step(s)
    assert chunks(out) == [("r1", 32)]  # r2's chunk would be empty: it waits
    assert run_to_end(s) == ["a"]
    assert_no_leaks(s)


def test_preemption_releases_image_references() -> None:
    # r2 is preempted mid-image (its placeholders half computed): its reference goes, the
    # embeddings stay (freeable) and serve its recompute without encoding again.
    s = make_scheduler(encoder_budget=25, budget=16, num_blocks=9, block_size=4)
    r1 = image_request("r1", 8, [], max_tokens=20)
    r2 = image_request("r2", 28, [("b", 0)], max_tokens=2)
    s.add_request(r1)
    s.add_request(r2)
    cache = s.encoder_cache
    assert cache is not None
    freed: list[str] = []
    for _ in range(50):
        freed += fake_step(s).freed_encoder_ids
        if r2.num_preemptions:
            break
    assert r2.num_preemptions == 1 and r2.status == RequestStatus.PREEMPTED
    assert not cache.holds("b", "r2") and cache.num_referenced == 0
    assert "b" in cache and list(cache.freeable) == ["b"]
    hits = cache.hits
    freed += run_to_end(s)
    assert cache.hits > hits and "b" not in freed  # found again, never re-encoded
    assert r1.num_output_tokens == 20 and r2.num_output_tokens == 2
    assert_no_leaks(s)


def test_finish_and_abort_release_references() -> None:
    s = make_scheduler(encoder_budget=25, budget=16)
    s.add_request(image_request("done", 30, [("a", 0)], max_tokens=1))
    s.add_request(image_request("aborted", 40, [("b", 0)], max_tokens=4))
    s.add_request(image_request("queued", 40, [("c", 0)], max_tokens=4))
    cache = s.encoder_cache
    assert cache is not None
    for _ in range(10):
        fake_step(s)
        if cache.holds("b", "aborted"):
            break
    assert "done" not in s.requests  # finished: a is released
    assert cache.holds("b", "aborted") and s.requests["aborted"].num_computed_tokens < 25
    ended = s.finish_requests(["aborted", "queued"], RequestStatus.FINISHED_ABORTED)
    assert sorted(r.request_id for r in ended) == ["aborted", "queued"]
    assert cache.num_referenced == 0 and list(cache.freeable) == ["b"]  # (a made room for b)
    assert_no_leaks(s)

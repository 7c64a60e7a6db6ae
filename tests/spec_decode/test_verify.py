"""Verification bookkeeping without a model: attention rows, accepted runs, and the
scheduler's budget, computed counts, stops and block hashes with proposals."""

from __future__ import annotations

from kvflow.config import SchedulerConfig
from kvflow.core.kv_cache import KVCacheManager, hash_block
from kvflow.core.request import Request
from kvflow.core.scheduler import Scheduler, StepResult
from kvflow.spec_decode.verify import accepted_run, attention_rows
from tests.core.helpers import make_request


def make_scheduler(num_blocks: int = 64, budget: int = 64) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget,
                             enable_chunked_prefill=True, policy="fcfs", stream_interval=1)
    return Scheduler(config, KVCacheManager(num_blocks, 16, True), max_model_len=4096)


def test_attention_rows_split_verifying_requests() -> None:
    q, s, t = attention_rows([5, 3, 1], [5, 13, 20], [[0], [1], [2, 3]], [0, 2, 0])
    assert q == [5, 1, 1, 1, 1]
    assert s == [5, 11, 12, 13, 20]
    assert t == [[0], [1], [1], [1], [2, 3]]


def test_accepted_run() -> None:
    assert accepted_run([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]  # all + the bonus token
    assert accepted_run([4, 9, 6, 7], [4, 5, 6]) == [4, 9]  # corrected at the mismatch
    assert accepted_run([8, 5, 6, 7], [4, 5, 6]) == [8]
    assert accepted_run([3], []) == [3]


def prefill(s: Scheduler, *requests: Request) -> None:
    for r in requests:
        s.add_request(r)
    out = s.schedule()
    s.update_from_output(out, StepResult([7] * len(out.scheduled)))


def test_budget_drops_proposals_first_and_counts_accepted() -> None:
    s = make_scheduler(budget=6)
    a, b, c = (make_request(x, [1, 2], max_tokens=50) for x in "abc")
    prefill(s, a, b, c)
    a.spec_token_ids = [4, 5, 6, 7, 8]
    b.spec_token_ids = [9, 9]
    out = s.schedule()
    # 6 tokens: b and c keep one each, a verifies 3 of its proposals; b none left
    assert [(i.request.request_id, i.num_new_tokens, i.spec_token_ids) for i in out.scheduled] \
        == [("a", 4, [4, 5, 6]), ("b", 1, []), ("c", 1, [])]
    computed = a.num_computed_tokens
    outputs = s.update_from_output(out, StepResult([4, 7, 7], spec_tokens=[[5, 1], [], []]))
    assert outputs[0].new_token_ids == [4, 5, 1]  # two accepted, then the correction
    assert a.num_computed_tokens == computed + 3  # the last token and two accepted
    assert a.num_computed_tokens == a.num_tokens - 1
    stats = s.stats()
    assert (stats.spec_num_drafts, stats.spec_num_draft_tokens,
            stats.spec_num_accepted_tokens) == (1, 3, 2)
    assert stats.spec_num_accepted_tokens_per_pos == [1, 1]
    assert s.num_generation_tokens == 3 + 3 + 2  # prefill 3, then a's 3, b's and c's
    s.finish_requests(["a", "b", "c"], a.status.FINISHED_ABORTED)
    s.kv.check_invariants()
    assert not s.kv.req_blocks


def test_max_tokens_and_eos_cut_an_accepted_run() -> None:
    s = make_scheduler()
    a = make_request("a", [1, 2], max_tokens=3)
    b = make_request("b", [1, 2], max_tokens=10)
    prefill(s, a, b)
    a.spec_token_ids = [4, 5, 6]  # the scheduler verifies only 1: max_tokens leaves 2 more
    b.spec_token_ids = [4, 0, 6]  # 0 is EOS (tests.core.helpers)
    out = s.schedule()
    assert [len(i.spec_token_ids) for i in out.scheduled] == [1, 3]
    outputs = s.update_from_output(out, StepResult([4, 4], spec_tokens=[[5], [0, 6, 8]]))
    assert outputs[0].new_token_ids == [4, 5] and outputs[0].finish_reason is not None
    assert outputs[1].new_token_ids == [4, 0] and str(outputs[1].finish_reason) == "stop"
    assert not s.requests and not s.kv.req_blocks
    s.kv.check_invariants()


def test_rejected_tokens_never_reach_the_prefix_cache() -> None:
    """Proposals crossing a block boundary are rejected: the block is hashed later from the
    accepted tokens only, and equals a plain hash of the final token ids."""
    s = make_scheduler()
    r = make_request("r", list(range(100, 114)), max_tokens=20)
    prefill(s, r)  # 15 tokens: block 0 not full yet
    r.spec_token_ids = [1, 2, 3, 4]  # would fill positions 15..18
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == 5
    s.update_from_output(out, StepResult([1], spec_tokens=[[9]]))  # 1 accepted, then 9
    assert r.all_token_ids[-2:] == [1, 9]
    for _ in range(3):
        out = s.schedule()
        s.update_from_output(out, StepResult([5]))
    tokens = r.all_token_ids
    assert r.block_hashes[0] == hash_block(None, tokens[:16], (None, None))
    block0 = s.kv.block_ids("r")[0]
    assert s.kv.cached[r.block_hashes[0]] == block0
    assert len(s.kv.cached) == 1  # block 1 (positions 16..31) is not full
    s.finish_requests(["r"], r.status.FINISHED_ABORTED)
    s.kv.check_invariants()


def test_no_room_for_proposals_verifies_none_instead_of_preempting() -> None:
    s = make_scheduler(num_blocks=2)
    r = make_request("r", list(range(100, 130)), max_tokens=20)  # 31 tokens: 2 blocks
    prefill(s, r)
    r.spec_token_ids = [1, 2, 3]  # positions 31..33 need a third block
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == 1 and not out.scheduled[0].spec_token_ids
    assert s.num_preemptions == 0
    s.update_from_output(out, StepResult([5]))
    s.finish_requests(["r"], r.status.FINISHED_ABORTED)
    s.kv.check_invariants()

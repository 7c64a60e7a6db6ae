"""KVCacheManager without a model: allocation, sharing, LRU eviction, invariants."""

from __future__ import annotations

import pytest

from kvflow.core.kv_cache import KVCacheManager
from tests.core.helpers import make_request

BS = 16


@pytest.fixture
def kv() -> KVCacheManager:
    manager = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=True)
    yield manager
    manager.check_invariants()


def admit(kv: KVCacheManager, req, num_new: int | None = None) -> int:
    """Admit a request the way the scheduler does; returns its cached tokens."""
    hits, num_hit = kv.get_computed_blocks(req)
    num_new = req.num_tokens - num_hit if num_new is None else num_new
    assert kv.allocate_slots(req, num_new, hits)
    req.num_computed_tokens = num_hit + num_new
    return num_hit


def test_hash_chain_covers_only_full_blocks(kv: KVCacheManager) -> None:
    req = make_request("a", list(range(40)))  # 2 full blocks + 8 tokens
    admit(kv, req)
    assert len(req.block_hashes) == 2
    assert len(kv.block_ids("a")) == 3
    assert len(kv.cached) == 2
    kv.free(req)


def test_common_prefix_shares_blocks_with_refcounts(kv: KVCacheManager) -> None:
    prefix = list(range(100, 148))  # exactly 3 blocks
    a = make_request("a", prefix + [1, 2, 3])
    b = make_request("b", prefix + [7, 8, 9, 10])
    assert admit(kv, a) == 0
    assert admit(kv, b) == 48
    assert kv.block_ids("a")[:3] == kv.block_ids("b")[:3]
    assert kv.block_ids("a")[3] != kv.block_ids("b")[3]
    for block_id in kv.block_ids("a")[:3]:
        assert kv.blocks[block_id].ref_cnt == 2
    kv.check_invariants()
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == kv.num_blocks


def test_fully_cached_prompt_still_computes_its_last_token(kv: KVCacheManager) -> None:
    prompt = list(range(32))
    a = make_request("a", prompt)
    admit(kv, a)
    kv.free(a)
    b = make_request("b", prompt)
    assert admit(kv, b) == 16  # the last block is recomputed to get the last logits
    kv.free(b)


def test_lru_eviction_order(kv: KVCacheManager) -> None:
    reqs = [make_request(f"r{i}", [i] * 32) for i in range(3)]  # 2 blocks each
    for req in reqs:
        admit(kv, req)
    for req in reqs:
        kv.free(req)
    assert len(kv.cached) == 6
    # 4 uncached free blocks go first; then r0's blocks (released first), tail before head
    big = make_request("big", [999] * (BS * 6))
    assert kv.allocate_slots(big, BS * 6)
    r0_hashes = set(reqs[0].block_hashes)
    assert not r0_hashes & set(kv.cached)
    assert set(reqs[1].block_hashes) <= set(kv.cached)
    assert set(reqs[2].block_hashes) <= set(kv.cached)
    kv.free(big)


def test_cached_blocks_not_evicted_while_other_blocks_are_free(kv: KVCacheManager) -> None:
    a = make_request("a", [5] * 48)
    admit(kv, a)
    kv.free(a)
    b = make_request("b", [6] * 100)  # 7 blocks: exactly the uncached free ones
    admit(kv, b)
    assert set(a.block_hashes) <= set(kv.cached)
    kv.free(b)


def test_failed_allocation_changes_nothing(kv: KVCacheManager) -> None:
    a = make_request("a", [1] * 100)
    admit(kv, a)
    before = (kv.num_free_blocks, dict(kv.cached), [b.ref_cnt for b in kv.blocks])
    b = make_request("b", [2] * 100)
    hits, _ = kv.get_computed_blocks(b)
    assert not kv.allocate_slots(b, 100, hits)
    assert (kv.num_free_blocks, dict(kv.cached), [b.ref_cnt for b in kv.blocks]) == before
    assert kv.block_ids("b") == []
    kv.free(a)


def test_reset_prefix_cache_refused_while_in_use(kv: KVCacheManager) -> None:
    a = make_request("a", [3] * 40)
    admit(kv, a)
    assert not kv.reset_prefix_cache()
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert not kv.cached


def test_cache_salt_isolates(kv: KVCacheManager) -> None:
    prompt = [4] * 40
    a = make_request("a", prompt, cache_salt="tenant-1")
    b = make_request("b", prompt, cache_salt="tenant-2")
    c = make_request("c", prompt, cache_salt="tenant-1")
    assert admit(kv, a) == 0
    assert admit(kv, b) == 0
    assert admit(kv, c) == 32
    for req in (a, b, c):
        kv.free(req)


def test_caching_disabled_shares_nothing() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_caching=False)
    a, b = make_request("a", [1] * 40), make_request("b", [1] * 40)
    assert admit(kv, a) == 0
    assert admit(kv, b) == 0
    assert not set(kv.block_ids("a")) & set(kv.block_ids("b"))
    kv.free(a)
    kv.free(b)
    kv.check_invariants()

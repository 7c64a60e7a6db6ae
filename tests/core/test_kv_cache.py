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


IMG = 99_999  # the placeholder id: equal for every image


def image_prompt(text_before: int, image_len: int, text_after: int) -> list[int]:
    return list(range(text_before)) + [IMG] * image_len + list(range(500, 500 + text_after))


def test_block_keys_name_each_image_and_its_offset(kv: KVCacheManager) -> None:
    """vLLM's test_mm_prefix_caching: a block covering placeholders is keyed by (image hash,
    image start - block start) of each image it overlaps; blocks before an image by text."""
    prompt = list(range(10)) + [IMG] * 20 + [IMG] * 10 + list(range(3))  # images at 10, 30
    req = make_request("a", prompt, images=[("aaa", 10, 20), ("bbb", 30, 10)])
    kv._update_hashes(req, req.num_tokens)
    assert [kv._extra_keys(req, i) for i in range(3)] == [
        (None, None, (("aaa", 10),)),  # block 0: tokens 0-15, image aaa from 10
        (None, None, (("aaa", -6), ("bbb", 14))),  # block 1: 16-31, aaa began 6 before
        (None, None, (("bbb", -2),)),  # block 2: 32-47
    ]
    text = make_request("t", list(range(40)))
    assert kv._extra_keys(text, 0) == (None, None)


def test_same_text_other_image_shares_only_the_blocks_before_it(kv: KVCacheManager) -> None:
    prompt = image_prompt(32, 20, 12)  # blocks 0-1 text, 2-3 cover the image
    first = make_request("a", prompt, images=[("cat", 32, 20)])
    assert admit(kv, first) == 0
    kv.free(first)
    other = make_request("b", prompt, images=[("dog", 32, 20)])
    assert admit(kv, other) == 2 * BS  # the text blocks only: never the cat's KV
    kv.free(other)
    same = make_request("c", prompt, images=[("cat", 32, 20)])
    assert admit(kv, same) == 3 * BS  # every full block (the last token is computed anyway)
    kv.free(same)
    text = make_request("d", list(range(32)) + list(range(700, 720)))
    assert admit(kv, text) == 2 * BS  # a text prompt shares the blocks before the image
    kv.free(text)


def test_swapped_adjacent_images_share_nothing(kv: KVCacheManager) -> None:
    """Equal token ids (two adjacent placeholder runs), images in the other order."""
    prompt = image_prompt(0, 32, 17)
    first = make_request("a", prompt, images=[("cat", 0, 16), ("dog", 16, 16)])
    admit(kv, first)
    kv.free(first)
    swapped = make_request("b", prompt, images=[("dog", 0, 16), ("cat", 16, 16)])
    assert admit(kv, swapped) == 0
    kv.free(swapped)
    again = make_request("c", prompt, images=[("cat", 0, 16), ("dog", 16, 16)])
    assert admit(kv, again) == 3 * BS
    kv.free(again)

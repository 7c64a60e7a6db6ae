"""Paged KV cache bookkeeping: a block pool with an LRU free list and prefix hashing.

This module only tracks block ids; the tensors live in the model runner. Each request
owns a list of block ids (its block table). A full block has a hash chained from its
parent's hash, its token ids and extra keys, so equal prefixes map to equal hashes and
share one physical block through reference counts.

Invariants (checked by `check_invariants`):
- a block is in the free list iff its ref_cnt is 0;
- a block is in the hash table iff it has a hash, and the table maps that hash to it;
- every block id held by a request has ref_cnt >= 1.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import msgspec

from kvflow.core.request import Request
from kvflow.engine.protocol import KVCacheEvents, MultiModalFeature


class Block:
    """One physical KV block."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None


_ENCODER = msgspec.msgpack.Encoder()


def hash_block(parent_hash: int | None, token_ids: Sequence[int], extra: tuple) -> int:
    """Hash of one full block, chained from its parent so a hash names the whole prefix.

    Stable across processes and restarts (blake2b of a canonical encoding; Python's hash()
    of None and of strings changes from run to run), so a KV tier on disk can be found again
    by the same hashes after a restart. A 64-bit digest: ~2 us a block.
    """
    data = _ENCODER.encode((parent_hash, tuple(token_ids), extra))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def block_extra_keys(block_index: int, block_size: int, lora_key: str | None,
                     cache_salt: str | None, mm_features: Sequence[MultiModalFeature]) -> tuple:
    """What a block's hash carries besides its tokens: the adapter's content digest, the
    cache salt (first block only) and the images it overlaps. One rule for the prefix cache,
    the second KV tier and the data-parallel router, so they never key a block differently."""
    salt = cache_salt if block_index == 0 else None
    if not mm_features:
        return (lora_key, salt)
    # Placeholder ids are equal for every image: a block covering image placeholders is
    # keyed by each such image's content hash and where the image starts relative to the
    # block, so another image (or the same one elsewhere) never reuses this KV.
    start = block_index * block_size
    end = start + block_size
    images = tuple((f.identifier, f.offset - start) for f in mm_features
                   if f.offset < end and f.offset + f.length > start)
    # (blocks before the first image hash as text: a text prompt shares them)
    return (lora_key, salt, images) if images else (lora_key, salt)


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, lora_key: str | None = None,
                        cache_salt: str | None = None,
                        mm_features: Sequence[MultiModalFeature] = ()) -> list[int]:
    """The hashes of a prompt's blocks that a prefix-cache lookup can hit (full blocks, the
    last token always left to compute), as the core computes them."""
    hashes: list[int] = []
    parent = None
    for i in range((len(token_ids) - 1) // block_size):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size],
                            block_extra_keys(i, block_size, lora_key, cache_salt, mm_features))
        hashes.append(parent)
    return hashes


class KVCacheManager:
    """Allocates blocks to requests, shares cached prefixes, evicts least recently used."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # LRU order: the first entry is evicted first. O(1) removal from the middle.
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.req_blocks: dict[str, list[int]] = {}
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found
        # called with (block id, hash) as a cached block is evicted, before its reuse: the
        # second KV tier copies it out here
        self.on_evict: Callable[[int, int], None] | None = None
        # KV cache events (data-parallel routing): hash -> cached now? The last change of
        # each hash since the last take_events(); None (off) costs nothing.
        self.event_state: dict[int, bool] | None = None
        self.events_cleared = False

    # ---- queries -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free_blocks) / self.num_blocks if self.num_blocks else 0.0

    def block_ids(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ----------------------------------------------------------------
    def _extra_keys(self, request: Request, block_index: int) -> tuple:
        return block_extra_keys(block_index, self.block_size, request.lora_key,
                                request.cache_salt, request.mm_features)

    def _update_hashes(self, request: Request, num_tokens: int) -> None:
        """Extend request.block_hashes to every full block within its first num_tokens."""
        hashes = request.block_hashes
        bs = self.block_size
        tokens = request.all_token_ids
        while (len(hashes) + 1) * bs <= num_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(
                hash_block(parent, tokens[i * bs : (i + 1) * bs], self._extra_keys(request, i))
            )

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of the request: (block ids, number of tokens).

        At least one token is always left to compute, since the last position's logits
        are needed to sample.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        self._update_hashes(request, request.num_tokens)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            hit.append(block_id)
        return hit, len(hit) * self.block_size

    def record_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Count an admitted request's prefix lookup (once: a request looked up again while
        it waits for room, or for second-tier loads, is not counted again)."""
        if self.enable_caching and request.sampling_params.prompt_logprobs is None:
            self.prefix_queries += request.num_tokens
            self.prefix_hits += num_hit_tokens

    # ---- allocation ------------------------------------------------------------------
    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> bool:
        """Make the request's blocks cover its computed + new tokens; False leaves no change.

        `computed_blocks` are prefix-cache hits for a request being admitted; they are
        taken (ref_cnt + 1) before new blocks are allocated.
        """
        held = self.req_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(held) - len(computed_blocks)
        # Hits sitting in the free list are taken out of it, so they cannot count as free.
        evictable_hits = sum(1 for b in computed_blocks if self.blocks[b].ref_cnt == 0)
        if num_new_blocks > len(self.free_blocks) - evictable_hits:
            return False
        for block_id in computed_blocks:
            self._take(block_id)
        new_ids = [self._pop_free() for _ in range(max(num_new_blocks, 0))]
        blocks = self.req_blocks.setdefault(request.request_id, [])
        blocks.extend(computed_blocks)
        blocks.extend(new_ids)
        if self.enable_caching:
            self._cache_full_blocks(request, blocks, total)
        return True

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_cnt == 0:
            del self.free_blocks[block_id]
        block.ref_cnt += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict it from the prefix cache
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
                if self.event_state is not None:
                    self.event_state[block.block_hash] = False
                if self.on_evict is not None:
                    self.on_evict(block_id, block.block_hash)
            block.block_hash = None
        block.ref_cnt = 1
        return block_id

    def _cache_full_blocks(self, request: Request, blocks: list[int], num_tokens: int) -> None:
        """Register the blocks that will be full once num_tokens tokens are computed."""
        self._update_hashes(request, min(num_tokens, request.num_tokens))
        for i, block_hash in enumerate(request.block_hashes[: len(blocks)]):
            block = self.blocks[blocks[i]]
            if block.block_hash is None and block_hash not in self.cached:
                block.block_hash = block_hash
                self.cached[block_hash] = block.block_id
                if self.event_state is not None:
                    self.event_state[block_hash] = True

    def allocate_for_load(self, request: Request, computed_blocks: Sequence[int],
                          num_blocks: int) -> list[int] | None:
        """Take the prefix hits and `num_blocks` more blocks (not yet cached) for blocks the
        second tier loads back; None (nothing changed) without room."""
        evictable_hits = sum(1 for b in computed_blocks if self.blocks[b].ref_cnt == 0)
        if num_blocks > len(self.free_blocks) - evictable_hits:
            return None
        for block_id in computed_blocks:
            self._take(block_id)
        new_ids = [self._pop_free() for _ in range(num_blocks)]
        self.req_blocks[request.request_id] = [*computed_blocks, *new_ids]
        return new_ids

    def finish_load(self, request: Request, block_ids: Sequence[int], hashes: Sequence[int],
                    loaded: bool) -> None:
        """Loaded blocks join the prefix cache under their hashes; then every block of the
        load is released (the request is admitted again and hits them)."""
        if loaded:
            for block_id, block_hash in zip(block_ids, hashes, strict=True):
                if block_hash not in self.cached:
                    self.blocks[block_id].block_hash = block_hash
                    self.cached[block_hash] = block_id
                    if self.event_state is not None:
                        self.event_state[block_hash] = True
        self.free(request)

    def free(self, request: Request) -> None:
        """Release the request's blocks; cached ones stay reusable until evicted.

        Blocks are released tail first, so a request's last blocks are evicted before its
        first ones (a shared prefix outlives the unique suffix).
        """
        blocks = self.req_blocks.pop(request.request_id, [])
        for block_id in reversed(blocks):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    # Uncached blocks hold nothing reusable: evict them first.
                    self.free_blocks[block_id] = None
                    self.free_blocks.move_to_end(block_id, last=False)
                else:
                    self.free_blocks[block_id] = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; refused (False) while any block is in use."""
        if len(self.free_blocks) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        if self.event_state is not None:  # what came before no longer matters
            self.event_state.clear()
            self.events_cleared = True
        return True

    def take_events(self) -> KVCacheEvents | None:
        """The prefix cache's changes since the last call (None: none, or events are off)."""
        state = self.event_state
        if not state and not self.events_cleared:
            return None
        events = KVCacheEvents(
            stored=[h for h, cached in state.items() if cached] if state else [],
            removed=[h for h, cached in state.items() if not cached] if state else [],
            cleared=self.events_cleared)
        if state:
            state.clear()
        self.events_cleared = False
        return events

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent."""
        held: dict[int, int] = {}
        for blocks in self.req_blocks.values():
            for block_id in blocks:
                held[block_id] = held.get(block_id, 0) + 1
        for block in self.blocks:
            in_free = block.block_id in self.free_blocks
            assert in_free == (block.ref_cnt == 0), f"block {block.block_id} free/ref mismatch"
            assert block.ref_cnt == held.get(block.block_id, 0), f"block {block.block_id} refs"
            if block.block_hash is not None:
                assert self.cached.get(block.block_hash) == block.block_id
        assert len(self.cached) == sum(b.block_hash is not None for b in self.blocks)

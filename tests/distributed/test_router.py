"""The data-parallel router without processes: the cache index, the scoring rule, and the
block hashes the client computes (they must equal the core's)."""

from __future__ import annotations

import random

import pytest

from kvflow.core.kv_cache import KVCacheManager, prompt_block_hashes
from kvflow.distributed.router import LOAD_SLACK, ReplicaCacheIndex, Router
from kvflow.engine.protocol import KVCacheEvents
from kvflow.errors import EngineDeadError
from tests.core.helpers import make_request

BS = 16


def hashes_of(tokens: list[int]) -> list[int]:
    return prompt_block_hashes(tokens, BS)


def test_index_applies_events_and_matches_the_leading_run() -> None:
    index = ReplicaCacheIndex()
    h = hashes_of(list(range(100)))  # 6 full blocks (the last token stays to compute)
    assert len(h) == 6
    index.apply(KVCacheEvents(stored=h[:4]))
    assert index.match(h) == 4
    index.apply(KVCacheEvents(removed=[h[1]]))
    assert index.match(h) == 1  # a hole ends the match, as the core's lookup stops there
    index.apply(KVCacheEvents(stored=[h[5]], cleared=True))  # cleared applies first
    assert index.hashes == {h[5]} and index.match(h) == 0


def test_core_reports_what_it_caches_evicts_and_resets() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    kv.event_state = {}
    req = make_request("a", list(range(70)))  # 4 full blocks + 6 tokens
    assert kv.allocate_slots(req, 70)
    events = kv.take_events()
    assert events is not None and events.stored == req.block_hashes[:4] and not events.removed
    assert kv.take_events() is None  # nothing new
    kv.free(req)
    other = make_request("b", list(range(1000, 1000 + 8 * BS)))  # needs every block
    assert kv.allocate_slots(other, 8 * BS)
    events = kv.take_events()
    assert events is not None and set(events.removed) == set(req.block_hashes[:4])
    assert len(events.stored) == 8
    kv.free(other)
    assert kv.reset_prefix_cache()
    events = kv.take_events()
    assert events is not None and events.cleared and not events.stored and not events.removed


def test_client_hashes_equal_the_cores_with_lora_salt_and_images() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    prompt = list(range(5, 5 + 90))
    plain = make_request("p", prompt)
    kv.get_computed_blocks(plain)
    assert prompt_block_hashes(prompt, BS) == plain.block_hashes[:5]
    salted = make_request("s", prompt, cache_salt="tenant-a")
    kv.get_computed_blocks(salted)
    assert prompt_block_hashes(prompt, BS, cache_salt="tenant-a") == salted.block_hashes[:5]
    assert salted.block_hashes[0] != plain.block_hashes[0]
    image = make_request("i", prompt, images=[("img-hash", 20, 30)])
    kv.get_computed_blocks(image)
    from kvflow.engine.protocol import MultiModalFeature

    feature = MultiModalFeature("img-hash", 20, 30, pixels=b"", shape=[0])
    assert prompt_block_hashes(prompt, BS, mm_features=[feature]) == image.block_hashes[:5]
    assert image.block_hashes[0] == plain.block_hashes[0]  # before the image: text blocks
    assert image.block_hashes[1] != plain.block_hashes[1]
    assert prompt_block_hashes(prompt, BS, lora_key="digest")[0] != plain.block_hashes[0]


def test_round_robin_rotates_over_live_replicas() -> None:
    router = Router(3, "round_robin")
    assert [router.choose() for _ in range(4)] == [0, 1, 2, 0]
    router.mark_dead(1)
    assert [router.choose() for _ in range(4)] == [2, 0, 2, 0]
    router.mark_dead(0)
    router.mark_dead(2)
    with pytest.raises(EngineDeadError, match="every data-parallel replica"):
        router.choose()


def test_invalid_routing_is_refused() -> None:
    with pytest.raises(ValueError, match="routing"):
        Router(2, "random")


def test_a_conversation_returns_to_the_replica_holding_its_history() -> None:
    router = Router(2)
    history = hashes_of(list(range(200)))
    router.apply_events(1, KVCacheEvents(stored=history))
    # replica 1 holds the history: it wins even while busier, within the load window
    router.load = [0, LOAD_SLACK]
    assert router.choose(history + [123]) == 1
    # past the window the load decides: no replica piles up work while another idles
    router.load = [0, LOAD_SLACK + 1]
    assert router.choose(history) == 0
    # the longest match wins among eligible replicas
    router.load = [0, 0]
    router.apply_events(0, KVCacheEvents(stored=history[:3]))
    assert router.choose(history) == 1


def simulate(router: Router, prompts: list[list[int]], concurrency: int, seed: int = 0
             ) -> list[int]:
    """Route prompts with up to `concurrency` in flight; the chosen replica caches each
    prompt's blocks (as its KV events would say). Returns the replica of each prompt, and
    checks that loads never spread past the window at any routing decision."""
    rng = random.Random(seed)
    in_flight: list[int] = []
    chosen = []
    for prompt in prompts:
        if len(in_flight) >= concurrency:
            router.finished(in_flight.pop(rng.randrange(len(in_flight))))
        hashes = hashes_of(prompt)
        replica = router.choose(hashes)
        low = min(router.load)
        assert router.load[replica] <= low + max(LOAD_SLACK, -(-low // 4))
        router.started(replica)
        router.apply_events(replica, KVCacheEvents(stored=hashes))
        in_flight.append(replica)
        chosen.append(replica)
    return chosen


def test_uniform_traffic_spreads_evenly() -> None:
    rng = random.Random(1)
    prompts = [[rng.randrange(50_000) for _ in range(rng.randint(20, 300))] for _ in range(400)]
    for concurrency in (1, 8, 64):
        router = Router(4)
        chosen = simulate(router, prompts, concurrency)
        counts = [chosen.count(r) for r in range(4)]
        assert min(counts) >= 0.8 * len(prompts) / 4, (concurrency, counts)


def test_a_shared_system_prompt_does_not_pile_requests_onto_one_replica() -> None:
    """Every prompt starts with the same 4 blocks: whoever caches them first must not take
    all the traffic (the vLLM complaint), yet once both hold them, they tie."""
    rng = random.Random(2)
    system = list(range(64))
    prompts = [system + [rng.randrange(50_000) for _ in range(40)] for _ in range(200)]
    router = Router(2)
    chosen = simulate(router, prompts, concurrency=16)
    assert min(chosen.count(0), chosen.count(1)) >= 0.4 * len(prompts)


def test_conversations_stick_under_concurrency_where_round_robin_scatters() -> None:
    """40 conversations x 6 turns, 8 conversations at a time, each turn arriving in a burst
    in random order: each turn extends the last."""
    def turns_replicas(routing: str) -> list[list[int]]:
        rng = random.Random(3)
        router = Router(2, routing)
        histories = [[rng.randrange(50_000) for _ in range(60)] for _ in range(40)]
        where: list[list[int]] = [[] for _ in histories]
        for wave in range(0, 40, 8):
            for _turn in range(6):
                order = list(range(wave, wave + 8))
                rng.shuffle(order)
                for c in order:
                    histories[c] += [rng.randrange(50_000) for _ in range(30)]
                    hashes = hashes_of(histories[c])
                    replica = router.choose(hashes)
                    router.started(replica)
                    router.apply_events(replica, KVCacheEvents(stored=hashes))
                    where[c].append(replica)
                for c in range(wave, wave + 8):
                    router.finished(where[c][-1])
        return where

    sticky = turns_replicas("prefix_aware")
    assert all(len(set(w)) == 1 for w in sticky)
    assert {w[0] for w in sticky} == {0, 1}
    scattered = turns_replicas("round_robin")
    assert sum(len(set(w)) > 1 for w in scattered) > 20

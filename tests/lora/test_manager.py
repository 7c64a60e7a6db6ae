"""The core's adapter cache (LRU, pinning, ids) and the slot table (reuse, eviction, release)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvflow.lora.adapter import LoRAShapes
from kvflow.lora.manager import LoRACache, LoRASlotTable
from kvflow.lora.request import LoRARequest
from kvflow.model.llama import LORA_TARGETS

SHAPES = LoRAShapes(num_layers=2, hidden_size=64, q_size=64, kv_size=32, intermediate_size=128)


@pytest.fixture()
def requests(llama_adapters: dict[str, Path]) -> list[LoRARequest]:
    paths = list(llama_adapters.values())
    return [LoRARequest(f"ad{i}", i, str(paths[i % len(paths)])) for i in range(1, 11)]


def test_lru_with_pinning(requests: list[LoRARequest]) -> None:
    """vLLM's test_lora_functions: with id 1 pinned, adding 3..10 evicts LRU, never 1."""
    cache = LoRACache(SHAPES, 16, capacity=4, dtype=torch.float32)
    cache.get(requests[0])
    cache.get(requests[1])
    assert cache.ids() == {1, 2}
    assert cache.pin(1)
    for request in requests[2:]:
        cache.get(request)
        assert 1 in cache.ids() and len(cache.ids()) <= 4
    assert cache.ids() == {1, 8, 9, 10}
    cache.get(requests[7])  # id 8 becomes the most recent: 9 goes next
    cache.get(requests[1])
    assert cache.ids() == {1, 8, 10, 2}
    assert cache.remove(1) is not None and cache.remove(1) is None
    assert cache.ids() == {8, 10, 2}
    with pytest.raises(ValueError, match="not loaded"):
        cache.pin(5)


def test_all_pinned_and_id_conflicts(requests: list[LoRARequest]) -> None:
    cache = LoRACache(SHAPES, 16, capacity=2, dtype=torch.float32)
    for request in requests[:2]:
        cache.get(request)
        cache.pin(request.lora_int_id)
    with pytest.raises(ValueError, match="pinned"):
        cache.get(requests[2])
    with pytest.raises(ValueError, match="already used by adapter 'ad1'"):
        cache.get(LoRARequest("other", 1, requests[0].lora_path))
    reloaded = cache.get(requests[0], reload=True)  # load_inplace: a new object, same id
    assert reloaded.uid != cache.get(requests[1]).uid and cache.ids() == {1, 2}


def slot_table(num_slots: int) -> LoRASlotTable:
    table = LoRASlotTable(num_slots, 16, torch.float32, torch.device("cpu"))
    q, kv, inter, hidden = SHAPES.q_size, SHAPES.kv_size, SHAPES.intermediate_size, 64
    for layer in range(2):
        for name, k, sizes in [("qkv_proj", hidden, [q, kv, kv]), ("o_proj", q, [hidden]),
                               ("gate_up_proj", hidden, [inter, inter]),
                               ("down_proj", inter, [hidden])]:
            table.make_hook(layer, name, k, sizes, LORA_TARGETS[name])
    return table


def test_slots_reuse_evict_and_release(requests: list[LoRARequest]) -> None:
    cache = LoRACache(SHAPES, 16, capacity=8, dtype=torch.float32)
    a, b, c = (cache.get(r) for r in requests[:3])
    table = slot_table(2)
    assert table.activate([a, None, b, a]) == [0, -1, 1, 0]
    slots, _ = table.projections[(0, "qkv_proj")]
    a_q = a.weights[(0, "q_proj")][0]
    torch.testing.assert_close(slots.a[0, :a_q.shape[0]], a_q)
    assert table.activate([b]) == [1]  # stays where it is: nothing copied
    assert table.activate([c, b]) == [0, 1]  # a was least recently used
    assert table.owners[0] is c
    with pytest.raises(RuntimeError, match="max_loras"):
        table.activate([a, b, c])
    assert table.release(c.int_id) == 1 and table.num_used == 1
    assert not slots.a[0].any()  # the freed slot holds nothing
    assert table.activate([a]) == [0]  # a free slot before evicting b

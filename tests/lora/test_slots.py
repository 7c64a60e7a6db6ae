"""The batched LoRA op: slots filled in place, the torch and C paths against a plain loop."""

from __future__ import annotations

import pytest
import torch

from kvflow.lora.slots import LoRASlots, build_mapping
from kvflow.model import cpu_kernels

PARTS = [24, 8, 8]  # a fused qkv: q, k, v widths
K, R, S = 32, 8, 3


Parts = list[tuple[torch.Tensor, torch.Tensor] | None]


def random_adapter(ranks: list[int | None], seed: int) -> Parts:
    g = torch.Generator().manual_seed(seed)
    return [None if r is None else (torch.randn(r, K, generator=g), torch.randn(n, r, generator=g))
            for r, n in zip(ranks, PARTS, strict=True)]


def reference(x: torch.Tensor, slots_of_token: list[int],
              adapters: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]]) -> torch.Tensor:
    """The delta each token gets, one token and one part at a time."""
    out = torch.zeros(x.shape[0], sum(PARTS))
    for t, slot in enumerate(slots_of_token):
        if slot < 0:
            continue
        start = 0
        for part, width in zip(adapters[slot], PARTS, strict=True):
            if part is not None:
                a, b = part
                out[t, start:start + width] = (x[t] @ a.T) @ b.T
            start += width
    return out


def filled_slots() -> tuple[LoRASlots, dict[int, list]]:
    slots = LoRASlots(S, R, K, PARTS, torch.float32, torch.device("cpu"))
    adapters = {0: random_adapter([8, 4, 2], 0), 1: random_adapter([3, None, 8], 1),
                2: random_adapter([None, None, 5], 2)}
    for slot, parts in adapters.items():
        slots.load(slot, parts)
    return slots, adapters


@pytest.mark.parametrize("use_c", [False, True])
@pytest.mark.parametrize("slots_per_request,lens", [
    ([0, -1, 1, 0, 2], [3, 1, 4, 2, 1]),  # interleaved: slot 0 in two runs (an index)
    ([1, 1, -1, 2], [1, 1, 1, 1]),  # decodes, adjacent runs merge into a slice
    ([-1, -1], [2, 5]),  # nobody has an adapter
])
def test_add_matches_reference(use_c: bool, slots_per_request: list[int], lens: list[int]) -> None:
    if use_c and cpu_kernels.load() is None:
        pytest.skip("no C compiler")
    slots, adapters = filled_slots()
    slots.use_c = use_c
    x = torch.randn(sum(lens), K)
    base = torch.randn(sum(lens), sum(PARTS))
    mapping = build_mapping(slots_per_request, lens, torch.device("cpu"))
    out = base.clone()
    if mapping is None:
        assert all(s < 0 for s in slots_per_request)
        return
    slots.add_(out, x, mapping)
    per_token = [s for s, n in zip(slots_per_request, lens, strict=True) for _ in range(n)]
    torch.testing.assert_close(out, base + reference(x, per_token, adapters), rtol=1e-4,
                               atol=1e-4)


def test_load_overwrites_in_place() -> None:
    slots, _ = filled_slots()
    a_address, b_address = slots.a.data_ptr(), slots.b.data_ptr()
    slots.load(0, random_adapter([2, 2, 2], 7))
    slots.clear(1)
    assert (slots.a.data_ptr(), slots.b.data_ptr()) == (a_address, b_address)
    assert not slots.a[1].any() and not slots.b[1].any()
    assert not slots.a[0, 2:R].any()  # rank 2 of 8: the rest of the part stays zero


def test_mapping_groups() -> None:
    mapping = build_mapping([0, 1, 0, 0], [2, 1, 1, 3], torch.device("cpu"))
    assert mapping is not None
    assert mapping.token_slots.tolist() == [0, 0, 1, 0, 0, 0, 0]
    groups = dict(mapping.groups)
    assert groups[1] == slice(2, 3)
    assert isinstance(groups[0], torch.Tensor) and groups[0].tolist() == [0, 1, 3, 4, 5, 6]


def test_lora_dtype_other_than_the_model() -> None:
    """bfloat16 adapter weights on a float32 model: computed in bfloat16, added in float32."""
    slots = LoRASlots(S, R, K, PARTS, torch.bfloat16, torch.device("cpu"))
    adapters = {0: random_adapter([8, 4, 2], 0), 1: random_adapter([3, None, 8], 1)}
    for slot, parts in adapters.items():
        slots.load(slot, parts)
    assert not slots.use_c
    lens, per_request = [2, 3, 1], [1, 0, 1]
    x = torch.randn(sum(lens), K)
    out = torch.zeros(sum(lens), sum(PARTS))
    mapping = build_mapping(per_request, lens, torch.device("cpu"))
    assert mapping is not None
    slots.add_(out, x, mapping)
    per_token = [s for s, n in zip(per_request, lens, strict=True) for _ in range(n)]
    want = reference(x, per_token, adapters)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0.05, atol=0.05 * want.abs().max().item())

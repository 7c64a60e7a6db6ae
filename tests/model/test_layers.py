"""PackedLinear (oneDNN prepacked weights) against nn.Linear and the tied head."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn

from kvflow.model.layers import PackedLinear, can_pack, pack_linears_
from kvflow.model.llama import LlamaForCausalLM

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32),
                                reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_linear_matches_linear(bias: bool, rows: int) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(96, 160, bias=bias)
    packed = PackedLinear(linear.weight.data, None if linear.bias is None else linear.bias.data)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed(x.view(1, rows, 96)), linear(x).view(1, rows, 160),
                                   atol=1e-5, rtol=1e-5)


def test_pack_linears_replaces_every_linear() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4, bias=False)))
    pack_linears_(model)
    kinds = [type(m) for m in model.modules()]
    assert nn.Linear not in kinds and kinds.count(PackedLinear) == 2


def test_no_packing_off_cpu_float32() -> None:
    assert not can_pack(torch.device("cpu"), torch.bfloat16)
    assert not can_pack(torch.device("cuda"), torch.float32)


def test_tied_head_gets_a_packed_copy() -> None:
    model = LlamaForCausalLM(tiny_config("llama", "LlamaForCausalLM", tie_word_embeddings=True))
    hidden = torch.randn(3, model.config.hidden_size)
    with torch.inference_mode():
        expected = model.compute_logits(hidden)
        pack_linears_(model)
        assert isinstance(model.tied_head, PackedLinear)
        torch.testing.assert_close(model.compute_logits(hidden), expected, atol=1e-5, rtol=1e-5)

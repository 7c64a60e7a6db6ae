"""Weights and KV cache in huge-page-advised memory: same values, shared storage kept."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn

from kvflow.model import hugepages
from kvflow.model.layers import use_cpu_kernels_
from kvflow.model.llama import LlamaForCausalLM


def test_zeros_is_zeroed_and_writable() -> None:
    t = hugepages.zeros(1000, torch.float32)
    assert t.shape == (1000,) and t.dtype == torch.float32 and not t.any()
    t.view(10, 100)[3] = 1.0
    assert t.sum() == 100


@pytest.mark.parametrize("supported", [True, False])
def test_move_keeps_values_and_tied_storage(supported: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hugepages, "supported", lambda: supported and hugepages.mmap is not None
                        and hasattr(hugepages.mmap, "MADV_HUGEPAGE"))
    torch.manual_seed(0)
    model = use_cpu_kernels_(LlamaForCausalLM(tiny_config("llama", "LlamaForCausalLM",
                                                          tie_word_embeddings=True)))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    hidden = torch.randn(3, model.config.hidden_size)
    with torch.inference_mode():
        expected = model.compute_logits(hidden)
        hugepages.move_to_hugepages_(model)
        torch.testing.assert_close(model.compute_logits(hidden), expected, atol=0, rtol=0)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, before[name], atol=0, rtol=0)
    assert model.tied_head is not None
    assert model.tied_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("supported", [True, False])
def test_materialize_places_meta_tensors_and_keeps_shared_ones_shared(
        supported: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hugepages, "supported", lambda: supported and hugepages.mmap is not None
                        and hasattr(hugepages.mmap, "MADV_HUGEPAGE"))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8))
        model[2].weight = nn.Parameter(torch.empty(8, 16))
        model.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
        model[0].shared = model[2].weight  # one Parameter held by two modules
    hugepages.materialize_(model)
    assert all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    assert isinstance(model[2].weight, nn.Parameter) and model[0].shared is model[2].weight
    assert model.steps.dtype == torch.int64 and model.steps.shape == (3,)
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(set(ptrs)) == len(ptrs)  # distinct slots
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    assert model(torch.randn(2, 8)).shape == (2, 8)

"""Weights and KV cache in huge-page-advised memory: same values, shared storage kept."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

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

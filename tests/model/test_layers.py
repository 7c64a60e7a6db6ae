"""CpuLinear (C kernel for few tokens, oneDNN for many) against nn.Linear, and the tied head."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn

from kvflow.model import cpu_kernels
from kvflow.model.layers import GEMV_MAX_TOKENS, CpuLinear, can_pack, use_cpu_kernels_
from kvflow.model.llama import LlamaForCausalLM

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32),
                                reason="CPU kernels switched off")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, GEMV_MAX_TOKENS, GEMV_MAX_TOKENS + 1, 64])
@pytest.mark.parametrize("in_features", [96, 101])
def test_cpu_linear_matches_linear(bias: bool, rows: int, in_features: int) -> None:
    """Both paths (C kernel up to GEMV_MAX_TOKENS, oneDNN above), including a K that is no
    multiple of the vector width (tail loops) and token counts off the groups of four."""
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, 160, bias=bias)
    packed = CpuLinear(linear.weight.data, None if linear.bias is None else linear.bias.data)
    x = torch.randn(rows, in_features)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed(x.view(1, rows, in_features)),
                                   linear(x).view(1, rows, 160), atol=1e-5, rtol=1e-5)


def test_c_kernel_serves_few_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    if cpu_kernels.load() is None:
        pytest.skip("no C compiler here")
    calls: list[int] = []
    real = cpu_kernels.linear_f32
    monkeypatch.setattr(cpu_kernels, "linear_f32",
                        lambda x, w, b: calls.append(x.shape[0]) or real(x, w, b))
    layer = CpuLinear(torch.randn(8, 16), None)
    with torch.inference_mode():
        layer(torch.randn(GEMV_MAX_TOKENS, 16))
        layer(torch.randn(GEMV_MAX_TOKENS + 1, 16))
    assert calls == [GEMV_MAX_TOKENS]


def test_pack_linears_replaces_every_linear() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4, bias=False)))
    use_cpu_kernels_(model)
    kinds = [type(m) for m in model.modules()]
    assert nn.Linear not in kinds and kinds.count(CpuLinear) == 2


def test_packing_only_on_cpu_float32_or_bfloat16() -> None:
    assert can_pack(torch.device("cpu"), torch.bfloat16)
    assert not can_pack(torch.device("cpu"), torch.float16)
    assert not can_pack(torch.device("cuda"), torch.float32)


def test_no_packing_when_kernels_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFLOW_CPU_KERNELS", "0")
    assert not can_pack(torch.device("cpu"), torch.float32)


def test_tied_head_reads_the_embedding_table() -> None:
    model = LlamaForCausalLM(tiny_config("llama", "LlamaForCausalLM", tie_word_embeddings=True))
    hidden = torch.randn(3, model.config.hidden_size)
    with torch.inference_mode():
        expected = model.compute_logits(hidden)
        use_cpu_kernels_(model)
        assert isinstance(model.tied_head, CpuLinear)
        table = model.model.embed_tokens.weight
        assert model.tied_head.weight.data_ptr() == table.data_ptr()  # no copy
        torch.testing.assert_close(model.compute_logits(hidden), expected, atol=1e-5, rtol=1e-5)


def test_onednn_shapes_are_bucketed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Few distinct shapes reach oneDNN (each one it caches holds memory); results unchanged."""
    from kvflow.model import layers

    seen: set[int] = set()
    real = torch.ops.mkldnn._linear_pointwise

    class Ops:
        @staticmethod
        def _linear_pointwise(x, *args):  # noqa: ANN001, ANN205
            seen.add(x.shape[0])
            return real(x, *args)

    monkeypatch.setattr(layers.torch.ops, "mkldnn", Ops)
    weight, bias = torch.randn(24, 40), torch.randn(24)
    with torch.inference_mode():
        for tokens in range(17, 300):
            x = torch.randn(tokens, 40)
            torch.testing.assert_close(layers.onednn_linear(x, weight, bias),
                                       torch.nn.functional.linear(x, weight, bias),
                                       atol=1e-5, rtol=1e-5)
    assert len(seen) <= 16 and all(layers.onednn_bucket(t) == t for t in seen)

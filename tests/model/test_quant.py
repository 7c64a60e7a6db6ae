"""Weight-only int8 quantization."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kvflow.model.layers import INT8_GEMV_MAX_TOKENS
from kvflow.model.quant import Int8Linear, quantize_int8


@pytest.mark.parametrize("rows", [1, 5, INT8_GEMV_MAX_TOKENS, INT8_GEMV_MAX_TOKENS + 1])
@pytest.mark.parametrize("in_features", [64, 70])
def test_int8_linear_matches_dequantized_weights(rows: int, in_features: int) -> None:
    """The C kernel (one token, several tokens) and the dequantizing path above it. With K a
    multiple of 32 the kernel puts activations in int16 blocks of 32, hence a relative bound
    there."""
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, 48, bias=True)
    q, scale = quantize_int8(linear.weight.data)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert (q.float() * scale[:, None] - linear.weight).abs().max() <= scale.max() / 2 + 1e-6
    x = torch.randn(rows, in_features)
    expected = x @ (q.float() * scale[:, None]).T + linear.bias
    out = Int8Linear(linear.weight.data, linear.bias.data)(x)
    if in_features % 32 == 0 and rows <= INT8_GEMV_MAX_TOKENS:
        assert ((out - expected).norm() / expected.norm()).item() < 1e-4
    else:
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def perplexity(llm, text_ids: list[int]) -> float:
    from kvflow import SamplingParams

    out = llm.generate({"prompt_token_ids": text_ids},
                       SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    lps = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
    return math.exp(-sum(lps) / len(lps))


@pytest.mark.slow
def test_int8_perplexity_within_1_percent(default_model_path: Path) -> None:
    from kvflow import LLM

    text = ("The history of the city begins with a small settlement on the river bank, where "
            "traders from the north and the south met to exchange salt, cloth and iron tools. "
            "Over the centuries the settlement grew into a market town, then into a walled city "
            "with a cathedral, a university and a harbour that welcomed ships from the sea.")
    fp32 = LLM(str(default_model_path), kv_cache_memory_gb=0.1)
    ids = fp32.get_tokenizer()(text)["input_ids"]
    base = perplexity(fp32, ids)
    del fp32
    # Chunks of 64 prompt tokens: the int8 kernel path generation uses (int8 activations).
    int8 = LLM(str(default_model_path), kv_cache_memory_gb=0.1, quantization="int8",
               max_num_batched_tokens=64)
    model = int8.llm_engine.core.runner.model
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)  # really quantized
    assert isinstance(model.tied_head, Int8Linear)
    quant = perplexity(int8, ids)
    assert quant != base  # int8 weights change the logits a little ...
    assert abs(quant - base) / base < 0.01, (base, quant)  # ... and perplexity by < 1%

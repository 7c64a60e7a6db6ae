"""The roofline's arithmetic (benchmarks/roofline.py): weights per token, workload FLOPs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))

from conftest import tiny_config  # noqa: E402
from roofline import linear_shapes, workload_bound_output_tok_s, workload_flops  # noqa: E402


@pytest.mark.parametrize("model_type, arch", [("llama", "LlamaForCausalLM"),
                                              ("qwen2", "Qwen2ForCausalLM")])
def test_linear_shapes_are_the_models_linear_weights(model_type: str, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, arch, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    linears = [m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(tuple(s) for s in linears) == sorted(linear_shapes(config))


def test_workload_flops_count_prompts_and_outputs() -> None:
    config = tiny_config("llama", "LlamaForCausalLM")
    head = config.vocab_size * config.hidden_size
    layers = sum(n * k for n, k in linear_shapes(config)) - head
    work = [([1, 2, 3], 2), ([4] * 10, 1)]
    # 3 + 2 - 1 and 10 + 1 - 1 tokens through the layers; 3 sampled positions
    assert workload_flops(config, work) == 2 * (layers * 14 + head * 3)
    limits = {"matmul_gflops": {"a": 1.0, "b": 2.0}}
    assert workload_bound_output_tok_s(limits, config, work) == pytest.approx(
        3 * 2e9 / workload_flops(config, work))
    bf16 = {"compute_gflops_bf16": 4.0}
    assert workload_bound_output_tok_s(bf16, config, work, "bfloat16") == pytest.approx(
        3 * 4e9 / workload_flops(config, work))

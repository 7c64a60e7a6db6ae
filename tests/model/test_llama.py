"""Our Llama-family model against transformers, in one prefill and through the paged path."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import hf_logits, new_kv_caches, run_full_prompt

from kvflow.model import cpu_kernels
from kvflow.model.attention import build_attention_metadata
from kvflow.model.llama import LlamaForCausalLM
from kvflow.model.loader import load_model

CPU = torch.device("cpu")
PROMPT = [5, 17, 200, 3, 99, 42, 7, 8, 250, 1, 0, 33, 128, 64, 2, 19, 77]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_full_prompt_matches_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    model = load_model(folder, torch.float32, CPU)
    ours = run_full_prompt(model, PROMPT)
    assert ours.dtype == torch.float32 and ours.shape == (len(PROMPT), 256)
    torch.testing.assert_close(ours, hf_logits(folder, PROMPT), atol=1e-4, rtol=1e-4)


def test_model_attributes(tiny_qwen2_dir: Path) -> None:
    model = load_model(tiny_qwen2_dir, torch.float32, CPU)
    shape = (model.num_layers, model.num_kv_heads, model.head_dim, model.vocab_size)
    assert shape == (2, 2, 16, 256)
    assert model.config.architectures == ["Qwen2ForCausalLM"]
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


def test_bfloat16_load_casts_inside_loader(tiny_llama_dir: Path) -> None:
    model = load_model(tiny_llama_dir, torch.bfloat16, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ours = run_full_prompt(model, PROMPT)
    assert ours.dtype == torch.float32
    reference = hf_logits(tiny_llama_dir, PROMPT)
    assert (ours - reference).abs().max() < 0.1


@dataclass
class Sequence:
    """A request of the fake scheduler: tokens fed in the given step sizes."""

    tokens: list[int]
    schedule: list[int]  # new tokens per step it takes part in, 0 = sits the step out
    block_table: list[int] = field(default_factory=list)
    done: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)


def _run_schedule(model: LlamaForCausalLM, sequences: list[Sequence], block_size: int,
                  cpu_kernel: bool = False) -> None:
    """Drive the model step by step like the engine: flat new tokens of all requests."""
    caches = new_kv_caches(model, num_blocks=64, block_size=block_size)
    for step in range(max(len(s.schedule) for s in sequences)):
        active = [s for s in sequences if step < len(s.schedule) and s.schedule[step] > 0]
        query_lens = [s.schedule[step] for s in active]
        seq_lens = [s.done + n for s, n in zip(active, query_lens, strict=True)]
        input_ids = torch.tensor(
            [t for s, end in zip(active, seq_lens, strict=True) for t in s.tokens[s.done : end]]
        )
        positions = torch.cat(
            [torch.arange(s.done, end) for s, end in zip(active, seq_lens, strict=True)]
        )
        metadata = build_attention_metadata(
            query_lens, seq_lens, [s.block_table for s in active], block_size, CPU, cpu_kernel
        )
        with torch.inference_mode():
            logits = model.compute_logits(model(input_ids, positions, caches, metadata))
        for s, chunk in zip(active, logits.split(query_lens), strict=True):
            s.logits.append(chunk)
            s.done += chunk.shape[0]


@pytest.mark.parametrize(("cpu_kernel", "quantization", "dtype"), [
    (False, None, torch.float32), (True, None, torch.float32), (True, "int8", torch.float32),
    (False, None, torch.bfloat16), (True, None, torch.bfloat16),
])
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_chunked_prefill_and_decodes_match_full_forward(
    fixture: str, cpu_kernel: bool, quantization: str | None, dtype: torch.dtype,
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Against one torch-path prefill; with cpu_kernel, rotary, the cache write and decode
    attention run in C (mixed steps), and decode-only steps run each layer as one C call.
    bfloat16: weights and KV cache in bf16; the C decode layers keep float32 activations
    where torch's ops round each one to bf16, so the two agree to bf16 precision."""
    if cpu_kernel and cpu_kernels.load() is None:
        pytest.skip("no C compiler here")
    layer_calls: list[int] = []
    real = cpu_kernels.decode_layer
    monkeypatch.setattr(cpu_kernels, "decode_layer",
                        lambda *a: layer_calls.append(a[1].shape[0]) or real(*a))
    model = load_model(request.getfixturevalue(fixture), dtype, CPU, quantization)
    rng = random.Random(0)
    block_size = 4
    sequences = [
        # The prompt under test: two prefill chunks, then one token per step.
        Sequence(PROMPT, [5, 4, 1, 1, 0, 1, 1, 1, 1, 1, 1]),
        Sequence([rng.randrange(256) for _ in range(9)], [3, 1, 1, 1, 1, 1, 1]),
        Sequence([rng.randrange(256) for _ in range(7)], [1, 1, 1, 1, 1, 1, 1]),
        Sequence([rng.randrange(256) for _ in range(12)], [0, 0, 6, 6]),
    ]
    blocks = list(range(64))
    rng.shuffle(blocks)  # non-contiguous, out-of-order block tables
    for s in sequences:
        assert sum(s.schedule) == len(s.tokens)
        needed = -(-len(s.tokens) // block_size)
        s.block_table, blocks = blocks[:needed], blocks[needed:]

    _run_schedule(model, sequences, block_size, cpu_kernel)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for s in sequences:
        expected = run_full_prompt(model, s.tokens, block_size=block_size)
        torch.testing.assert_close(torch.cat(s.logits), expected, atol=tolerance, rtol=tolerance)
    steps = [[x.schedule[i] for x in sequences if i < len(x.schedule) and x.schedule[i]]
             for i in range(max(len(x.schedule) for x in sequences))]
    decode_only = [len(step) for step in steps if set(step) == {1}]
    assert decode_only  # the schedule has decode-only steps
    expected_calls = [n for n in decode_only for _ in range(model.num_layers)]
    assert layer_calls == (expected_calls if cpu_kernel else [])

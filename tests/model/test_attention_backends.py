"""Attention backend choice, and the Triton backend end to end in an engine.

Without a GPU the engine runs the Triton kernels on CPU tensors in Triton's interpreter
(tests/conftest.py turns it on): the step's metadata plumbing (chunked prefill, prefix-cache
hits, decodes of several requests) is then checked against the default CPU path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.config import EngineArgs
from kvflow.model import cpu_kernels
from kvflow.model.attention_backends import (
    ATTENTION_BACKENDS,
    check_attention_backend,
    select_attention_backend,
)
from tests.engine.leaks import assert_core_clean

CPU = torch.device("cpu")


def test_backend_names_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(ATTENTION_BACKENDS) == {"cpu", "torch", "triton"}
    with pytest.raises(ValueError, match="attention_backend"):
        EngineArgs(attention_backend="flash").create_engine_config()
    with pytest.raises(ValueError, match="CPU only"):
        check_attention_backend("cpu", torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        check_attention_backend("triton", CPU)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        EngineArgs(attention_backend="triton", device="cpu").create_engine_config()


def test_default_backend_by_device_and_dtype() -> None:
    c_kernels = cpu_kernels.load() is not None
    assert select_attention_backend(None, CPU, torch.float32) == ("cpu" if c_kernels else "torch")
    assert select_attention_backend(None, CPU, torch.float16) == "torch"
    assert select_attention_backend("torch", CPU, torch.float32) == "torch"
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        select_attention_backend("cpu", CPU, torch.float16)


def _generate(llm: LLM, prompts: list[list[int]], max_tokens: int
              ) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens, and the logprob of each (which a wrong context would shift)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert_core_clean(llm.llm_engine.core)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [step[t].logprob for o, ids in zip(outs, tokens, strict=True)
                for step, t in zip(o.outputs[0].logprobs or [], ids, strict=True)]
    return tokens, torch.tensor(logprobs)


@pytest.mark.slow
def test_triton_engine_matches_the_default_cpu_path(tiny_llama_path: Path) -> None:
    pytest.importorskip("triton")
    # A 24-token budget splits the longer prompts into chunks after earlier chunks.
    settings = dict(dtype="float32", kv_cache_memory_gb=0.02, gpu_memory_utilization=0.1,
                    max_num_batched_tokens=24, block_size=16)
    prompts = [[5 + i, 17, 300 + 7 * i] + list(range(40, 40 + n)) for i, n in
               enumerate([2, 14, 37])]
    default = LLM(str(tiny_llama_path), device="cpu", **settings)  # type: ignore[arg-type]
    expected = _generate(default, prompts, 4)
    # On a GPU machine the kernels run compiled on CUDA, else interpreted on the CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(str(tiny_llama_path), device=device, attention_backend="triton",
              **settings)  # type: ignore[arg-type]
    runner = llm.llm_engine.core.runner
    assert runner.attention_backend == "triton" and not runner.cpu_kernel
    tokens, logprobs = _generate(llm, prompts, 4)
    assert tokens == expected[0]
    torch.testing.assert_close(logprobs, expected[1], atol=1e-4, rtol=0)
    # The longest prompt again: its first two blocks come from the prefix cache, so the
    # rest is a chunk attending over cached context.
    again = llm.generate({"prompt_token_ids": prompts[-1]},
                         SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                         use_tqdm=False)[0]
    assert again.num_cached_tokens == 32
    assert list(again.outputs[0].token_ids) == expected[0][-1]
    assert_core_clean(llm.llm_engine.core)


@pytest.mark.gpu
def test_torch_and_triton_backends_agree_on_cuda(tiny_qwen2_path: Path) -> None:
    settings = dict(dtype="float32", device="cuda", gpu_memory_utilization=0.1,
                    max_num_batched_tokens=24, enforce_eager=True)
    prompts = [[5 + i, 17, 300 + 7 * i] + list(range(40, 40 + n)) for i, n in
               enumerate([2, 14, 37, 80])]
    results = []
    for backend in ("torch", "triton"):
        llm = LLM(str(tiny_qwen2_path), attention_backend=backend, **settings)  # type: ignore[arg-type]
        assert llm.llm_engine.core.runner.attention_backend == backend
        results.append(_generate(llm, prompts, 6))
        del llm
    (torch_tokens, torch_logprobs), (triton_tokens, triton_logprobs) = results
    assert triton_tokens == torch_tokens
    torch.testing.assert_close(triton_logprobs, torch_logprobs, atol=1e-4, rtol=0)

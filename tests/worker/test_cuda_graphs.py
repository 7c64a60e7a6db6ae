"""Decode steps through CUDA graphs: the size ladder, padding and static buffers.

Without a GPU nothing is captured, but DecodeGraphs(capture=False) runs the model on the
same static buffers a graph would replay (padding rows included), with the Triton kernels
in Triton's interpreter: the runner's plumbing is checked against the default CPU path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.worker.cuda_graphs import DecodeGraphs, capture_sizes
from tests.engine.leaks import assert_core_clean


def test_capture_sizes_ladder() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(16) == [1, 2, 4, 8, 16]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert capture_sizes(256)[-3:] == [224, 240, 256] and len(capture_sizes(256)) == 20


def _generate(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens, and the logprob of each (which a wrong context would shift)."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert_core_clean(llm.llm_engine.core)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [step[t].logprob for o, ids in zip(outs, tokens, strict=True)
                for step, t in zip(o.outputs[0].logprobs or [], ids, strict=True)]
    return tokens, torch.tensor(logprobs)


def _assert_same(ours: tuple[list[list[int]], torch.Tensor],
                 expected: tuple[list[list[int]], torch.Tensor]) -> None:
    assert ours[0] == expected[0]
    torch.testing.assert_close(ours[1], expected[1], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_padded_static_decode_steps_match_the_default_path(tiny_llama_path: Path) -> None:
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the GPU runs real graphs: tests/worker/test_cuda_graphs.py's gpu tests")
    settings = dict(dtype="float32", num_kv_blocks=12, block_size=16, device="cpu")
    prompts = [[5 + i, 17, 300 + 7 * i] + list(range(40, 40 + n)) for i, n in
               enumerate([2, 20, 9])]
    expected = _generate(LLM(str(tiny_llama_path), **settings), prompts)  # type: ignore[arg-type]
    llm = LLM(str(tiny_llama_path), attention_backend="triton", **settings)  # type: ignore[arg-type]
    runner = llm.llm_engine.core.runner
    # The scratch block the runner adds on CUDA, then buffers for batches of 1, 2 and 4.
    runner.kv_caches = [torch.zeros(2, 13, *cache.shape[2:]) for cache in runner.kv_caches]
    graphs = DecodeGraphs(runner.model, runner.kv_caches, 16, max_num_seqs=4,
                          max_model_len=64, scratch_block=12, capture=False)
    replayed: list[int] = []
    run = graphs.run

    def counting(*args):  # type: ignore[no-untyped-def]
        hidden = run(*args)
        if hidden is not None:
            replayed.append(hidden.shape[0])
        return hidden

    graphs.run = counting  # type: ignore[method-assign]
    runner.cuda_graphs = graphs
    _assert_same(_generate(llm, prompts), expected)
    # three decodes padded to 4 for three steps; the padding wrote only the scratch block
    assert replayed.count(3) >= 3
    assert runner.kv_caches[0][:, 12].abs().sum() > 0


@pytest.mark.gpu
def test_graphs_are_captured_and_replayed_with_the_eager_tokens(tiny_llama_path: Path) -> None:
    settings = dict(dtype="float32", device="cuda", gpu_memory_utilization=0.1, max_num_seqs=8)
    prompts = [[5 + i, 17, 300 + 7 * i] + list(range(40, 40 + 3 * i)) for i in range(6)]
    eager = LLM(str(tiny_llama_path), enforce_eager=True, **settings)  # type: ignore[arg-type]
    assert eager.llm_engine.core.runner.cuda_graphs is None
    expected = _generate(eager, prompts)
    del eager
    llm = LLM(str(tiny_llama_path), enable_sleep_mode=True, **settings)  # type: ignore[arg-type]
    graphs = llm.llm_engine.core.runner.cuda_graphs
    if graphs is None:
        pytest.skip("no CUDA graphs: the triton attention backend is not installed")
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    _assert_same(_generate(llm, prompts), expected)
    # after a sleep the graphs are recaptured over the new cache
    llm.sleep(1)
    llm.wake_up()
    assert llm.llm_engine.core.runner.cuda_graphs is not None
    _assert_same(_generate(llm, prompts), expected)

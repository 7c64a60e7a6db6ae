"""Greedy parity with transformers + peft: mixed batches of adapters and the base model,
more adapters than slots, chunked prefill, preemption and prefix caching."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from kvflow import LLM, LoRARequest, SamplingParams
from tests.engine.leaks import assert_core_clean
from tests.engine.near_ties import assert_matches_up_to_near_ties, hf_bf16_reference
from tests.lora.adapters import hf_greedy, make_adapter

MAX_TOKENS = 8


def prompts(n: int, seed: int, low: int = 4, high: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randint(low, high))] for _ in range(n)]


def run(llm: LLM, ids: list[list[int]], loras: list[LoRARequest | None]) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], params, lora_request=loras,
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def expected(base: Path, ids: list[list[int]], loras: list[LoRARequest | None]) -> list[list[int]]:
    return [hf_greedy(base, None if r is None else Path(r.lora_path), p, MAX_TOKENS)
            for p, r in zip(ids, loras, strict=True)]


def requests_for(adapters: dict[str, Path]) -> list[LoRARequest]:
    return [LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_batch_matches_peft(arch: str, request: pytest.FixtureRequest) -> None:
    base: Path = request.getfixturevalue(f"tiny_{arch}_path")
    adapters = requests_for(request.getfixturevalue(f"{arch}_adapters"))
    loras: list[LoRARequest | None] = [*adapters, None, *adapters, None]
    ids = prompts(len(loras), seed=1)
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16,
              num_kv_blocks=256, max_model_len=256)
    got = run(llm, ids, loras)
    want = expected(base, ids, loras)
    assert got == want
    base_only = run(llm, ids, [None] * len(ids))
    assert sum(g != b for g, b in zip(got, base_only, strict=True)) >= len(adapters)
    core = llm.llm_engine.core
    c_layers = core.runner.model.model._c_layers
    assert c_layers is not None and c_layers[0].lora is not None  # decodes ran in C with LoRA
    assert_core_clean(core)


def test_chunked_prefill_and_preemption(tiny_llama_path: Path,
                                        llama_adapters: dict[str, Path]) -> None:
    adapters = requests_for(llama_adapters)
    loras: list[LoRARequest | None] = [adapters[i % len(adapters)] if i % 3 else None
                                       for i in range(9)]
    ids = prompts(len(loras), seed=2, low=20, high=45)
    llm = LLM(str(tiny_llama_path), dtype="float32", enable_lora=True, max_loras=3,
              num_kv_blocks=14, block_size=8, max_num_batched_tokens=24, max_model_len=128,
              enable_prefix_caching=False)
    got = run(llm, ids, loras)
    core = llm.llm_engine.core
    assert core.scheduler.num_preemptions > 0
    assert got == expected(tiny_llama_path, ids, loras)
    assert_core_clean(core)


def test_prefix_cache_is_per_adapter_content(tiny_llama_path: Path, tmp_path: Path,
                                             llama_adapters: dict[str, Path]) -> None:
    llm = LLM(str(tiny_llama_path), dtype="float32", enable_lora=True, max_loras=2,
              num_kv_blocks=128, max_model_len=256)
    first, second = requests_for(llama_adapters)[:2]
    prompt = prompts(1, seed=3, low=48, high=48)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)

    def once(lora: LoRARequest | None) -> tuple[list[int], int]:
        out = llm.generate([{"prompt_token_ids": prompt[0]}], params, lora_request=lora,
                           use_tqdm=False)[0]
        return out.outputs[0].token_ids, out.num_cached_tokens

    assert once(None)[1] == 0
    tokens, cached = once(first)
    assert cached == 0  # the base model's blocks are not the adapter's
    assert once(second)[1] == 0
    again, cached = once(first)
    assert cached == 32 and again == tokens  # the same adapter shares its own blocks
    assert tokens == hf_greedy(tiny_llama_path, Path(first.lora_path), prompt[0], MAX_TOKENS)

    # The same name and id reloaded with other weights (vLLM #42125): no stale KV.
    folder = shutil.copytree(llama_adapters["qv8"], tmp_path / "swap")
    swap = LoRARequest("swap", 9, str(folder))
    before, _ = once(swap)
    make_adapter(tiny_llama_path, folder, 8, ("q_proj", "v_proj"), seed=99)
    assert llm.add_lora(LoRARequest("swap", 9, str(folder), load_inplace=True))
    after, cached = once(swap)
    assert cached == 0
    assert after == hf_greedy(tiny_llama_path, folder, prompt[0], MAX_TOKENS) != before
    assert_core_clean(llm.llm_engine.core)


def test_bf16_model_with_adapters_matches_peft_bf16(tiny_llama_path: Path,
                                                    llama_adapters: dict[str, Path]) -> None:
    """A bfloat16 model keeps float32 adapter slots on the CPU; decodes run the C layers
    with LoRA; tokens match transformers + peft in bf16 up to its near-ties."""
    adapters = requests_for(llama_adapters)
    loras: list[LoRARequest | None] = [*adapters, None]
    ids = prompts(len(loras), seed=4)
    llm = LLM(str(tiny_llama_path), dtype="bfloat16", enable_lora=True, max_loras=2,
              max_lora_rank=16, num_kv_blocks=256, max_model_len=256)
    got = run(llm, ids, loras)
    reference = [hf_bf16_reference(tiny_llama_path, [p], MAX_TOKENS,
                                   None if r is None else Path(r.lora_path), ignore_eos=True)[0]
                 for p, r in zip(ids, loras, strict=True)]
    assert_matches_up_to_near_ties(got, reference)
    core = llm.llm_engine.core
    c_layers = core.runner.model.model._c_layers
    assert c_layers is not None and c_layers[0].lora is not None
    assert_core_clean(core)

"""The offline LLM end to end: parity with transformers, chunking, preemption, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.sampling_params import StructuredOutputsParams
from tests.engine.leaks import assert_core_clean
from tests.engine.near_ties import assert_matches_up_to_near_ties, hf_bf16_reference

TEXT = (
    "The history of the city begins with a small settlement on the river bank, where traders "
    "from the north and the south met to exchange salt, cloth and iron tools. Over the "
    "centuries the settlement grew into a market town, then into a walled city with a "
    "cathedral, a university and a harbour that welcomed ships from across the sea. "
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
    "fibonacci(n - 2)\n\nfor i in range(10):\n    print(i, fibonacci(i))\n"
) * 6
PROMPT_LENS = [5, 17, 40, 64, 100, 150, 230, 300]
NEW_TOKENS = 48


def prompt_ids(tokenizer: object) -> list[list[int]]:
    ids = tokenizer(TEXT)["input_ids"]  # type: ignore[operator]
    assert len(ids) >= max(PROMPT_LENS) + 40
    return [ids[i * 7 : i * 7 + n] for i, n in enumerate(PROMPT_LENS)]


def hf_greedy(path: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    results = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new,
                do_sample=False,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )
            results.append(out[0, len(ids) :].tolist())
    return results


def greedy(max_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def kv_generate(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert_core_clean(llm.llm_engine.core)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def default_llm(default_model_path: Path) -> LLM:
    return LLM(str(default_model_path), dtype="float32", kv_cache_memory_gb=0.25)


@pytest.fixture(scope="module")
def default_reference(default_model_path: Path, default_llm: LLM) -> tuple[list, list]:
    prompts = prompt_ids(default_llm.get_tokenizer())
    return prompts, hf_greedy(default_model_path, prompts, NEW_TOKENS)


def test_default_model_matches_transformers(default_llm: LLM, default_reference) -> None:
    prompts, expected = default_reference
    assert kv_generate(default_llm, prompts, greedy()) == expected


@pytest.mark.parametrize("fixture", ["tiny_llama_path", "tiny_qwen2_path"])
def test_tiny_models_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    llm = LLM(str(path), dtype="float32", kv_cache_memory_gb=0.05)
    prompts = prompt_ids(llm.get_tokenizer())
    assert kv_generate(llm, prompts, greedy()) == hf_greedy(path, prompts, NEW_TOKENS)


def test_chunked_prefill_gives_the_same_tokens(default_model_path: Path, default_reference) -> None:
    prompts, expected = default_reference
    llm = LLM(str(default_model_path), dtype="float32", max_num_batched_tokens=32,
              kv_cache_memory_gb=0.25)
    assert kv_generate(llm, prompts, greedy()) == expected


def test_preemption_gives_the_same_tokens(default_model_path: Path, default_reference) -> None:
    prompts, expected = default_reference
    blocks_for_longest = -(-(max(PROMPT_LENS) + NEW_TOKENS) // 16)
    llm = LLM(str(default_model_path), dtype="float32", num_kv_blocks=blocks_for_longest + 2)
    assert kv_generate(llm, prompts, greedy()) == expected
    assert llm.llm_engine.core.scheduler.num_preemptions > 0


def test_seeded_sampling_is_independent_of_the_batch(default_llm: LLM) -> None:
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234)
    alone = default_llm.generate("Once upon a time", params, use_tqdm=False)
    others = SamplingParams(max_tokens=30, temperature=0.8)
    batch = default_llm.generate(
        ["The weather today", "Once upon a time", "def fib(n):"],
        [others, params, others],
        use_tqdm=False,
    )
    assert batch[1].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert_core_clean(default_llm.llm_engine.core)


def test_stop_string_split_across_tokens(default_llm: LLM) -> None:
    base = default_llm.generate("The history of the city", greedy(30), use_tqdm=False)
    text = base[0].outputs[0].text
    tokenizer = default_llm.get_tokenizer()
    pieces = [tokenizer.decode([t]) for t in base[0].outputs[0].token_ids]
    assert "".join(pieces).startswith(text)
    stop = None
    for i in range(3, len(pieces) - 1):  # 4 chars straddling the end of token i
        end = sum(len(p) for p in pieces[: i + 1])
        candidate = text[end - 2 : end + 2]
        if len(pieces[i]) >= 2 and len(candidate) == 4 and text.index(candidate) == end - 2:
            stop = candidate
            break
    assert stop is not None
    out = default_llm.generate(
        "The history of the city",
        SamplingParams(max_tokens=30, temperature=0.0, stop=[stop]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    kept = default_llm.generate(
        "The history of the city",
        SamplingParams(
            max_tokens=30, temperature=0.0, stop=[stop], include_stop_str_in_output=True
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    assert_core_clean(default_llm.llm_engine.core)


def test_multibyte_characters_come_out_whole(default_llm: LLM) -> None:
    outs = default_llm.generate(
        ["Écris une phrase en français: «", "日本語の文章: ", "Emoji: 😀"],
        greedy(24),
        use_tqdm=False,
    )
    tokenizer = default_llm.get_tokenizer()
    for out in outs:
        completion = out.outputs[0]
        expected = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        # a character cut off by max_tokens is left out rather than shown as U+FFFD
        assert completion.text == expected.rstrip("\ufffd")
        assert "\ufffd" not in completion.text
    assert_core_clean(default_llm.llm_engine.core)


def test_stop_token_ids_and_length(default_llm: LLM) -> None:
    base = default_llm.generate("Once upon a time", greedy(10), use_tqdm=False)[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 10
    target = base.token_ids[3]
    out = default_llm.generate(
        "Once upon a time",
        SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[target]),
        use_tqdm=False,
    )
    completion = out[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == target
    assert completion.token_ids == base.token_ids[: base.token_ids.index(target) + 1]


def test_chat_uses_the_template(default_llm: LLM) -> None:
    outs = default_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], greedy(20), use_tqdm=False
    )
    assert "<|im_start|>assistant" in outs[0].prompt
    assert "Paris" in outs[0].outputs[0].text
    assert_core_clean(default_llm.llm_engine.core)


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ("", greedy(), "empty"),
        ({"prompt_token_ids": []}, greedy(), "empty"),
        ({"prompt_token_ids": [1, 10**7]}, greedy(), "vocabulary"),
        ({"prompt_token_ids": [1] * 9000}, greedy(), "max_model_len"),
    ],
)
def test_bad_input_is_refused_and_engine_keeps_serving(
    default_llm: LLM, prompt, params, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        default_llm.generate(prompt, params, use_tqdm=False)
    assert_core_clean(default_llm.llm_engine.core)
    out = default_llm.generate("Hello", greedy(3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
    ],
)
def test_invalid_sampling_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist|not found"):
        LLM(str(tmp_path / "no-such-model"))


def test_n_greater_than_one(default_llm: LLM) -> None:
    params = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    out = default_llm.generate("Tell me a joke", params, use_tqdm=False)[0]
    assert sorted(c.index for c in out.outputs) == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert_core_clean(default_llm.llm_engine.core)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_dtypes_run(tiny_llama_path: Path, dtype: str) -> None:
    llm = LLM(str(tiny_llama_path), dtype=dtype, kv_cache_memory_gb=0.05)
    assert llm.llm_engine.core.runner.kv_caches[0].dtype == getattr(torch, dtype)
    out = llm.generate("Hello there", greedy(5), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5
    assert_core_clean(llm.llm_engine.core)


# bfloat16 (issue 16): weights, activations and KV cache in bf16 on the CPU path.
BF16_PROMPTS = [0, 2, 4, 6]  # 5, 40, 100 and 230 tokens: the C GEMV and the prefill GEMM
BF16_TOKENS = 24


@pytest.fixture(scope="module")
def bf16_reference(default_model_path: Path, default_llm: LLM) -> tuple[list, list]:
    prompts = [prompt_ids(default_llm.get_tokenizer())[i] for i in BF16_PROMPTS]
    return prompts, hf_bf16_reference(default_model_path, prompts, BF16_TOKENS)


@pytest.mark.parametrize("engine_args", [
    {},
    {"max_num_batched_tokens": 32},  # chunked prefill
    {"num_kv_blocks": 26, "max_num_seqs": 4, "enable_prefix_caching": False},  # preemption
], ids=["plain", "chunked", "preempted"])
def test_bf16_default_model_matches_transformers_bf16(default_model_path: Path,
                                                      bf16_reference, engine_args) -> None:
    prompts, reference = bf16_reference
    llm = LLM(str(default_model_path), dtype="bfloat16", **engine_args)
    assert llm.llm_engine.core.runner.kv_caches[0].dtype == torch.bfloat16
    assert_matches_up_to_near_ties(kv_generate(llm, prompts, greedy(BF16_TOKENS)), reference)
    if "num_kv_blocks" in engine_args:
        assert llm.llm_engine.core.scheduler.num_preemptions > 0
    again = kv_generate(llm, prompts, greedy(BF16_TOKENS))  # prefix-cache hits where on
    assert_matches_up_to_near_ties(again, reference)


@pytest.mark.parametrize("fixture", ["tiny_llama_path", "tiny_qwen2_path"])
def test_bf16_tiny_models_match_transformers_bf16(fixture: str,
                                                  request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    llm = LLM(str(path), dtype="bfloat16", kv_cache_memory_gb=0.05)
    prompts = prompt_ids(llm.get_tokenizer())[:6]
    assert_matches_up_to_near_ties(kv_generate(llm, prompts, greedy(24)),
                                   hf_bf16_reference(path, prompts, 24))


def test_bf16_logprobs_are_close_to_float32(default_model_path: Path, default_llm: LLM) -> None:
    """The log-probabilities of the same tokens (a prompt scored whole) differ from float32
    by bf16 rounding only."""
    prompt = {"prompt_token_ids": prompt_ids(default_llm.get_tokenizer())[6]}
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    bf16 = LLM(str(default_model_path), dtype="bfloat16", kv_cache_memory_gb=0.25)

    def scored(llm: LLM) -> torch.Tensor:
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        assert out.prompt_logprobs is not None
        return torch.tensor([next(iter(entry.values())).logprob
                             for entry in out.prompt_logprobs[1:]])

    ours, full = scored(bf16), scored(default_llm)
    difference = (ours - full).abs()
    assert difference.mean() < 0.05 and difference.max() < 0.5, difference
    assert_core_clean(bf16.llm_engine.core)


def test_bf16_sampling_and_structured_output(default_model_path: Path) -> None:
    import json

    llm = LLM(str(default_model_path), dtype="bfloat16", kv_cache_memory_gb=0.25)
    schema = {"type": "object", "properties": {"name": {"type": "string"}},
              "required": ["name"], "additionalProperties": False}
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(json=schema))
    out = llm.chat([{"role": "user", "content": "Give me a JSON object with a name."}], params,
                   use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text)["name"], str)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=16)
    first = llm.generate("Once upon a time", seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.generate("Once upon a time", seeded, use_tqdm=False)[0].outputs[0].token_ids \
        == first
    assert_core_clean(llm.llm_engine.core)


def test_forced_older_kernels_give_the_same_tokens(tiny_llama_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """KVFLOW_CPU_ISA=generic runs the plain-C build on any CPU: same greedy tokens as
    transformers in float32."""
    from kvflow.model import cpu_kernels

    monkeypatch.setenv("KVFLOW_CPU_ISA", "generic")
    cpu_kernels.reset()
    try:
        llm = LLM(str(tiny_llama_path), dtype="float32", kv_cache_memory_gb=0.05)
        lib = cpu_kernels.load()
        assert lib is None or "kvflow_cpu-generic-" in lib._name
        prompts = prompt_ids(llm.get_tokenizer())[:4]
        assert kv_generate(llm, prompts, greedy(16)) == hf_greedy(tiny_llama_path, prompts, 16)
    finally:
        cpu_kernels.reset()

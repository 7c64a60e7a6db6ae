"""Structured output end to end with the packaged default model, sampled at temperature 1."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.sampling_params import StructuredOutputsParams
from tests.engine.leaks import assert_core_clean

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "role": {"enum": ["admin", "user", "guest"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "role", "age", "address", "tags"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{2,8}-[0-9]{3}"
CHOICES = ["sunny", "cloudy", "rainy", "stormy"]
# GBNF (llama.cpp's EBNF): a greeting, a name and a number
EBNF = """
root ::= greeting ", " name "! You are " digit digit? " years old."
greeting ::= "Hello" | "Hi" | "Welcome"
name ::= [A-Z] [a-z] [a-z]? [a-z]? [a-z]?
digit ::= [0-9]
"""
EBNF_RE = r"(Hello|Hi|Welcome), [A-Z][a-z]{1,4}! You are [0-9]{1,2} years old\."


# One torch thread: on the shared 2-core test machine, torch's thread pool under load from
# other processes is several times slower than a single thread.
NUM_THREADS = 1


@pytest.fixture(scope="module")
def llm(default_model_path: Path):
    threads = torch.get_num_threads()
    yield LLM(str(default_model_path), kv_cache_memory_gb=0.25, num_threads=NUM_THREADS)
    torch.set_num_threads(threads)  # the engine set it for the whole process


def chat_prompt(llm: LLM, text: str) -> str:
    messages = [{"role": "user", "content": text}]
    return str(llm.get_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True))


def sample(llm: LLM, prompt: str, structured: StructuredOutputsParams, num: int,
           max_tokens: int = 160, **kw: object) -> list[str]:
    params = [
        SamplingParams(temperature=1.0, seed=1000 + i, max_tokens=max_tokens,
                       structured_outputs=structured, **kw)  # type: ignore[arg-type]
        for i in range(num)
    ]
    outs = llm.generate([prompt] * num, params, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), [o.outputs[0] for o in outs]
    return [o.outputs[0].text for o in outs]


def test_json_schema_samples_parse_and_validate(llm: LLM) -> None:
    prompt = chat_prompt(llm, "Describe one user of a web shop as JSON.")
    texts = sample(llm, prompt, StructuredOutputsParams(json=SCHEMA), 20)
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 1  # really sampled
    # the core compiled the schema once for the 20 requests
    structured = llm.llm_engine.core.structured
    assert structured is not None and structured.compiler is not None
    assert structured.compiler.num_compiled == 1 and not structured.live
    assert_core_clean(llm.llm_engine.core)


# The case: 4 properties; without strictness 8 of 20 ran to max_tokens inventing
# properties ("story_01", ...) and whitespace, so their JSON never closed. The strings are
# bounded as a schema author would, to keep the test robust: no grammar can stop a model
# rambling inside a string the schema lets grow without limit (without maxLength these 20
# seeds all closed too; with compact JSON, 19 of 20).
PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 32},
        "species": {"type": "string", "maxLength": 32},
        "age": {"type": "integer"},
        "color": {"type": "string", "maxLength": 32},
    },
    "required": ["name", "species", "age", "color"],
}


def test_twenty_pets_as_json_all_close(llm: LLM) -> None:
    conversations = [[{"role": "user", "content": f"Describe pet number {i} as JSON"}]
                     for i in range(20)]
    structured = StructuredOutputsParams(json=PET_SCHEMA)
    params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=120,
                             structured_outputs=structured) for i in range(20)]
    outs = llm.chat(conversations, params, use_tqdm=False)  # type: ignore[arg-type]
    texts = [o.outputs[0].text for o in outs]
    assert [o.outputs[0].finish_reason for o in outs] == ["stop"] * 20, texts
    for text in texts:
        jsonschema.validate(json.loads(text), {**PET_SCHEMA, "additionalProperties": False})
        outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
        for blank in re.findall(r"\s+", outside_strings):  # bounded whitespace
            assert re.fullmatch(r"\n?[ \t]{0,8}", blank), text
    assert len(set(texts)) > 1  # really sampled
    assert_core_clean(llm.llm_engine.core)


def test_json_object(llm: LLM) -> None:
    prompt = chat_prompt(llm, "Give me a small JSON object about a cat.")
    for text in sample(llm, prompt, StructuredOutputsParams(json_object=True), 2,
                       max_tokens=160, top_k=20):
        assert isinstance(json.loads(text), dict)
    assert_core_clean(llm.llm_engine.core)


@pytest.mark.parametrize(
    ("structured", "check", "question"),
    [
        (StructuredOutputsParams(regex=REGEX), lambda t: re.fullmatch(REGEX, t),
         "Invent a product code."),
        (StructuredOutputsParams(choice=CHOICES), lambda t: t in CHOICES,
         "What is the weather like today?"),
        (StructuredOutputsParams(grammar=EBNF), lambda t: re.fullmatch(EBNF_RE, t),
         "Greet me."),
    ],
    ids=["regex", "choice", "ebnf"],
)
def test_regex_choice_and_grammar_always_match(llm: LLM, structured, check, question) -> None:
    texts = sample(llm, chat_prompt(llm, question), structured, 10, max_tokens=40)
    assert all(check(t) for t in texts), texts
    assert_core_clean(llm.llm_engine.core)


def test_mixed_batch_leaves_plain_requests_unchanged(llm: LLM) -> None:
    prompts = [chat_prompt(llm, q) for q in ("Tell me about rivers.", "Name three birds.")]
    plain = [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True),
    ]
    alone = llm.generate(prompts, plain, use_tqdm=False)
    others = [
        SamplingParams(temperature=1.0, seed=3, max_tokens=160, presence_penalty=0.5,
                       frequency_penalty=0.3, structured_outputs=StructuredOutputsParams(
                           json=SCHEMA)),
        SamplingParams(temperature=1.0, seed=4, max_tokens=40, repetition_penalty=1.2,
                       structured_outputs=StructuredOutputsParams(regex=REGEX)),
        SamplingParams(temperature=0.7, seed=5, max_tokens=24, presence_penalty=1.0,
                       logprobs=3),
    ]
    extra = [chat_prompt(llm, "A user as JSON."), chat_prompt(llm, "A code."), prompts[0]]
    mixed = llm.generate(prompts + extra, plain + others, use_tqdm=False)
    for a, m in zip(alone, mixed[:2], strict=True):
        assert m.outputs[0].token_ids == a.outputs[0].token_ids
    jsonschema.validate(json.loads(mixed[2].outputs[0].text), SCHEMA)
    assert re.fullmatch(REGEX, mixed[3].outputs[0].text)
    assert_core_clean(llm.llm_engine.core)


def test_invalid_grammar_is_refused_before_queueing(llm: LLM) -> None:
    bad = [
        StructuredOutputsParams(json={"type": "string", "minLength": 3, "maxLength": 1}),
        StructuredOutputsParams(json="{oops"),
        StructuredOutputsParams(regex="(unclosed"),
        StructuredOutputsParams(grammar="root ::= undefined_rule"),
    ]
    core = llm.llm_engine.core
    for structured in bad:
        params = SamplingParams(max_tokens=8, structured_outputs=structured)
        with pytest.raises(ValueError, match="structured_outputs"):
            llm.generate(["Hello", "Hello"], [SamplingParams(max_tokens=4), params],
                         use_tqdm=False)
        assert_core_clean(core)
        assert not llm.llm_engine.output_processor.has_unfinished_requests()
    # the engine still serves
    out = llm.generate("Hello", SamplingParams(
        max_tokens=40, structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
        use_tqdm=False)
    assert out[0].outputs[0].text in ("yes", "no")
    assert_core_clean(core)


def test_preemption_keeps_the_grammar_state(llm: LLM, default_model_path: Path) -> None:
    """Recompute after preemption continues each matcher where it was: same tokens as without."""
    # >= 13 words of >= 4 letters: every request outgrows its first block (16 tokens), so
    # 5 running requests need 10 blocks of the 5 and preemption must happen.
    words = r"([a-z]{4,10} ){12}[a-z]{4,10}\."
    params = [
        SamplingParams(temperature=1.0, seed=50 + i, max_tokens=70,
                       structured_outputs=StructuredOutputsParams(regex=words))
        for i in range(6)
    ]
    prompt = "Write a sentence:"
    expected = llm.generate([prompt] * 6, params, use_tqdm=False)
    tight = LLM(str(default_model_path), num_kv_blocks=5, num_threads=NUM_THREADS)
    got = tight.generate([prompt] * 6, params, use_tqdm=False)
    assert tight.llm_engine.core.scheduler.num_preemptions > 0
    for e, g in zip(expected, got, strict=True):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert re.fullmatch(words, g.outputs[0].text)
    assert_core_clean(tight.llm_engine.core)

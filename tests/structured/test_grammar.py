"""Grammar compilation, validation and the compile cache; the bitmask on fixed logits."""

from __future__ import annotations

import re
from concurrent.futures import Future
from pathlib import Path

import llguidance
import pytest
import torch

from kvflow.sampling_params import StructuredOutputsParams
from kvflow.structured.grammar import GrammarCompiler, grammar_key
from kvflow.structured.matcher import GrammarBitmask, GrammarState, unpack_bits
from kvflow.structured.options import StructuredOutputsConfig

VOCAB = 49152
EOS = 2


@pytest.fixture(scope="module")
def hf_tokenizer(default_model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


@pytest.fixture()
def compiler(hf_tokenizer) -> GrammarCompiler:
    return GrammarCompiler(hf_tokenizer, VOCAB, max_cached=4)


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
VALID = [
    StructuredOutputsParams(json=SCHEMA),
    StructuredOutputsParams(json='{"type": "array", "items": {"enum": ["x", "y"]}}'),
    StructuredOutputsParams(json_object=True),
    StructuredOutputsParams(regex=r"\d{3}-[a-z]+"),
    StructuredOutputsParams(choice=["yes", "no"]),
    StructuredOutputsParams(grammar='root ::= "a" item*\nitem ::= [0-9] | "b"'),  # GBNF
    StructuredOutputsParams(grammar='start: "a" ITEM*\nITEM: /[0-9]/ | "b"'),  # Lark
]
INVALID = [
    (StructuredOutputsParams(json="{not json"), "not valid JSON"),
    (StructuredOutputsParams(json='["a list"]'), "JSON schema object"),
    (StructuredOutputsParams(json={"type": "no-such-type"}), "no-such-type"),
    (StructuredOutputsParams(json={"type": "string", "minLength": 5, "maxLength": 2}),
     "Unsatisfiable"),
    (StructuredOutputsParams(json={"allOf": [{"type": "string"}, {"type": "integer"}]}),
     "Unsatisfiable"),
    (StructuredOutputsParams(regex="[a-z"), "unclosed character class"),
    (StructuredOutputsParams(regex=r"[^\s\S]"), "can never be matched"),
    (StructuredOutputsParams(grammar="root ::= missing_rule"), "missing_rule"),
    (StructuredOutputsParams(grammar='root ::= ("a"'), "grammar"),
    (StructuredOutputsParams(grammar="   "), "empty"),
]


@pytest.mark.parametrize("params", VALID, ids=lambda p: grammar_key(p)[0])
def test_valid_grammars_compile(compiler: GrammarCompiler, params) -> None:
    matcher = compiler.get(grammar_key(params))
    assert not matcher.is_error()
    compiler.validate(params)


@pytest.mark.parametrize(("params", "message"), INVALID, ids=lambda x: str(x)[:40])
def test_invalid_grammars_raise_value_error(compiler: GrammarCompiler, params, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        compiler.validate(params)
    assert len(compiler) == 0  # nothing bad is cached


def test_each_distinct_grammar_compiles_once(compiler: GrammarCompiler) -> None:
    for _ in range(3):
        compiler.validate(StructuredOutputsParams(json=SCHEMA))
        compiler.validate(StructuredOutputsParams(json=dict(SCHEMA)))  # equal dict, same text
        compiler.validate(StructuredOutputsParams(regex="[a-z]+"))
    assert compiler.num_compiled == 2 and len(compiler) == 2
    first = compiler.get(grammar_key(StructuredOutputsParams(regex="[a-z]+")))
    assert compiler.get(grammar_key(StructuredOutputsParams(regex="[a-z]+"))) is first


def test_cache_is_lru_bounded(compiler: GrammarCompiler) -> None:
    keys = [grammar_key(StructuredOutputsParams(regex=f"a{{{n}}}")) for n in range(1, 6)]
    for key in keys[:4]:
        compiler.get(key)
    compiler.get(keys[0])  # touch: keys[1] is now the least recently used
    compiler.get(keys[4])  # evicts keys[1]
    assert len(compiler) == 4 and compiler.num_compiled == 5
    compiler.get(keys[0])
    assert compiler.num_compiled == 5
    compiler.get(keys[1])
    assert compiler.num_compiled == 6


def test_tokenizer_is_built_lazily(hf_tokenizer) -> None:
    compiler = GrammarCompiler(hf_tokenizer, VOCAB)
    assert compiler._tokenizer is None
    compiler.validate(StructuredOutputsParams(choice=["a"]))
    assert compiler._tokenizer is not None


def _state(compiler: GrammarCompiler, params: StructuredOutputsParams) -> GrammarState:
    future: Future[llguidance.LLMatcher] = Future()
    future.set_result(compiler.get(grammar_key(params)))
    return GrammarState("r", future)


def test_bitmask_masks_only_structured_rows(compiler: GrammarCompiler, hf_tokenizer) -> None:
    state = _state(compiler, StructuredOutputsParams(choice=["yes", "no"]))
    failed: Future[llguidance.LLMatcher] = Future()
    failed.set_exception(ValueError("bad"))
    broken = GrammarState("b", failed)
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    bitmask = GrammarBitmask(VOCAB, [EOS], max_rows=1, device=torch.device("cpu"))
    bitmask.apply(logits, [0, 2], [state, broken])  # more rows than max_rows: regrows
    torch.testing.assert_close(logits[1], before[1])  # the plain row is untouched
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    texts = {hf_tokenizer.decode([t]) for t in allowed}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts)
    torch.testing.assert_close(logits[0, allowed], before[0, allowed])
    assert torch.isfinite(logits[2]).nonzero().flatten().tolist() == [EOS]
    assert broken.failed


def test_unpack_matches_bit_layout() -> None:
    words = torch.tensor([[1 - 2**31, 0, 1 << 5], [0, -1, 0]], dtype=torch.int32)  # W = 3
    expected = [[0, 31, 69], list(range(32, 64))]
    allowed = unpack_bits(words, torch.arange(32, dtype=torch.int32), 70)  # the CUDA path
    assert [row.nonzero().flatten().tolist() for row in allowed] == expected
    forbidden = GrammarBitmask(70, [EOS], 2, torch.device("cpu")).forbidden(words)  # CPU path
    assert forbidden.shape == (2, 70)
    assert [(~row).nonzero().flatten().tolist() for row in forbidden] == expected
    random_words = torch.randint(-(2**31), 2**31 - 1, (4, 1536), dtype=torch.int32)
    forbidden = GrammarBitmask(VOCAB, [EOS], 4, torch.device("cpu")).forbidden(random_words)
    assert torch.equal(~forbidden, unpack_bits(random_words, torch.arange(32, dtype=torch.int32),
                                               VOCAB))


def test_state_follows_the_grammar_to_eos(compiler: GrammarCompiler, hf_tokenizer) -> None:
    state = _state(compiler, StructuredOutputsParams(regex="ab"))
    matcher = state.resolve()
    assert matcher is not None
    for token in hf_tokenizer("ab", add_special_tokens=False)["input_ids"]:
        state.accept_token(token)
    assert matcher.is_stopped() and not matcher.is_error()
    state.accept_token(EOS)  # EOS after completion is not fed to the matcher
    assert not matcher.is_error() and state.num_accepted == len(
        hf_tokenizer("ab", add_special_tokens=False)["input_ids"])
    logits = torch.zeros(1, VOCAB)
    GrammarBitmask(VOCAB, [EOS], 1, torch.device("cpu")).apply(logits, [0], [state])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [EOS]
    # the compiled (shared) matcher never moves: each request advances its own copy
    assert not compiler.get(grammar_key(StructuredOutputsParams(regex="ab"))).is_stopped()


PET = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
       "required": ["name"]}


def accepts(compiler: GrammarCompiler, hf_tokenizer, params: StructuredOutputsParams,
            text: str) -> bool:
    """Whether the request's grammar takes `text` whole (a copy of the compiled matcher)."""
    matcher = compiler.compile(params).deep_copy()
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    return bool(matcher.consume_tokens(ids)) and matcher.is_accepting() \
        and not matcher.is_error()


def test_undeclared_properties_are_refused_unless_allowed(compiler, hf_tokenizer) -> None:
    strict = StructuredOutputsParams(json=PET)
    assert accepts(compiler, hf_tokenizer, strict, '{"name":"Rex","age":3}')
    assert not accepts(compiler, hf_tokenizer, strict, '{"name":"Rex","story_01":"x"}')
    nested = {"type": "object", "properties": {"pet": PET}}
    assert not accepts(compiler, hf_tokenizer, StructuredOutputsParams(json=nested),
                       '{"pet":{"name":"Rex","family_141":1}}')
    # the schema allows them, the request turns strictness off, or the engine does
    allowed = [StructuredOutputsParams(json={**PET, "additionalProperties": True}),
               StructuredOutputsParams(json=PET, disable_additional_properties=False)]
    for params in allowed:
        assert accepts(compiler, hf_tokenizer, params, '{"name":"Rex","story_01":"x"}')
    lenient = GrammarCompiler(hf_tokenizer, VOCAB, config=StructuredOutputsConfig(
        disable_additional_properties=False))
    assert accepts(lenient, hf_tokenizer, strict, '{"name":"Rex","story_01":"x"}')
    assert not accepts(lenient, hf_tokenizer, StructuredOutputsParams(
        json=PET, disable_additional_properties=True), '{"name":"Rex","story_01":"x"}')


def test_whitespace_is_bounded(compiler, hf_tokenizer) -> None:
    bounded = StructuredOutputsParams(json=PET)
    # pretty-printed JSON passes, but no separator takes more than a newline + 8 blanks
    assert accepts(compiler, hf_tokenizer, bounded, '{\n  "name": "Rex",\n  "age": 3\n}')
    assert accepts(compiler, hf_tokenizer, bounded, '{"name":"Rex","age":3}')
    assert not accepts(compiler, hf_tokenizer, bounded, '{"name":' + " " * 9 + '"Rex"}')
    assert not accepts(compiler, hf_tokenizer, bounded, '{\n\n"name":"Rex"}')
    assert not accepts(compiler, hf_tokenizer, StructuredOutputsParams(json_object=True),
                       '{"a":\n\n1}')
    # disable_any_whitespace: compact JSON only, from the request or from the engine
    compact = StructuredOutputsParams(json=PET, disable_any_whitespace=True)
    assert accepts(compiler, hf_tokenizer, compact, '{"name":"Rex","age":3}')
    for spaced in ('{"name": "Rex"}', '{ "name":"Rex"}', '{"name":"Rex"}\n'):
        assert not accepts(compiler, hf_tokenizer, compact, spaced)
    engine = GrammarCompiler(hf_tokenizer, VOCAB, config=StructuredOutputsConfig(
        disable_any_whitespace=True))
    assert not accepts(engine, hf_tokenizer, StructuredOutputsParams(json_object=True),
                       '{"a": 1}')


def test_options_are_part_of_the_cache_key(compiler: GrammarCompiler) -> None:
    compiler.validate(StructuredOutputsParams(json=PET))
    compiler.validate(StructuredOutputsParams(json=PET, disable_any_whitespace=False))  # = engine
    compiler.validate(StructuredOutputsParams(json=PET, disable_any_whitespace=True))
    compiler.validate(StructuredOutputsParams(regex="a", disable_any_whitespace=False))
    compiler.validate(StructuredOutputsParams(regex="a"))  # options do not apply to a regex
    assert compiler.num_compiled == 3

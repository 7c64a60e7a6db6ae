"""TokenBytes on SmolLM2's byte-level BPE and on tiny SentencePiece-style tokenizers."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from kvflow.engine.token_bytes import TokenBytes

FFFD_BYTES = "\ufffd".encode()
TEXTS = [
    "Hello, wörld € 你好 🙂",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Emoji: 🤖🎉👍🏽 and a flag 🇫🇷 and a ZWJ sequence 👩‍💻 done",
    "中文测试：你好，世界！日本語もテストします。한국어도",
    "Accents: café naïve façade Øresund Ångström żółć Ελληνικά",
    "   leading spaces,\ttabs\t\tand\nnewlines\n\n  ",
    "Maths: x² + y² = z², π ≈ 3.14159, €100, ½ → ∞ <|im_end|> \x00\x7f",
]


@pytest.fixture(scope="module")
def smollm2() -> Any:
    """The default model's tokenizer (SmolLM2-135M-Instruct, byte-level BPE)."""
    from kvflow.config import EngineArgs
    from kvflow.engine.processor import load_tokenizer

    tok = load_tokenizer(EngineArgs().create_engine_config().model_config)
    assert isinstance(tok.backend_tokenizer.decoder, decoders.ByteLevel)
    return tok


@pytest.fixture(scope="module")
def smollm2_bytes(smollm2: Any) -> TokenBytes:
    return TokenBytes(smollm2)


def encode(tok: Any, text: str) -> list[int]:
    ids: list[int] = tok.encode(text, add_special_tokens=False)
    return ids


def id_of(tok: Any, token: str) -> int:
    found: int = tok.convert_tokens_to_ids(token)
    return found


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_tokens_add_up_to_the_text(
    smollm2: Any, smollm2_bytes: TokenBytes, text: str
) -> None:
    ids = encode(smollm2, text)
    assert b"".join(smollm2_bytes(i) for i in ids) == text.encode("utf-8")


def test_byte_level_partial_character_keeps_its_own_bytes(
    smollm2: Any, smollm2_bytes: TokenBytes
) -> None:
    ids = encode(smollm2, "你")
    assert len(ids) == 2  # "你" = e4 bd a0 is split across two tokens
    assert smollm2.decode(ids[:1]) == "\ufffd"  # what the server used to report
    assert smollm2_bytes(ids[0]) == b"\xe4\xbd"
    assert smollm2_bytes(ids[1]) == b"\xa0"
    assert FFFD_BYTES not in smollm2_bytes(ids[0])


def test_byte_level_every_id_decodes_like_its_bytes(
    smollm2: Any, smollm2_bytes: TokenBytes
) -> None:
    ids = [[i] for i in range(len(smollm2))]
    texts = smollm2.backend_tokenizer.decode_batch(ids, skip_special_tokens=False)
    for (token_id,), text in zip(ids, texts, strict=True):
        assert smollm2_bytes(token_id).decode("utf-8", errors="replace") == text, token_id


def test_special_tokens_give_their_content(smollm2: Any, smollm2_bytes: TokenBytes) -> None:
    for token_id, token in smollm2.added_tokens_decoder.items():
        assert smollm2_bytes(token_id) == token.content.encode("utf-8")
    assert smollm2_bytes(id_of(smollm2, "<|im_end|>")) == b"<|im_end|>"


def test_ids_outside_the_tokenizer_have_no_bytes(smollm2: Any, smollm2_bytes: TokenBytes) -> None:
    assert len(smollm2_bytes) == len(smollm2)
    for token_id in (len(smollm2), len(smollm2) + 64, 10**9, -1):
        assert smollm2_bytes(token_id) == b""


def test_max_token_bytes_is_the_longest_token(smollm2: Any, smollm2_bytes: TokenBytes) -> None:
    lengths = [len(smollm2_bytes(i)) for i in range(len(smollm2))]
    assert smollm2_bytes.max_token_bytes == max(lengths)
    longest_string = max(len(t) for t in smollm2.convert_ids_to_tokens(range(len(smollm2))))
    assert smollm2_bytes.max_token_bytes >= longest_string


def test_byte_length_bound_holds_without_shrinking(smollm2: Any, smollm2_bytes: TokenBytes) -> None:
    assert not smollm2_bytes.may_shrink_text
    longest = smollm2.convert_ids_to_tokens(
        [i for i in range(len(smollm2)) if len(smollm2_bytes(i)) == smollm2_bytes.max_token_bytes]
    )
    for text in [*TEXTS, "".join(longest) * 3, " " * 1000]:
        bound = math.ceil(len(text.encode("utf-8")) / smollm2_bytes.max_token_bytes)
        assert len(encode(smollm2, text)) >= bound


def test_table_builds_fast(smollm2: Any) -> None:
    start = time.process_time()  # CPU time: other processes on the machine do not count
    TokenBytes(smollm2)
    assert time.process_time() - start < 1.0


# --- tiny hand-built tokenizers ------------------------------------------------------------

BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]
PIECES = ["▁", "t", "h", "e", "c", "a", "th", "▁t", "▁th", "▁the", "▁c", "▁ca", "▁cat"]


def sentencepiece_bpe() -> Tokenizer:
    vocab = {p: i for i, p in enumerate(["<unk>", "<s>", "</s>", *BYTE_TOKENS, *PIECES])}
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("t", "h"), ("▁", "c"), ("▁c", "a")]
    merges.append(("▁ca", "t"))
    return Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))


def sentencepiece_unigram() -> Tokenizer:
    pieces = ["<unk>", "<s>", "</s>", *BYTE_TOKENS, *PIECES]
    scores = [(p, -float(len(PIECES) - len(p)) if p in PIECES else -100.0) for p in pieces]
    return Tokenizer(models.Unigram(scores, unk_id=0, byte_fallback=True))


@pytest.fixture(params=[sentencepiece_bpe, sentencepiece_unigram], ids=["bpe", "unigram"])
def sentencepiece(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    """A Mistral-style tokenizer: Metaspace for spaces, <0xNN> tokens for unknown bytes."""
    tok: Tokenizer = request.param()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_sentencepiece_byte_tokens_and_spaces(sentencepiece: PreTrainedTokenizerFast) -> None:
    token_bytes = TokenBytes(sentencepiece)
    assert token_bytes(id_of(sentencepiece, "<0xE2>")) == b"\xe2"
    assert token_bytes(id_of(sentencepiece, "▁the")) == b" the"
    assert token_bytes(id_of(sentencepiece, "</s>")) == b"</s>"
    text = "the cat € 你"
    ids = encode(sentencepiece, text)
    assert sentencepiece.convert_ids_to_tokens(ids[:2]) == ["▁the", "▁cat"]
    # Metaspace puts a "▁" before the first word, which the decoder strips again.
    assert b"".join(token_bytes(i) for i in ids) == b" " + text.encode("utf-8")
    assert token_bytes.max_token_bytes == len(b"<unk>")
    assert token_bytes.may_shrink_text  # a literal "▁" (3 bytes) counts as one space


def test_sentencepiece_with_llama2_normalizer_and_decoder() -> None:
    tok = sentencepiece_bpe()
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])  # fmt: skip
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok)
    token_bytes = TokenBytes(wrapped)
    ids = encode(wrapped, "the cat €")
    assert [token_bytes(i) for i in ids] == [b" the", b" cat", b" ", b"\xe2", b"\x82", b"\xac"]


def byte_level(
    normalizer: normalizers.Normalizer | None = None,
    pre_tokenizer: pre_tokenizers.PreTokenizer | None = None,
    added: AddedToken | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer whose vocabulary is the 256 bytes and nothing more."""
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    if added is not None:
        tok.add_tokens([added])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


WHITESPACE_THEN_BYTES = pre_tokenizers.Sequence(
    [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
)
PREPEND_THEN_STRIP = normalizers.Sequence([normalizers.Prepend(" "), normalizers.Strip()])


@pytest.mark.parametrize(
    ("normalizer", "pre_tokenizer", "added", "may_shrink"),
    [
        (None, None, None, False),
        (normalizers.Prepend(" "), None, None, False),
        (normalizers.Replace(" ", "  "), None, None, False),
        (normalizers.NFC(), None, None, True),  # "e\u0301" (3 bytes) -> "é" (2)
        (normalizers.Lowercase(), None, None, True),  # Kelvin sign (3 bytes) -> "k"
        (normalizers.Replace("  ", " "), None, None, True),
        (PREPEND_THEN_STRIP, None, None, True),
        (None, WHITESPACE_THEN_BYTES, None, True),
        (None, None, AddedToken("<mask>", lstrip=True), True),
        (None, None, AddedToken("<mask>"), False),
    ],
)
def test_may_shrink_text(
    normalizer: normalizers.Normalizer | None,
    pre_tokenizer: pre_tokenizers.PreTokenizer | None,
    added: AddedToken | None,
    may_shrink: bool,
) -> None:
    tok = byte_level(normalizer, pre_tokenizer, added)
    assert TokenBytes(tok).may_shrink_text is may_shrink


def test_added_token_in_a_byte_level_tokenizer_is_its_text() -> None:
    tok = byte_level(added=AddedToken("naïve ", normalized=False))
    token_bytes = TokenBytes(tok)
    assert token_bytes(id_of(tok, "naïve ")) == "naïve ".encode()
    ids = encode(tok, "a naïve é")
    assert b"".join(token_bytes(i) for i in ids) == "a naïve é".encode()


def test_unknown_decoder_falls_back_to_decoding_each_token() -> None:
    vocab = {"[UNK]": 0, "hello": 1, "##lo": 2, "hel": 3}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    wrapped: Any = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    token_bytes = TokenBytes(wrapped)
    for token_id in range(len(wrapped)):
        assert token_bytes(token_id) == wrapped.decode([token_id]).encode("utf-8")
    assert token_bytes.may_shrink_text


def test_unknown_token_may_stand_for_any_text() -> None:
    alphabet = list(bytes_to_unicode().values())
    vocab = {char: i for i, char in enumerate(["<unk>", *alphabet[1:]])}  # one byte missing
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    assert TokenBytes(PreTrainedTokenizerFast(tokenizer_object=tok)).may_shrink_text


class SlowTokenizer:
    """Stands for a pure-Python tokenizer: no Rust backend to look into."""

    def __len__(self) -> int:
        return 3

    def decode(self, token_ids: list[int]) -> str:
        return ["a", "é", "\ufffd"][token_ids[0]]


def test_slow_tokenizer_falls_back_to_decoding_each_token() -> None:
    token_bytes = TokenBytes(SlowTokenizer())
    assert [token_bytes(i) for i in range(4)] == [b"a", "é".encode(), FFFD_BYTES, b""]
    assert token_bytes.max_token_bytes == len(FFFD_BYTES)
    assert token_bytes.may_shrink_text

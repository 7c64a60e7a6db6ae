"""The raw bytes each token id stands for: OpenAI logprobs' `bytes`, and a prompt length bound.

A token's decoded text is not its bytes: a token holding part of a multi-byte character
decodes to U+FFFD. So the table is built from the token strings themselves, by undoing
what the tokenizer did to the text before splitting it:

    byte-level BPE (GPT-2, Llama 3, Qwen2):  "âĤ" -> each char through bytes_to_unicode⁻¹
    SentencePiece (Llama 2, Mistral):        "<0xE2>" -> b"\\xe2", "▁the" -> b" the"
    added / special tokens:                  their content, as UTF-8
    anything else:                           the UTF-8 of the token decoded on its own
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from itertools import accumulate, pairwise
from typing import Any

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"  # "▁", SentencePiece's stand-in for a space
# Normalizers that only ever add text: Prepend adds a prefix, ByteLevel maps each byte to a
# character of one or two bytes. Every other kind may remove or shorten characters (NFC
# composes, Strip and StripAccents drop, Lowercase maps the 3-byte Kelvin sign to "k").
_GROWING_NORMALIZERS = frozenset({"Prepend", "ByteLevel"})
# Pre-tokenizers that split without dropping text (Whitespace and friends drop spaces).
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Digits", "UnicodeScripts", "FixedLength"})
_DROPPING_BEHAVIOR = "Removed"  # Split/Punctuation behavior that throws the match away


class TokenBytes:
    """The raw bytes each token id stands for, built once from a Hugging Face tokenizer.

    Invariant: when `may_shrink_text` is False, any text of B UTF-8 bytes encodes to at
    least ceil(B / max_token_bytes) tokens, since its tokens' bytes add up to at least B.
    """

    __slots__ = ("_table", "_max_token_bytes", "_may_shrink_text")

    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow (pure Python) tokenizer: nothing to inspect
            added: Mapping[int, Any] = getattr(tokenizer, "added_tokens_decoder", {})
            size = _table_size(len(tokenizer), 0, added)
            table = _decoded_table(tokenizer, size)
            may_shrink = True
        else:
            table, may_shrink = _backend_table(backend, len(tokenizer))
        self._table: list[bytes] = table
        self._max_token_bytes = max(1, max(map(len, table), default=0))
        self._may_shrink_text = may_shrink

    def __call__(self, token_id: int) -> bytes:
        if 0 <= token_id < len(self._table):
            return self._table[token_id]
        return b""  # past the tokenizer: padding rows of the embedding

    def __len__(self) -> int:
        return len(self._table)

    @property
    def max_token_bytes(self) -> int:
        return self._max_token_bytes

    @property
    def may_shrink_text(self) -> bool:
        return self._may_shrink_text


def _backend_table(backend: Any, tokenizer_len: int) -> tuple[list[bytes], bool]:
    """(bytes of every id, may shrink text) for a `tokenizers.Tokenizer`."""
    decoder = _spec(backend.decoder)
    pre_tokenizer = _spec(backend.pre_tokenizer)
    normalizer = _spec(backend.normalizer)
    added: dict[int, Any] = backend.get_added_tokens_decoder()
    size = _table_size(tokenizer_len, backend.get_vocab_size(with_added_tokens=True), added)
    byte_fallback = _has_type(decoder, "ByteFallback") or _model_byte_fallback(backend.model)
    replacement = _metaspace_replacement(decoder, pre_tokenizer)

    byte_level = _is_byte_level(decoder, pre_tokenizer)
    if byte_level:
        table = _byte_level_table(_model_tokens(backend.model, size, added))
    elif replacement is not None or byte_fallback:
        tokens = _model_tokens(backend.model, size, added)
        table = _sentencepiece_table(tokens, replacement, byte_fallback)
    else:
        table = _decoded_table(backend, size)
    for token_id, token in added.items():
        table[token_id] = token.content.encode("utf-8")

    known_kind = byte_level or replacement is not None or byte_fallback
    may_shrink = (
        not known_kind
        # A literal "▁" in the text (3 bytes) comes back as one space.
        or replacement is not None
        or _unk_possible(backend.model, byte_fallback, byte_level)
        or _normalizer_may_shrink(normalizer)
        or _pre_tokenizer_may_drop(pre_tokenizer)
        or any(token.lstrip or token.rstrip for token in added.values())  # swallow spaces
    )
    return table, may_shrink


def _table_size(tokenizer_len: int, vocab_size: int, added: Mapping[int, Any]) -> int:
    """Every id the tokenizer knows, even an added id past its length."""
    return max(tokenizer_len, vocab_size, max(added, default=-1) + 1)


def _model_tokens(model: Any, size: int, added: Mapping[int, Any]) -> list[str]:
    """The model's token string of every id below size; "" for added ids and unused ids."""
    # id_to_token over the range is about twice as fast as get_vocab() on a 150k vocabulary.
    tokens: list[str | None] = list(map(model.id_to_token, range(size)))
    for token_id in added:
        tokens[token_id] = None  # their content is used instead
    return [token or "" for token in tokens]


def _byte_level_table(tokens: list[str]) -> list[bytes]:
    """GPT-2's byte-level alphabet undone: each character of a token is one byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # char -> the char whose code point is the byte, so that latin-1 gives the byte back.
    # Code points below 256 outside the alphabet map past 255, so that latin-1 fails on them.
    unbyte: dict[int, int] = {code: 256 for code in range(256)}
    unbyte.update({ord(char): byte for byte, char in bytes_to_unicode().items()})
    try:
        # All at once, then cut: one character is one byte, so the offsets carry over.
        blob = "".join(tokens).translate(unbyte).encode("latin-1")
    except UnicodeEncodeError:
        return [_unbyte(token, unbyte) for token in tokens]
    ends = list(accumulate(map(len, tokens)))
    return [blob[start:end] for start, end in pairwise([0, *ends])]


def _unbyte(token: str, unbyte: dict[int, int]) -> bytes:
    try:
        return token.translate(unbyte).encode("latin-1")
    except UnicodeEncodeError:
        # Not in the alphabet: the ByteLevel decoder keeps such a token's UTF-8 as is.
        return token.encode("utf-8")


def _sentencepiece_table(
    tokens: list[str], replacement: str | None, byte_fallback: bool
) -> list[bytes]:
    """Byte tokens `<0xNN>` are one byte; the replacement character is a space."""
    table: list[bytes] = []
    for token in tokens:
        byte = _BYTE_TOKEN.fullmatch(token) if byte_fallback else None
        if byte is not None:
            table.append(bytes([int(byte.group(1), 16)]))
        elif replacement is not None:
            table.append(token.replace(replacement, " ").encode("utf-8"))
        else:
            table.append(token.encode("utf-8"))
    return table


def _decoded_table(tokenizer: Any, size: int) -> list[bytes]:
    """Each id decoded on its own: partial characters come out as U+FFFD."""
    ids = [[token_id] for token_id in range(size)]
    if hasattr(tokenizer, "decode_batch"):  # a `tokenizers.Tokenizer`: decodes in parallel
        texts = tokenizer.decode_batch(ids, skip_special_tokens=False)
    else:
        texts = [tokenizer.decode(token_ids) for token_ids in ids]
    return [text.encode("utf-8") for text in texts]


def _spec(component: Any) -> dict[str, Any] | None:
    """A normalizer, pre-tokenizer or decoder as its JSON config (without the vocabulary)."""
    if component is None:
        return None
    spec: dict[str, Any] = json.loads(component.__getstate__())
    return spec


def _parts(spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The leaves of a component, looking inside Sequence ones."""
    if spec is None:
        return []
    if spec.get("type") != "Sequence":
        return [spec]
    children = spec.get("normalizers") or spec.get("pretokenizers") or spec.get("decoders") or []
    return [leaf for child in children for leaf in _parts(child)]


def _has_type(spec: dict[str, Any] | None, type_name: str) -> bool:
    return any(part.get("type") == type_name for part in _parts(spec))


def _is_byte_level(decoder: dict[str, Any] | None, pre_tokenizer: dict[str, Any] | None) -> bool:
    """The decoder undoes ByteLevel (or there is no decoder, but a ByteLevel pre-tokenizer)."""
    if decoder is None:
        return _has_type(pre_tokenizer, "ByteLevel")
    return _has_type(decoder, "ByteLevel")


def _metaspace_replacement(
    decoder: dict[str, Any] | None, pre_tokenizer: dict[str, Any] | None
) -> str | None:
    """The character that stands for a space (Metaspace, or a Replace("▁", " ") decoder)."""
    for part in _parts(decoder) + _parts(pre_tokenizer):
        if part.get("type") == "Metaspace":
            return str(part.get("replacement", _METASPACE))
        pattern = part.get("pattern", {}).get("String")
        if part.get("type") == "Replace" and part.get("content") == " " and pattern:
            return str(pattern)
    return None


def _model_byte_fallback(model: Any) -> bool:
    if type(model).__name__ == "Unigram":  # BPE exposes the flag, Unigram only in its state
        return bool(json.loads(model.__getstate__()).get("byte_fallback", False))
    return bool(getattr(model, "byte_fallback", False))


def _unk_possible(model: Any, byte_fallback: bool, byte_level: bool) -> bool:
    """Whether an unknown token may stand for text of any length (often fused runs)."""
    if byte_fallback or (byte_level and _covers_all_bytes(model)):
        return False
    return getattr(model, "unk_token", None) is not None or type(model).__name__ == "Unigram"


def _covers_all_bytes(model: Any) -> bool:
    """Whether every byte-level character is a token, so that no text needs an unknown."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return all(model.token_to_id(char) is not None for char in bytes_to_unicode().values())


def _normalizer_may_shrink(normalizer: dict[str, Any] | None) -> bool:
    for part in _parts(normalizer):
        kind = part.get("type")
        if kind == "Replace":
            pattern = part.get("pattern", {}).get("String")
            content = str(part.get("content", ""))
            if pattern is None or len(content.encode()) < len(str(pattern).encode()):
                return True  # a regex may match anything
        elif kind not in _GROWING_NORMALIZERS:
            return True
    return False


def _pre_tokenizer_may_drop(pre_tokenizer: dict[str, Any] | None) -> bool:
    for part in _parts(pre_tokenizer):
        kind = part.get("type")
        if kind in ("Split", "Punctuation"):
            if part.get("behavior") == _DROPPING_BEHAVIOR:
                return True
        elif kind != "Metaspace" and kind not in _KEEPING_PRE_TOKENIZERS:
            return True
    return False

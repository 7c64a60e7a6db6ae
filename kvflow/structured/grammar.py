"""Structured-output grammars: StructuredOutputsParams → llguidance grammar → compiled matcher.

Both sides of the process boundary use `GrammarCompiler`: the client to refuse an invalid or
unsatisfiable grammar with a ValueError before the request is queued, the core to get the
compiled matcher each request copies. Compiling is done once per distinct grammar text;
compiled matchers sit in a small LRU cache keyed by that text.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np

from kvflow.sampling_params import StructuredOutputsParams
from kvflow.structured.options import StructuredOutputsConfig
from kvflow.structured.schema import forbid_additional_properties

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# (kind, spec text, JSON options): kind is "json" | "json_object" | "regex" | ...; the options
# (disable_any_whitespace, disable_additional_properties) are set for JSON kinds only
GrammarKey = tuple[str, str, tuple[bool, ...]]

# JSON whitespace unless disable_any_whitespace asks for none. llguidance's own default is
# any run of whitespace; a small model sampled at temperature 1 then tends to wander off into
# whitespace and never close the object. One optional newline and a little indentation keep
# pretty-printed output possible while every step must make progress.
JSON_WHITESPACE = r"[\n]?[ \t]{0,8}"
_STRICT = StructuredOutputsConfig()


def grammar_key(params: StructuredOutputsParams,
                config: StructuredOutputsConfig = _STRICT) -> GrammarKey:
    """The cache key: which constraint, its text exactly as it will be compiled, and the
    JSON options of this request (its own, else the engine's `config`)."""
    if params.json is not None:
        schema = params.json
        return "json", schema if isinstance(schema, str) else json.dumps(schema), \
            config.resolve(params)
    if params.regex is not None:
        return "regex", params.regex, ()
    if params.choice is not None:
        return "choice", json.dumps(params.choice), ()
    if params.grammar is not None:
        return "grammar", params.grammar, ()
    return "json_object", "", config.resolve(params)[:1]


def _json_options(no_whitespace: bool) -> JsonCompileOptions:
    if no_whitespace:
        return {"whitespace_flexible": False}  # compact JSON: separators "," and ":"
    return {"whitespace_pattern": JSON_WHITESPACE}


def to_llguidance(key: GrammarKey) -> str:
    """The llguidance grammar for a key; ValueError for text that cannot even be read."""
    kind, text, options = key
    if kind == "json":
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("structured_outputs.json must be a JSON schema object")
        no_whitespace, strict = options
        if strict:
            text = json.dumps(forbid_additional_properties(schema))
        return str(llguidance.LLMatcher.grammar_from_json_schema(
            text, defaults=_json_options(no_whitespace)))
    if kind == "json_object":
        return str(llguidance.LLMatcher.grammar_from_json_schema(
            '{"type": "object"}', defaults=_json_options(options[0])))
    if kind == "grammar" and not text.strip():
        raise ValueError("structured_outputs.grammar is empty")
    try:
        # "grammar" accepts GBNF (llama.cpp's EBNF, `root ::= ...`) or Lark (`start: ...`).
        return llguidance.grammar_from(kind, text)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"structured_outputs.{kind}: {exc}") from None


def load_ll_tokenizer(hf_tokenizer: Any, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the tokenizer; `vocab_size` is the model's logits width (~1 s)."""
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)
    except ValueError as exc:
        raise ValueError(f"structured output needs a fast tokenizer: {exc}") from None


def compile_grammar(key: GrammarKey, tokenizer: llguidance.LLTokenizer) -> llguidance.LLMatcher:
    """A fresh matcher for the grammar; ValueError if it is invalid or can never match."""
    kind = key[0]
    grammar = to_llguidance(key)
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        raise ValueError(f"invalid structured_outputs.{kind}: {error.strip()}")
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(f"invalid structured_outputs.{kind}: {matcher.get_error().strip()}")
    if not matcher.is_accepting() and _only_eos_allowed(matcher, tokenizer):
        raise ValueError(f"structured_outputs.{kind} can never be matched (no text satisfies it)")
    return matcher


def _only_eos_allowed(matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer) -> bool:
    """True when the first step admits no token but EOS: llguidance's sign of an empty language."""
    words = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint32).copy()  # [ceil(V/32)]
    for eos in tokenizer.eos_tokens:
        words[eos // 32] &= ~np.uint32(1 << (eos % 32))
    return not words.any()


class GrammarCompiler:
    """Compiles structured-output params to matchers, once per distinct grammar (LRU cache).

    The llguidance tokenizer is built on the first call, so engines that never see a
    structured request never pay for it. Thread-safe: the core compiles in a worker thread.
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int, max_cached: int = 256,
                 config: StructuredOutputsConfig = _STRICT) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.config = config  # the engine's JSON options, for requests that set none
        self.vocab_size = vocab_size
        self.max_cached = max_cached
        self.num_compiled = 0  # cache misses that compiled a grammar, valid or not
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[GrammarKey, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_ll_tokenizer(self.hf_tokenizer, self.vocab_size)
        return self._tokenizer

    def get(self, key: GrammarKey) -> llguidance.LLMatcher:
        """The compiled matcher of `key`, never advanced: callers `deep_copy()` it."""
        with self._lock:
            matcher = self._cache.get(key)
            if matcher is not None:
                self._cache.move_to_end(key)
                return matcher
            self.num_compiled += 1
            matcher = compile_grammar(key, self.tokenizer)
            self._cache[key] = matcher
            if len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
            return matcher

    def validate(self, params: StructuredOutputsParams) -> None:
        """Raise ValueError unless the params compile to a satisfiable grammar."""
        self.get(grammar_key(params, self.config))

    def compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The compiled (cached) matcher of `params` under this compiler's options."""
        return self.get(grammar_key(params, self.config))

    def __len__(self) -> int:
        return len(self._cache)

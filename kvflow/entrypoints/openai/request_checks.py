"""Bounds on what a request may ask for, checked before any work is done for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvflow.entrypoints.openai.errors import OpenAIError
from kvflow.entrypoints.openai.limits import ServerLimits
from kvflow.entrypoints.openai.protocol import SamplingRequest

# chat_template_kwargs that would change what apply_chat_template does rather than feed the
# template a variable; `chat_template` itself is allowed only under --trust-request-chat-template.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "add_generation_prompt", "continue_final_message", "tokenize",
    "return_dict", "return_tensors", "padding", "truncation", "max_length", "tokenizer_kwargs",
    "return_assistant_tokens_mask", "chat_template", "tools", "documents",
})


MAX_BODY_FIELDS = 256


def too_long(max_model_len: int, what: str, reduce: str, param: str) -> OpenAIError:
    """vLLM's wording for a request that cannot fit the context."""
    return OpenAIError(f"This model's maximum context length is {max_model_len} tokens. "
                       f"However, {what}. Please reduce the length of the {reduce}.", 400, param)


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _at_most(param: str, count: int, limit: int, what: str = "entries") -> None:
    if count > limit:
        raise OpenAIError(f"{param} may have at most {limit} {what}, got {count}", 400, param)


def check_sampling_bounds(request: SamplingRequest, limits: ServerLimits,
                          vocab_size: int) -> None:
    """Every count and list a client controls, against its limit: a 400 naming the field."""
    if request.n > limits.max_n:
        raise OpenAIError(f"n must be <= {limits.max_n}, got {request.n}", 400, "n")
    if request.best_of is not None and request.best_of > limits.max_n:
        raise OpenAIError(f"best_of must be <= {limits.max_n}, got {request.best_of}", 400,
                          "best_of")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    _at_most("stop", len(stops), limits.max_stop_sequences, "strings")
    _at_most("bad_words", len(request.bad_words or []), limits.max_bad_words, "words")
    for param, texts in (("stop", stops), ("bad_words", request.bad_words or [])):
        longest = max((len(t) for t in texts), default=0)
        _at_most(param, longest, limits.max_stop_chars, "characters in one string")
    _at_most("stop_token_ids", len(request.stop_token_ids or []), limits.max_token_id_list)
    _at_most("logit_bias", len(request.logit_bias or {}), limits.max_token_id_list)
    _at_most("allowed_token_ids", len(request.allowed_token_ids or []), vocab_size,
             "entries (the vocabulary's size)")


@dataclass(frozen=True)
class BodyShape:
    """Counts checked on the decoded JSON before pydantic builds millions of objects."""

    limits: ServerLimits
    max_model_len: int
    vocab_size: int

    def check(self, body: dict[str, Any]) -> None:
        limits, context = self.limits, self.max_model_len
        if len(body) > MAX_BODY_FIELDS:  # unknown fields are kept (and logged), not refused
            raise OpenAIError(f"the request body may have at most {MAX_BODY_FIELDS} fields, "
                              f"got {len(body)}", 400)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:
            self._check_prompt_lists(prompt, body.get("truncate_prompt_tokens") is None)
        bounds = {
            # a conversation with more messages (or content parts) than tokens cannot fit
            "messages": context, "tokens": context, "stop": limits.max_stop_sequences,
            "bad_words": limits.max_bad_words, "stop_token_ids": limits.max_token_id_list,
            "logit_bias": limits.max_token_id_list, "allowed_token_ids": self.vocab_size,
        }
        for name, bound in bounds.items():
            value = body.get(name)
            if isinstance(value, list | dict):
                _at_most(name, len(value), bound)
        for index, message in enumerate(body.get("messages") or ()):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                _at_most(f"messages.{index}.content", len(content), context, "parts")


    def _check_prompt_lists(self, prompt: list[Any], untruncated: bool) -> None:
        if not isinstance(prompt[0], int):
            _at_most("prompt", len(prompt), self.limits.max_prompts_per_request, "prompts")
        lists = [prompt] if isinstance(prompt[0], int) else prompt
        for ids in lists:
            if untruncated and isinstance(ids, list) and len(ids) > self.max_model_len:
                raise too_long(self.max_model_len, f"your request has {len(ids)} input tokens",
                               "input", "prompt")


def check_bad_words_volume(bad_words: list[str] | None, sequences: int,
                           limits: ServerLimits) -> None:
    """Each sequence carries its own bad-word token ids in the core: bound them all together."""
    total = sum(len(word) for word in bad_words or ()) * sequences
    if total > limits.max_bad_words_chars:
        raise OpenAIError(
            f"bad_words: their characters times the sequences they apply to (prompts x n) may "
            f"be at most {limits.max_bad_words_chars}, got {total}", 400, "bad_words")


def check_messages_size(texts: list[str], bound: PromptBound) -> None:
    """A conversation whose texts alone cannot fit the context is refused before rendering."""
    size = sum(utf8_size(t) for t in texts)
    if size > bound.max_bytes:
        raise too_long(bound.max_model_len, f"the messages hold {size} bytes of text, more "
                       "than that many tokens can hold", "messages", "messages")


def check_template_kwargs(kwargs: dict[str, Any] | None, trusted: bool) -> str | None:
    """The request's own chat template, if it brings one and the operator allows it."""
    if not kwargs:
        return None
    template = kwargs.get("chat_template")
    if template is not None and not trusted:
        raise OpenAIError("chat_template_kwargs.chat_template: a request-supplied chat template "
                          "is not allowed (the server runs with --no-trust-request-chat-template)",
                          400, "chat_template_kwargs")
    if template is not None and not isinstance(template, str):
        raise OpenAIError("chat_template_kwargs.chat_template must be a string", 400,
                          "chat_template_kwargs")
    for key in ("tools", "documents"):
        if kwargs.get(key):
            raise OpenAIError(f"chat_template_kwargs.{key}: {key} are not supported", 400,
                              "chat_template_kwargs")
    reserved = sorted(k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS
                      and k not in ("chat_template", "tools", "documents"))
    if reserved:
        raise OpenAIError(f"chat_template_kwargs may not set {', '.join(reserved)}", 400,
                          "chat_template_kwargs")
    return template


@dataclass(frozen=True)
class PromptBound:
    """Refuses a text that cannot fit the context, without tokenizing it.

    B bytes of text make at least B / max_token_bytes tokens (no token stands for more bytes);
    a normalizer may shrink text first (NFC composes up to 3 bytes into 2), hence `shrink`.
    """

    max_model_len: int
    max_token_bytes: int
    shrink: float = 1.0

    def check(self, text: str, param: str) -> None:
        size = utf8_size(text)
        at_least = int(size / self.max_token_bytes / self.shrink)
        if at_least > self.max_model_len:
            raise too_long(self.max_model_len, f"your request has at least {at_least} input "
                           f"tokens ({size} bytes of text)", "input", param)

    @property
    def max_bytes(self) -> int:
        """The most bytes of text that may still fit (the rendered chat prompt's limit)."""
        return int((self.max_model_len + 1) * self.max_token_bytes * self.shrink)

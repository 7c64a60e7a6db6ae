"""Incremental detokenization of one request's output, with stop-string detection."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from tokenizers import Tokenizer

from kvflow.sampling_params import SamplingParams

# Prompt tokens decoded ahead of the first output token, so its text is what it would be in
# context (e.g. the leading space of a SentencePiece "▁word" token is kept).
_PROMPT_CONTEXT_TOKENS = 4
_REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an unfinished UTF-8 sequence


class FastTokenizer(Protocol):
    """What is needed of a transformers fast tokenizer: its Rust tokenizer."""

    @property
    def backend_tokenizer(self) -> Tokenizer: ...


class TokenTextStream:
    """Decodes token ids one at a time, looking only at the last few ids each step.

    The window holds context ids, whose text was already emitted, then pending ids. Each
    step decodes the window and emits what it adds beyond the text emitted so far, except
    a trailing unfinished multi-byte character (U+FFFD from the decoder), which waits for
    its last byte. Once the window's text is complete, the
    pending ids become the next context, so the window stays a few tokens long:

        window:  [ c c | p p p ]   decode -> context text + new text [+ unfinished char]
                 context pending

    Same idea as `tokenizers.decoders.DecodeStream`, written out so that complete
    characters before an unfinished one are not delayed, tokens without text (skipped
    special tokens) do not pile up, a decoder that rewrites earlier text cannot raise, and
    the work per step can be checked in tests.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        context_ids: Sequence[int],
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Without spaces between special tokens, a special token right after another one is
        # emitted as its bare content (a word-joining decoder would put a space before it).
        self._bare_added: dict[int, str] = {}
        if not spaces_between_special_tokens and not skip_special_tokens:
            added = tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
            self._bare_added = {i: tok.content for i, tok in added.items()}
        self._last_was_added = False
        self._ids = list(context_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._num_context = len(self._ids)
        self._emitted = self._decode(self._ids)  # text of the window already returned

    def step(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is unfinished)."""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        stable = text.rstrip(_REPLACEMENT_CHAR)  # an unfinished character decodes to U+FFFD
        new_text = ""
        if text == self._emitted:
            # No text at all (e.g. a skipped special token): keep it out of the window, so
            # a run of such tokens cannot make the window grow.
            self._ids.pop()
        elif len(stable) > len(self._emitted):
            if stable.startswith(self._emitted):
                new_text = stable[len(self._emitted) :]
            else:
                # The decoder rewrote earlier text (e.g. completed a character split at the
                # prompt boundary): emit what differs, nothing can be taken back.
                new_text = stable[len(os.path.commonprefix([stable, self._emitted])) :]
            if len(stable) == len(text):  # complete: the pending ids become the context
                del self._ids[: self._num_context]
                self._num_context = len(self._ids)
                self._emitted = self._decode(self._ids)
            else:
                self._emitted = stable
        if self._bare_added:
            content = self._bare_added.get(token_id)
            if content is not None and self._last_was_added:
                new_text = content
            self._last_was_added = content is not None
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


class IncrementalDetokenizer:
    """One request's output text, built token by token, and its stop strings."""

    def __init__(
        self,
        tokenizer: FastTokenizer | None,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
    ) -> None:
        self._token_ids: list[int] = []
        self._text = ""
        self._stream: TokenTextStream | None = None
        if tokenizer is not None and params.detokenize:
            self._stream = TokenTextStream(
                tokenizer.backend_tokenizer,
                prompt_token_ids,
                params.skip_special_tokens,
                params.spaces_between_special_tokens,
            )
        self._stop: list[str] = list(params.stop or []) if self._stream is not None else []
        self._include_stop_str = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        # Characters held back from streaming so a partial stop string is never sent.
        self._stop_buffer_length = 0
        if self._stop and not self._include_stop_str:
            self._stop_buffer_length = max(len(s) for s in self._stop) - 1
        self._num_chars_returned = 0
        # tokens of the last update() after the stop string it matched (left out)
        self.num_dropped = 0

    @property
    def output_text(self) -> str:
        """The full text so far (truncated at a matched stop string)."""
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        return self._token_ids

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool) -> str | None:
        """Append the new tokens' text; return the stop string it matched, if any.

        `stop_terminated`: the last token is EOS or a stop token id; its text is left out
        unless include_stop_str_in_output. A stop string only counts once min_tokens tokens
        exist, and only if it ends after the text of the first min_tokens tokens.
        """
        self.num_dropped = 0
        if not new_token_ids:
            return None
        decoded_ids = list(new_token_ids)
        skipped_id = None
        if stop_terminated and not self._include_stop_str:
            skipped_id = decoded_ids.pop()
        if self._stream is None:
            self._token_ids.extend(new_token_ids)
            return None
        old_len = len(self._text)
        stop_check_from = old_len  # text before this offset may not end a stop string
        pieces: list[str] = []
        for n, token_id in enumerate(decoded_ids, 1):
            self._token_ids.append(token_id)
            pieces.append(self._stream.step(token_id))
            if len(self._token_ids) <= self._min_tokens:
                stop_check_from = old_len + sum(len(p) for p in pieces)
            elif self._stop and n < len(new_token_ids):
                # several tokens in one step (speculative decoding): a stop string that
                # ends at this token drops the ones after it, as one-token steps would
                text = self._text + "".join(pieces)
                match = find_stop_string(text, len(text) - stop_check_from, self._stop)
                if match is not None:
                    self.num_dropped = len(new_token_ids) - n
                    self._text = text
                    return self._cut_at(match)
        self._text += "".join(pieces)
        if skipped_id is not None:
            self._token_ids.append(skipped_id)
        if not self._stop or len(self._token_ids) <= self._min_tokens:
            return None
        match = find_stop_string(self._text, len(self._text) - stop_check_from, self._stop)
        return None if match is None else self._cut_at(match)

    def _cut_at(self, match: tuple[str, int]) -> str:
        stop_str, index = match
        self._text = self._text[: index + len(stop_str) if self._include_stop_str else index]
        return stop_str

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to send now: all of it, or (delta) only what was not returned before.

        Until finished, the last (longest stop string - 1) characters are held back.
        """
        hold_back = 0 if finished else self._stop_buffer_length
        length = max(len(self._text) - hold_back, 0)
        if not delta:
            return self._text[:length]
        start = self._num_chars_returned
        if length <= start:
            return ""
        self._num_chars_returned = length
        return self._text[start:length]


def find_stop_string(text: str, num_new_chars: int, stop: Sequence[str]) -> tuple[str, int] | None:
    """Earliest stop string overlapping the last `num_new_chars` characters, with its index.

    Only the new characters plus (len(stop) - 1) before them are searched, so a stop string
    split across tokens is found without rescanning old text. Ties go to the first listed.
    """
    if num_new_chars <= 0:
        return None
    best: tuple[str, int] | None = None
    for stop_str in stop:
        start = max(len(text) - num_new_chars - len(stop_str) + 1, 0)
        index = text.find(stop_str, start)
        if index != -1 and (best is None or index < best[1]):
            best = (stop_str, index)
    return best

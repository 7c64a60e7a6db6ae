"""Per-request grammar state, and the token bitmask applied to a batch's structured rows."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future

import llguidance
import llguidance.torch
import numpy as np
import torch

logger = logging.getLogger(__name__)

_NEG_INF = float("-inf")


class GrammarState:
    """One request's matcher: where its output stands in the grammar.

    It lives on the Request, so preemption and recompute keep it: the tokens it consumed
    are exactly the request's output tokens. The compiled grammar may still be on its way
    from the compile thread (`future`); it is waited for at the first sampled token only.
    Once the grammar is complete (or broken) the matcher's mask allows only EOS.
    """

    __slots__ = ("request_id", "future", "matcher", "failed", "num_accepted")

    def __init__(self, request_id: str, future: Future[llguidance.LLMatcher]) -> None:
        self.request_id = request_id
        self.future = future
        self.matcher: llguidance.LLMatcher | None = None
        self.failed = False  # the grammar did not compile: the row may only end (EOS)
        self.num_accepted = 0

    def resolve(self) -> llguidance.LLMatcher | None:
        """This request's own matcher (a copy of the compiled one); None if compiling failed."""
        if self.matcher is None and not self.failed:
            try:
                self.matcher = self.future.result().deep_copy()
            except Exception:  # the client validated it; only a bypassing caller gets here
                logger.exception("request %s: its grammar failed to compile", self.request_id)
                self.failed = True
        return self.matcher

    def accept_token(self, token_id: int) -> None:
        """Advance past a sampled token (nothing to do once the grammar is complete)."""
        matcher = self.matcher
        if matcher is None or matcher.is_stopped():
            return  # EOS after completion, or EOS forced by a failure / ignore_eos
        if not matcher.consume_token(token_id):
            # Only when the mask could not be honoured (e.g. allowed_token_ids ∩ grammar = ∅);
            # the matcher is now in its error state, whose mask allows only EOS.
            error = matcher.get_error().strip().splitlines()
            logger.warning("request %s left its grammar: %s", self.request_id,
                           error[0] if error else "?")
            return
        self.num_accepted += 1


class GrammarBitmask:
    """Masks the logits of a batch's structured rows to the tokens their grammars allow.

    One int32 bitmask row per structured row, bit j of word i set when token 32*i + j may
    come next. llguidance fills the rows in parallel (Rust threads, GIL released); unpacking
    and masking are one batched tensor operation.
    """

    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int], max_rows: int,
                 device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.eos_only = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)  # [W]
        for eos in eos_token_ids:
            word = self.eos_only[eos // 32].item()
            self.eos_only[eos // 32] = _to_int32(int(word) | (1 << (eos % 32)))
        self.executor = llguidance.LLExecutor()
        self.bitmask = llguidance.torch.allocate_token_bitmask(max_rows, vocab_size)  # [R, W]
        self.shifts = torch.arange(32, dtype=torch.int32, device=device)  # [32]

    def apply(self, logits: torch.Tensor, rows: Sequence[int],
              states: Sequence[GrammarState]) -> None:
        """Set to -inf, in place, every logit of `rows` that the grammar of that row forbids."""
        if len(rows) > self.bitmask.shape[0]:
            self.bitmask = llguidance.torch.allocate_token_bitmask(len(rows), self.vocab_size)
        bitmask = self.bitmask[:len(rows)]  # [n, W], contiguous leading rows
        matchers = []
        for i, state in enumerate(states):
            matcher = state.resolve()
            if matcher is None:
                bitmask[i] = self.eos_only  # a grammar that failed to compile: end the row
            else:
                matchers.append((matcher, i))
        if matchers:
            llguidance.torch.fill_next_token_bitmask_par(self.executor, matchers, bitmask)
        forbidden = self.forbidden(bitmask)  # [n, V] bool
        if len(rows) == logits.shape[0]:
            logits.masked_fill_(forbidden, _NEG_INF)
            return
        index = torch.tensor(rows, dtype=torch.int64, device=logits.device)  # [n]
        logits[index] = logits[index].masked_fill_(forbidden, _NEG_INF)  # [n, V]

    def forbidden(self, bitmask: torch.Tensor) -> torch.Tensor:
        """[n, W] int32 words → [n, V] bool on the device, True where the token is not allowed."""
        if self.device.type != "cpu":
            words = bitmask.to(self.device, non_blocking=True)  # pinned host memory
            return unpack_bits(words, self.shifts, self.vocab_size).logical_not_()
        # numpy's unpackbits is ~10x faster than the shift-and-mask below on CPU.
        # int32 words read as little-endian bytes: byte k of word i holds tokens 32i+8k...+7.
        inverted = np.invert(bitmask.numpy()).view(np.uint8)  # [n, 4W]
        bits = np.unpackbits(inverted, axis=1, count=self.vocab_size, bitorder="little")  # [n, V]
        return torch.from_numpy(bits).view(torch.bool)


def unpack_bits(words: torch.Tensor, shifts: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, W] int32 → [n, V] bool, token t allowed when bit t % 32 of word t // 32 is set."""
    num_rows, num_words = words.shape
    bits = (words.unsqueeze(-1) >> shifts) & 1  # [n, W, 32]
    return bits.view(num_rows, num_words * 32)[:, :vocab_size].bool()  # [n, V]


def _to_int32(value: int) -> int:
    """An unsigned 32-bit word as the signed value an int32 tensor stores."""
    return value - (1 << 32) if value >= 1 << 31 else value

"""The engine core's structured-output state: grammar compilation and per-step masking."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvflow.sampling_params import StructuredOutputsParams
from kvflow.structured.grammar import GrammarCompiler
from kvflow.structured.matcher import GrammarBitmask, GrammarState
from kvflow.structured.options import StructuredOutputsConfig

if TYPE_CHECKING:
    from kvflow.core.request import Request


class StructuredOutputManager:
    """Compiles grammars off the step loop and masks the logits of structured rows.

    Created by the core when its first structured request arrives. Grammars compile in one
    worker thread (llguidance releases the GIL), so a new grammar never stalls a step: the
    request prefills meanwhile and its first sampling step waits only if compiling is slower
    than the prefill. `live` holds the ids of unfinished structured requests; while it is
    empty the core does not call in here at all.
    """

    def __init__(self, tokenizer_path: Path, vocab_size: int, eos_token_ids: Sequence[int],
                 max_num_seqs: int, device: torch.device,
                 config: StructuredOutputsConfig | None = None) -> None:
        self.config = config or StructuredOutputsConfig()
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.max_num_seqs = max_num_seqs
        self.device = device
        self.live: set[str] = set()
        self._compiler: GrammarCompiler | None = None  # built in the worker thread
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvflow-grammar")
        self._bitmask: GrammarBitmask | None = None

    def add_request(self, request_id: str, params: StructuredOutputsParams) -> GrammarState:
        """Start compiling (or fetch from cache) the request's grammar; returns its state."""
        future: Future[Any] = self._pool.submit(self._compile, params)
        self.live.add(request_id)
        return GrammarState(request_id, future)

    def _compile(self, params: StructuredOutputsParams) -> Any:
        if self._compiler is None:
            from transformers import AutoTokenizer

            hf_tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_path))
            self._compiler = GrammarCompiler(hf_tokenizer, self.vocab_size, config=self.config)
        return self._compiler.compile(params)

    @property
    def compiler(self) -> GrammarCompiler | None:
        return self._compiler

    def finish_requests(self, request_ids: Iterable[str]) -> None:
        self.live.difference_update(request_ids)

    def mask_logits(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
        """Mask the structured rows of `logits` ([B, V], in place); returns those rows."""
        rows = [i for i, r in enumerate(requests) if r.grammar is not None]
        if not rows:
            return rows
        if self._bitmask is None:
            self._bitmask = GrammarBitmask(self.vocab_size, self.eos_token_ids,
                                           self.max_num_seqs, self.device)
        states = [requests[i].grammar for i in rows]
        self._bitmask.apply(logits, rows, states)  # type: ignore[arg-type]
        return rows

    def accept_tokens(self, requests: Sequence[Request], rows: Sequence[int],
                      sampled: Sequence[int]) -> None:
        """Advance each structured row's matcher past the token sampled for it."""
        for i in rows:
            grammar = requests[i].grammar
            assert grammar is not None
            grammar.accept_token(sampled[i])

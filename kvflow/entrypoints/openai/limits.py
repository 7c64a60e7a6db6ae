"""What one client may ask of the server: every size a request controls, bounded before work.

Each limit is a `kvflow serve` flag (generated from the fields below, like the engine's).
The defaults let any ordinary OpenAI or vLLM client through and stop the requests that would
take the server down: a huge `n`, a million stop strings, a 20 MB prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def _limit(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerLimits:
    """Per-request bounds of the OpenAI-compatible server (one table in the README)."""

    max_request_body_mb: float = _limit(16.0, "largest request body in MiB (413 above)")
    request_read_timeout_s: float = _limit(
        30.0, "seconds a client may take to send a request's headers, and then its body "
        "(408 after)")
    max_n: int = _limit(128, "largest n and best_of (OpenAI's bound)")
    max_prompts_per_request: int = _limit(256, "most prompts in one /v1/completions request")
    max_stop_sequences: int = _limit(64, "most stop strings in one request")
    max_stop_chars: int = _limit(1024, "longest stop string or bad word, in characters")
    max_bad_words: int = _limit(1024, "most bad_words in one request")
    max_bad_words_chars: int = _limit(
        262144, "bad_words' characters times the sequences (prompts x n) they apply to")
    max_token_id_list: int = _limit(
        1024, "most entries in stop_token_ids or logit_bias (allowed_token_ids: the vocabulary)")
    max_waiting_requests: int | None = _limit(
        None, "most requests waiting for a batch slot; past it new requests get 503 with "
        "Retry-After (default: the number of KV-cache blocks, at least max_num_seqs)")
    trust_request_chat_template: bool = _limit(
        False, "let requests bring their own Jinja chat template (rendered in a sandbox)")
    chat_template_timeout_s: float = _limit(
        1.5, "longest a chat template may take to render (400 after)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_request_body_mb * 1024 * 1024)

    def waiting_bound(self, max_num_seqs: int, num_kv_blocks: int) -> int:
        """Requests past the running batch that may wait: each will need at least a block."""
        if self.max_waiting_requests is not None:
            return self.max_waiting_requests
        return max(max_num_seqs, num_kv_blocks)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("request limits")
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if isinstance(f.default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction,
                                   default=f.default, help=f.metadata["help"])
                continue
            kind = float if isinstance(f.default, float) else int
            group.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerLimits:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def markdown_table(cls) -> str:
        """The README's table of limits, from the same fields (one source of truth)."""
        rows = ["| flag | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            rows.append(f"| `{flag}` | {f.default} | {f.metadata['help']} |")
        return "\n".join(rows)

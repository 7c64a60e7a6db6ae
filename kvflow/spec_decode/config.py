"""`speculative_config`, vLLM's forms: parsed once, validated, frozen."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = ("ngram", "draft_model")
# Most tokens proposed per step: past this a verify step reads more activations than
# weights on a CPU and the last positions are rarely accepted.
MAX_SPECULATIVE_TOKENS = 16
_FIELDS = {"method", "model", "num_speculative_tokens", "prompt_lookup_min",
           "prompt_lookup_max", "disable_by_batch_size", "min_acceptance_rate", "quantization"}
# Above this many running requests nobody speculates (disable_by_batch_size's default): a
# step of that many decodes is no longer bound by reading the weights on this CPU, so
# verifying extra tokens costs about what they save (benchmarks/speculative.py measures it).
DEFAULT_DISABLE_BY_BATCH_SIZE = 8
# A draft model runs k forwards of its own over every request it proposes for, so its
# proposals stop paying sooner: at 5-8 requests the default model's int8 copy proposing for
# itself made steps ~7% slower a token than plain ones (BENCHMARKS.md, speculative decoding).
DRAFT_DISABLE_BY_BATCH_SIZE = 4
# A request whose proposals are accepted less often than this (a moving average) mostly
# probes instead of proposing every step.
DEFAULT_MIN_ACCEPTANCE_RATE = 0.2


@dataclass(frozen=True)
class SpeculativeConfig:
    """How proposals are made and how many tokens each step may verify."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 0  # ngram: shortest suffix looked up
    prompt_lookup_max: int = 0  # ngram: longest suffix looked up
    model: Path | None = None  # draft_model: its folder
    quantization: str | None = None  # draft_model: "int8" (weight-only, per channel)
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE
    min_acceptance_rate: float = DEFAULT_MIN_ACCEPTANCE_RATE

    @classmethod
    def parse(cls, value: dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """From a dict or its JSON text (`--speculative-config`); None stays off."""
        if value is None or value == "":
            return None
        raw: Any = value
        if isinstance(value, str):
            try:
                raw = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config must be JSON, got {value!r} ({exc})"
                                 ) from None
        if not isinstance(raw, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {raw!r}")
        unknown = set(raw) - _FIELDS
        if unknown:
            raise ValueError(f"speculative_config: unknown fields {sorted(unknown)} "
                             f"(known: {sorted(_FIELDS)})")
        method = raw.get("method")
        if method not in METHODS:
            raise ValueError(f"speculative_config: method must be one of {list(METHODS)}, "
                             f"got {method!r}")
        k = _int(raw, "num_speculative_tokens", None, 1, MAX_SPECULATIVE_TOKENS)
        batch = _int(raw, "disable_by_batch_size", DEFAULT_DISABLE_BY_BATCH_SIZE
                     if method == "ngram" else DRAFT_DISABLE_BY_BATCH_SIZE, 1, None)
        rate = _rate(raw.get("min_acceptance_rate", DEFAULT_MIN_ACCEPTANCE_RATE))
        if method == "ngram":
            if "model" in raw or "quantization" in raw:
                raise ValueError("speculative_config: ngram takes no 'model' or 'quantization'")
            low, high = _window(raw)
            return cls("ngram", k, low, high, disable_by_batch_size=batch,
                       min_acceptance_rate=rate)
        model = raw.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError("speculative_config: draft_model needs 'model' (a folder)")
        quantization = raw.get("quantization")
        if quantization not in (None, "int8"):
            raise ValueError(f"speculative_config: quantization must be 'int8' or null, "
                             f"got {quantization!r}")
        return cls("draft_model", k, model=Path(model), quantization=quantization,
                   disable_by_batch_size=batch, min_acceptance_rate=rate)


def _int(raw: dict[str, Any], name: str, default: int | None, low: int,
         high: int | None) -> int:
    value = raw.get(name, default)
    if value is None:
        raise ValueError(f"speculative_config: '{name}' is required")
    if not isinstance(value, int) or isinstance(value, bool) or value < low \
            or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"speculative_config: {name} must be an integer {span}, got {value!r}")
    return value


def _rate(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError(f"speculative_config: min_acceptance_rate must be in [0, 1], "
                         f"got {value!r}")
    return float(value)


def _window(raw: dict[str, Any]) -> tuple[int, int]:
    """vLLM's defaults: both omitted means 5 and 5; max alone sets min = max; min alone is
    an error."""
    if "prompt_lookup_min" in raw and "prompt_lookup_max" not in raw:
        raise ValueError("speculative_config: prompt_lookup_min given without prompt_lookup_max")
    high = _int(raw, "prompt_lookup_max", 5, 1, None)
    low = _int(raw, "prompt_lookup_min", high if "prompt_lookup_max" in raw else 5, 1, None)
    if low > high:
        raise ValueError(f"speculative_config: prompt_lookup_min {low} exceeds "
                         f"prompt_lookup_max {high}")
    return low, high


def check_draft_model(config: SpeculativeConfig, target: Any) -> SpeculativeConfig:
    """The draft model resolved to its folder, refused unless it shares the target's
    vocabulary and tokenizer (a draft with other token ids proposes garbage that is never
    accepted, or worse, ids the target's embedding table lacks). `target`: ModelConfig."""
    from kvflow.model.llava import text_config_of
    from kvflow.model.loader import load_hf_config
    from kvflow.model.registry import resolve_model

    assert config.model is not None
    try:
        path = resolve_model(str(config.model))
    except (OSError, ValueError) as exc:
        raise ValueError(f"speculative_config: draft model {str(config.model)!r}: {exc}"
                         ) from None
    vocab_size = int(text_config_of(load_hf_config(path)).vocab_size)
    if vocab_size != target.vocab_size:
        raise ValueError(f"speculative_config: the draft model's vocabulary ({vocab_size} "
                         f"tokens) differs from the target's ({target.vocab_size})")
    if _tokenizer_vocab(path) != _tokenizer_vocab(Path(target.tokenizer_path)):
        raise ValueError("speculative_config: the draft model's tokenizer differs from the "
                         "target's (they must map text to the same token ids)")
    return SpeculativeConfig(config.method, config.num_speculative_tokens, model=path,
                             quantization=config.quantization,
                             disable_by_batch_size=config.disable_by_batch_size,
                             min_acceptance_rate=config.min_acceptance_rate)


def _tokenizer_vocab(folder: Path) -> dict[str, int]:
    file = folder / "tokenizer.json"
    if not file.exists():
        raise ValueError(f"speculative_config: {folder} has no tokenizer.json to compare")
    model = json.loads(file.read_text()).get("model", {})
    vocab = model.get("vocab", {})
    return vocab if isinstance(vocab, dict) else {str(v): i for i, v in enumerate(vocab)}

"""speculative_config: vLLM's forms parsed, every misconfiguration a clear ValueError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvflow.config import EngineArgs
from kvflow.spec_decode.config import SpeculativeConfig


def test_ngram_forms_and_defaults() -> None:
    full = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2,
            "prompt_lookup_max": 4}
    config = SpeculativeConfig.parse(json.dumps(full))
    assert config == SpeculativeConfig.parse(full)
    assert config is not None and (config.prompt_lookup_min, config.prompt_lookup_max) == (2, 4)
    both = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2})
    assert both is not None and (both.prompt_lookup_min, both.prompt_lookup_max) == (5, 5)
    assert both.disable_by_batch_size == 8  # lookups cost nothing: only the verify rows
    high = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2,
                                    "prompt_lookup_max": 3})
    assert high is not None and high.prompt_lookup_min == 3
    assert SpeculativeConfig.parse(None) is None
    with pytest.raises(AttributeError):
        config.method = "x"  # type: ignore[misc]


@pytest.mark.parametrize("value, words", [
    ("{not json", "must be JSON"),
    ("[1]", "JSON object"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of"),
    ({"method": "ngram"}, "'num_speculative_tokens' is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "in [1, 16]"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "in [1, 16]"),
    ({"method": "ngram", "num_speculative_tokens": True}, "in [1, 16]"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2},
     "without prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 3}, "exceeds"),
    ({"method": "ngram", "num_speculative_tokens": 2, "speculative_model": "x"}, "unknown"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "min_acceptance_rate": 2}, "[0, 1]"),
])
def test_invalid_configs(value: object, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(")):
        SpeculativeConfig.parse(value)  # type: ignore[arg-type]


def test_engine_args_and_draft_checks(tiny_llama_path: Path, tiny_qwen2_path: Path,
                                      tmp_path: Path) -> None:
    args = EngineArgs(model=str(tiny_llama_path), speculative_config=json.dumps(
        {"method": "draft_model", "model": str(tiny_qwen2_path), "num_speculative_tokens": 3}))
    config = args.create_engine_config().speculative_config
    assert config is not None and config.model == tiny_qwen2_path
    assert config.disable_by_batch_size == 4  # a draft's own forwards: it stops paying sooner
    wide = SpeculativeConfig.parse({"method": "draft_model", "model": "m",
                                    "num_speculative_tokens": 3, "disable_by_batch_size": 16})
    assert wide is not None and wide.disable_by_batch_size == 16
    other_vocab = tmp_path / "vocab"
    shutil.copytree(tiny_qwen2_path, other_vocab)
    hf = json.loads((other_vocab / "config.json").read_text())
    (other_vocab / "config.json").write_text(json.dumps({**hf, "vocab_size": 50000}))
    other_tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tiny_qwen2_path, other_tokenizer)
    tok = json.loads((other_tokenizer / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = list(vocab)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other_tokenizer / "tokenizer.json").write_text(json.dumps(tok))
    for folder, words in ((other_vocab, "vocabulary"), (other_tokenizer, "tokenizer differs"),
                          (tmp_path / "missing", "draft model")):
        spec = {"method": "draft_model", "model": str(folder), "num_speculative_tokens": 2}
        with pytest.raises(ValueError, match=words):
            EngineArgs(model=str(tiny_llama_path),
                       speculative_config=spec).create_engine_config()

"""Shared fixtures: the packaged default model, tiny random models, leak checks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from kvflow.model.registry import resolve_model

    return resolve_model(None)


def _save_tiny(folder: Path, config: object, tokenizer_src: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    for name in os.listdir(tokenizer_src):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(tokenizer_src / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1,
        architectures=["LlamaForCausalLM"],
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), config, default_model_path)


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Path:
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=1000000.0, tie_word_embeddings=False, eos_token_id=2,
        architectures=["Qwen2ForCausalLM"],
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), config, default_model_path)

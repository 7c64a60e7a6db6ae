"""Shared fixtures: the packaged default model, tiny random models, leak checks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels run in its CPU interpreter: it must be on before any kernel is
# defined (kvflow.model.triton_kernels is imported on first use), so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _enforce_eager_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """KVFLOW_TEST_ENFORCE_EAGER=1 runs every engine without CUDA graphs (the GPU check runs
    the gpu tests both ways)."""
    if os.environ.get("KVFLOW_TEST_ENFORCE_EAGER") != "1":
        return
    from kvflow.config import EngineArgs

    build = EngineArgs.create_engine_config

    def eager(self: EngineArgs) -> object:
        self.enforce_eager = True
        return build(self)

    monkeypatch.setattr(EngineArgs, "create_engine_config", eager)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from kvflow.model.registry import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    """Tokenizer files for the tiny models: the default model's, or KVFLOW_TEST_TOKENIZER_DIR.

    The override lets the GPU tests run on a machine the packaged model cannot reach.
    """
    override = os.environ.get("KVFLOW_TEST_TOKENIZER_DIR")
    if override:
        return Path(override)
    return request.getfixturevalue("default_model_path")


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
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1,
        architectures=["LlamaForCausalLM"],
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), config, tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=1000000.0, tie_word_embeddings=False, eos_token_id=2,
        architectures=["Qwen2ForCausalLM"],
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), config, tokenizer_dir)

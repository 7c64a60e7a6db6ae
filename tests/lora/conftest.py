"""Adapters over the tiny random models (session-scoped: peft writes each once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lora.adapters import ALL_TARGETS, make_adapter


@pytest.fixture(scope="session")
def llama_adapters(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> dict[str, Path]:
    """Five adapters of several ranks and target sets over the tiny Llama."""
    root = tmp_path_factory.mktemp("llama-adapters")
    specs = {
        "qv8": (8, ("q_proj", "v_proj"), {}),
        "all4": (4, ALL_TARGETS, {}),
        "mlp16": (16, ("gate_proj", "up_proj", "down_proj"), {}),
        "ko2": (2, ("k_proj", "o_proj"), {}),
        "rs8": (8, ALL_TARGETS, {"use_rslora": True}),
    }
    return {name: make_adapter(tiny_llama_path, root / name, rank, targets, seed=i, **extra)
            for i, (name, (rank, targets, extra)) in enumerate(specs.items())}


@pytest.fixture(scope="session")
def qwen2_adapters(tiny_qwen2_path: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen2-adapters")
    specs = {"all8": (8, ALL_TARGETS), "qkv4": (4, ("q_proj", "k_proj", "v_proj")),
             "down16": (16, ("down_proj", "o_proj"))}
    return {name: make_adapter(tiny_qwen2_path, root / name, rank, targets, seed=10 + i)
            for i, (name, (rank, targets)) in enumerate(specs.items())}

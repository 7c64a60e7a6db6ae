"""Tiny random checkpoints written by transformers, and a helper to run our model on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from kvflow.model.attention import build_attention_metadata, kv_cache_shape
from kvflow.model.llama import LlamaForCausalLM

TINY: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


def tiny_config(model_type: str, architecture: str, **overrides: Any) -> PretrainedConfig:
    """A TINY config of the given transformers model type, with `architectures` set."""
    config = AutoConfig.for_model(model_type, **(TINY | overrides))
    config.architectures = [architecture]
    return config


def save_tiny(folder: Path, config: PretrainedConfig, seed: int) -> Path:
    """Random weights for `config`, written by transformers' save_pretrained."""
    torch.manual_seed(seed)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(config)
    # Random init leaves norms at 1 and biases at 0; perturb them so loading mistakes show.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config("llama", "LlamaForCausalLM", rope_theta=1e4, tie_word_embeddings=False)
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), config, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config("qwen2", "Qwen2ForCausalLM", rope_theta=1e6, tie_word_embeddings=False)
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), config, seed=1)


def hf_logits(folder: Path, token_ids: list[int], **kwargs: object) -> torch.Tensor:
    """Reference logits [T, vocab] from transformers in float32."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def new_kv_caches(model: LlamaForCausalLM, num_blocks: int, block_size: int) -> list[torch.Tensor]:
    shape = kv_cache_shape(num_blocks, block_size, model.num_kv_heads, model.head_dim)
    dtype = next(model.parameters()).dtype
    # NaN-filled so reading a slot nobody wrote poisons the result instead of hiding.
    return [torch.full(shape, float("nan"), dtype=dtype) for _ in range(model.num_layers)]


def run_full_prompt(
    model: LlamaForCausalLM, token_ids: list[int], block_size: int = 4
) -> torch.Tensor:
    """Our logits [T, vocab] for every position of one prompt processed in a single prefill."""
    num_blocks = -(-len(token_ids) // block_size)
    caches = new_kv_caches(model, num_blocks, block_size)
    metadata = build_attention_metadata(
        [len(token_ids)],
        [len(token_ids)],
        [list(range(num_blocks))],
        block_size,
        torch.device("cpu"),
    )
    with torch.inference_mode():
        hidden = model(
            torch.tensor(token_ids), torch.arange(len(token_ids)), caches, metadata
        )  # [T, hidden]
        return model.compute_logits(hidden)

"""Tiny random checkpoints written by transformers, and a helper to run our model on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from kvflow.model.attention import build_attention_metadata, kv_cache_shape
from kvflow.model.layers import rope_parameters
from kvflow.model.llama import LlamaForCausalLM
from kvflow.model.loader import hf_tensor_name

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
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
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


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama q/k rows."""
    shape = weight.shape
    halves = weight.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:])
    return halves.swapaxes(1, 2).reshape(shape)


def _gguf_tokenizer(writer: gguf.GGUFWriter, architecture: str) -> None:
    """A 256-token byte-level BPE vocabulary with ChatML specials, as llama.cpp writes one."""
    chars = list(bytes_to_unicode().values())[:250]
    tokens = [*chars, "he", "\u0120t", "th", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if architecture == "qwen2" else "smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 253 + [3] * 3)
    writer.add_token_scores([0.0] * 256)
    writer.add_token_merges(["h e", "\u0120 t", "t h"])
    writer.add_bos_token_id(253)
    writer.add_eos_token_id(255)
    writer.add_chat_template(CHATML)


def write_tiny_gguf(path: Path, architecture: str, hf_dir: Path) -> None:
    """Re-encode a tiny HF checkpoint as llama.cpp would (float32, Llama q/k permuted)."""
    config = AutoConfig.from_pretrained(hf_dir)
    weights = load_file(hf_dir / "model.safetensors")
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_parameters(config)[0])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    _gguf_tokenizer(writer, architecture)
    blocks = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"]
    blocks += ["ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    bases = ["token_embd", "output_norm", "output"]
    bases += [f"blk.{i}.{b}" for i in range(config.num_hidden_layers) for b in blocks]
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for name in (f"{base}.{suffix}" for base in bases for suffix in ("weight", "bias")):
        hf_name = hf_tensor_name(name)
        if hf_name not in weights:
            continue
        tensor = weights[hf_name]
        kind = name.split(".")[-2]
        if architecture == "llama" and kind in heads:
            tensor = llama_cpp_permute(tensor, heads[kind])
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

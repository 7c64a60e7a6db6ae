"""Write a random-weights Hugging Face model folder in a known model's shape.

For benchmarks on a machine that cannot reach the checkpoints (the lent GPU machine): speed
depends on the shape, not on the weights' values. The tokenizer files are copied from
--tokenizer (the default model's, for instance), whose ids all fit either vocabulary.

    python benchmarks/random_model.py --shape qwen2-0.5b --tokenizer DIR --out DIR
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import torch

# Shapes of the published checkpoints (config.json of each), random weights in bf16.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2-135m": ("LlamaForCausalLM", dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True)),
    "qwen2-0.5b": ("Qwen2ForCausalLM", dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False)),
}


def write(shape: str, tokenizer: Path, out: Path, seed: int = 0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    architecture, fields = SHAPES[shape]
    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, eos_token_id=2,
                                  bos_token_id=1, architectures=[architecture])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in tokenizer.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens", "vocab", "merges",
                                 "chat_template")):
            shutil.copy(name, out / name.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", required=True, choices=list(SHAPES))
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    print(f"random_model: {args.shape} -> {write(args.shape, args.tokenizer, args.out)}")


if __name__ == "__main__":
    main()

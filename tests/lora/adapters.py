"""PEFT adapters for the LoRA tests, written by peft itself over a base model folder."""

from __future__ import annotations

from pathlib import Path

import torch

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(base: Path, folder: Path, rank: int, targets: tuple[str, ...] | list[str],
                 seed: int, alpha: float | None = None, use_rslora: bool = False,
                 std: float = 0.3, **config: object) -> Path:
    """A random LoRA adapter (B non-zero, so it changes outputs) saved by peft's
    save_pretrained: adapter_config.json + adapter_model.safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                      target_modules=list(targets), init_lora_weights=False,
                      use_rslora=use_rslora, **config)  # type: ignore[arg-type]
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(folder)
    return folder


def hf_greedy(base: Path, adapter: Path | None, prompt_ids: list[int],
              max_tokens: int) -> list[int]:
    """Greedy tokens from transformers, with the adapter loaded by peft (None: base model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()

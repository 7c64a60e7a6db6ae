"""The project's own LoRA adapter for the default model: answer every question as JSON.

    python -m kvflow.lora.example     # trains once (a few minutes on a CPU), prints the folder

It teaches SmolLM2-135M-Instruct to reply `{"answer": "<one sentence>"}` to any chat message,
from 160 project-made examples (kvflow/lora/example_data.py) through the model's own
chat template, with the loss on the answer tokens only. Training uses transformers and peft at
set-up time (the engine never imports either) and saves with peft's save_pretrained into
`<cache>/adapters/smollm2-json-v<RECIPE_VERSION>/`: trained in a temporary folder and renamed
into place, so a crash or a concurrent run never leaves a half-written adapter. Changing the
recipe or its data retrains: the folder's marker records both (RECIPE, the data's digest), and
RECIPE_VERSION names the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvflow.lora.example_data import make_examples
from kvflow.model.registry import DEFAULT_MODEL, cache_dir, replace_dir, resolve_model

ADAPTER_NAME = "smollm2-json"
RECIPE_VERSION = 1
MARKER = "kvflow-adapter.json"
RECIPE: dict[str, Any] = {
    "version": RECIPE_VERSION, "base_model": DEFAULT_MODEL, "examples": 160, "seed": 0,
    "rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj",
                                        "gate_proj", "up_proj", "down_proj"],
    "epochs": 1, "batch_size": 8, "lr": 3e-3, "warmup_steps": 4,
}


def adapter_dir() -> Path:
    """Where the adapter lives (it may not be trained yet)."""
    return cache_dir() / "adapters" / f"{ADAPTER_NAME}-v{RECIPE_VERSION}"


def is_trained(folder: Path) -> bool:
    """True when folder holds a complete adapter made by this recipe."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("recipe") == recipe_key()


def recipe_key() -> dict[str, Any]:
    """What a trained adapter must have been made from: the recipe and its data's digest."""
    data = json.dumps(make_examples(RECIPE["examples"], RECIPE["seed"]), ensure_ascii=False)
    return {**RECIPE, "data_sha256": hashlib.sha256(data.encode()).hexdigest()}


def example_adapter() -> Path:
    """The adapter's folder, trained first if it is missing or from an older recipe."""
    target = adapter_dir()
    if is_trained(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        stats = train(staging)
        marker = {"recipe": recipe_key(), "stats": stats}
        (staging / MARKER).write_text(json.dumps(marker, indent=2))
        if not is_trained(target):  # else a concurrent run finished first
            replace_dir(staging, target, is_trained)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def train(folder: Path) -> dict[str, float]:
    """Train the adapter with peft on the CPU and save_pretrained it into folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    torch.manual_seed(RECIPE["seed"])
    torch.set_num_threads(os.cpu_count() or 1)
    base = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=RECIPE["rank"], lora_alpha=RECIPE["alpha"], lora_dropout=0.0,
                        target_modules=RECIPE["targets"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    examples = [encode_example(tokenizer, messages, answer)
                for messages, answer in make_examples(RECIPE["examples"], RECIPE["seed"])]
    losses = _optimize(peft_model, examples, tokenizer.pad_token_id)
    peft_model.save_pretrained(str(folder))
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "first_loss": losses[0], "last_loss": losses[-1]}


def encode_example(tokenizer: Any, messages: list[dict[str, str]],
                   answer: str) -> tuple[list[int], list[int]]:
    """(input ids, labels): the prompt as the engine tokenizes it, then the answer and
    <|im_end|>; labels are -100 on the prompt so the loss covers the answer only."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def _optimize(model: Any, examples: list[tuple[list[int], list[int]]],
              pad_id: int) -> list[float]:
    """AdamW over the LoRA weights, linear warm-up then linear decay; the loss per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=RECIPE["lr"], weight_decay=0.0)
    size, warmup = RECIPE["batch_size"], RECIPE["warmup_steps"]
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    order = [i for _ in range(RECIPE["epochs"])
             for i in torch.randperm(len(examples), generator=generator).tolist()]
    steps = len(order) // size
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, (steps - s) / max(1, steps - warmup)))
    model.train()
    losses = []
    for step in range(steps):
        ids, labels, mask = _batch([examples[i] for i in order[step * size:(step + 1) * size]],
                                   pad_id)
        loss = _answer_loss(model, ids, labels, mask)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        print(f"step {step + 1}/{steps} loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    return losses


def _answer_loss(model: Any, ids: torch.Tensor, labels: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens; the LM head runs only where a label is, as
    most positions are prompt (the head is a fifth of the model's work)."""
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = targets != -100  # [batch, seq - 1]
    logits = causal_lm.lm_head(hidden[:, :-1][keep])  # [num_answer_tokens, vocab]
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def _batch(examples: list[tuple[list[int], list[int]]],
           pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, labels (-100 on padding) and attention mask, [batch, longest]."""
    longest = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), longest), pad_id)
    labels = torch.full((len(examples), longest), -100)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, (example_ids, example_labels) in enumerate(examples):
        ids[row, :len(example_ids)] = torch.tensor(example_ids)
        labels[row, :len(example_labels)] = torch.tensor(example_labels)
        mask[row, :len(example_ids)] = 1
    return ids, labels, mask




def main() -> None:
    start = time.perf_counter()
    trained = not is_trained(adapter_dir())
    folder = example_adapter()
    if trained:
        print(f"trained the example adapter in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    print(folder)


if __name__ == "__main__":
    main()

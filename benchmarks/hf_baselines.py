"""Hugging Face transformers baselines: static batches, continuous batching, one stream.

Greedy, EOS ignored, so every engine produces the same number of tokens. float32 on the
CPU unless a caller names another device and dtype.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

Work = list[tuple[list[int], int]]  # (prompt token ids, output tokens)


def load(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def static_batches(path: Path, work: Work, batch_size: int, device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> float:
    """Useful output tokens/s of `generate` over padded batches in arrival order.

    A batch runs until its longest request is done; tokens a request generates past its
    own length are waste and not counted.
    """
    model = load(path, device, dtype)
    pad = 0
    t0 = time.perf_counter()
    useful = 0
    with torch.inference_mode():
        for b in range(0, len(work), batch_size):
            batch = work[b:b + batch_size]
            longest = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([[pad] * (longest - len(p)) + p for p, _ in batch])
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p, _ in batch])
            max_new = max(n for _, n in batch)
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                           min_new_tokens=max_new, do_sample=False, pad_token_id=pad)
            useful += sum(n for _, n in batch)
    _sync(device)
    return useful / (time.perf_counter() - t0)


def continuous_batching(path: Path, work: Work, device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> float:
    """Output tokens/s of transformers' continuous batching manager (`generate_batch`'s engine).

    Each request gets its own max_new_tokens (generate_batch itself takes one for all).
    """
    from transformers import GenerationConfig

    model = load(path, device, dtype)
    config = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in work),
                              eos_token_id=-1, pad_token_id=0)
    with model.continuous_batching_context_manager(generation_config=config, block=True,
                                                   timeout=10) as manager:
        t0 = time.perf_counter()
        for i, (ids, n) in enumerate(work):
            manager.add_request(ids, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        produced, finished = 0, 0
        while finished < len(work):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped")
                continue
            if result.is_finished():
                finished += 1
                produced += len(result.generated_tokens)
        elapsed = time.perf_counter() - t0
    expected = sum(n for _, n in work)
    if produced != expected:
        raise RuntimeError(f"transformers CB produced {produced} tokens, expected {expected}")
    return produced / elapsed


class SingleStream:
    """One request at a time through `generate`, timed per phase."""

    def __init__(self, path: Path) -> None:
        self.model = load(path)

    def ttft(self, prompt: list[int]) -> float:
        """Seconds to the first generated token (the prefill plus one sampling)."""
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                do_sample=False, pad_token_id=0)
            return time.perf_counter() - t0

    def decode_tok_s(self, prompt: list[int], tokens: int) -> float:
        """Tokens/s of decoding after the first token (the TTFT subtracted)."""
        ids = torch.tensor([prompt])
        first = min(self.ttft(prompt) for _ in range(2))
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                min_new_tokens=tokens, do_sample=False, pad_token_id=0)
            elapsed = time.perf_counter() - t0
        return (tokens - 1) / (elapsed - first)

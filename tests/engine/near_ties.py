"""Greedy parity in bfloat16: token for token with transformers' bf16 `generate`, except
where transformers' own logits nearly tie (bf16 rounding then decides which token wins)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

# Transformers' top logit and the token we chose may differ by this many bf16 rounding
# steps (of the top logit's magnitude) for a divergence to count as a near-tie.
NEAR_TIE_STEPS = 2


def bf16_step(value: float) -> float:
    """The spacing of bfloat16 numbers (8 significant bits) around `value`."""
    return 2.0 ** (math.floor(math.log2(abs(value))) - 7) if value else 2.0 ** -133


def hf_greedy_with_scores(model: torch.nn.Module, prompts: list[list[int]], max_new: int,
                          ignore_eos: bool = False
                          ) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Greedy tokens of a transformers model and its logits [vocab] at every new token."""
    results = []
    until_eos = {"min_new_tokens": max_new, "eos_token_id": None} if ignore_eos else {}
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=0, **until_eos)
            tokens = out.sequences[0, len(ids):].tolist()
            results.append((tokens, [step[0].float() for step in out.scores]))
    return results


def hf_bf16_reference(path: Path, prompts: list[list[int]], max_new: int,
                      adapter: Path | None = None, ignore_eos: bool = False
                      ) -> list[tuple[list[int], list[torch.Tensor]]]:
    """transformers' bf16 greedy tokens and logits (with a peft adapter when given)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return hf_greedy_with_scores(model.eval(), prompts, max_new, ignore_eos)


def assert_matches_up_to_near_ties(ours: list[list[int]],
                                   reference: list[tuple[list[int], list[torch.Tensor]]],
                                   min_matched: float = 0.5) -> None:
    """Each sequence equals the reference up to its first difference, which must be a
    near-tie of the reference's logits; and at least `min_matched` of all tokens match
    (so that ties cannot excuse a wrong model)."""
    matched = total = 0
    for index, (mine, (theirs, scores)) in enumerate(zip(ours, reference, strict=True)):
        total += len(theirs)
        pairs = enumerate(zip(mine, theirs, strict=False))  # a shorter one ends early
        diverged = next((i for i, (a, b) in pairs if a != b), None)
        if diverged is None:
            assert len(mine) == len(theirs), f"sequence {index}: lengths differ"
            matched += len(theirs)
            continue
        step = scores[diverged]
        top = step.max().item()
        gap = top - step[mine[diverged]].item()
        assert gap <= NEAR_TIE_STEPS * bf16_step(top), (
            f"sequence {index} diverges at token {diverged}: ours {mine[diverged]}, "
            f"transformers {theirs[diverged]}, {gap:.4f} below its top logit {top:.4f}")
        matched += diverged
    assert matched >= min_matched * total, f"only {matched} of {total} tokens matched"

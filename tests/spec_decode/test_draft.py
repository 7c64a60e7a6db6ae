"""The draft-model proposer on tiny models sharing one tokenizer: outputs equal plain
decoding's, with a draft that agrees (the target itself) and one that does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.spec_decode.test_engine import accepted, assert_same, greedy, prompts, run


def draft(path: Path, **extra: object) -> dict:
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": 3,
            "disable_by_batch_size": 64, **extra}


def shares_kv(llm: Any) -> bool:
    """Whether the engine's draft attends over the target's K/V."""
    proposer = llm.llm_engine.core.proposer
    assert proposer is not None and proposer.draft is not None
    return bool(proposer.draft.shares_kv)


@pytest.mark.parametrize("engine", [
    {}, pytest.param({"num_kv_blocks": 12, "max_num_batched_tokens": 24},
                     marks=pytest.mark.slow)], ids=["mixed", "preempt-chunked"])
def test_greedy_identical_with_an_agreeing_draft(tiny_llama_path: Path, engine: dict) -> None:
    items = prompts(6, seed=4)
    base, _ = run(tiny_llama_path, None, items, greedy(20), **engine)
    spec, llm = run(tiny_llama_path, draft(tiny_llama_path), items, greedy(20), **engine)
    assert_same(base, spec)
    stats = llm.llm_engine.core.get_stats()
    # the target proposing for itself: nearly every proposal is accepted
    assert stats.spec_num_accepted_tokens >= 0.9 * stats.spec_num_draft_tokens > 0
    # and it attends over the target's K/V: no cache of its own
    assert shares_kv(llm) and llm.llm_engine.core.proposer.draft.kv_caches == []  # type: ignore[union-attr]


@pytest.mark.slow  # three engines, one quantized
def test_greedy_identical_with_another_draft_and_int8(tiny_llama_path: Path,
                                                      tiny_qwen2_path: Path) -> None:
    items = prompts(4, seed=5)
    base, _ = run(tiny_llama_path, None, items, greedy(16, stop=["the"]))
    for spec in (draft(tiny_qwen2_path), draft(tiny_llama_path, quantization="int8")):
        out, llm = run(tiny_llama_path, spec, items, greedy(16, stop=["the"]))
        assert_same(base, out)
        assert llm.llm_engine.core.get_stats().spec_num_drafts > 0
        # another model keeps its own cache; the target's int8 copy shares the target's
        assert shares_kv(llm) == ("quantization" in spec)
    assert accepted(llm) > 0  # the int8 copy agrees with its float32 original often

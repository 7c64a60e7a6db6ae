"""LoRA through AsyncLLM (core in its own process): adapter management, per-request adapters
in concurrent streams, refusals before queueing, removal while running; no leaks."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from kvflow import LLM, LoRARequest, RequestOutputKind, SamplingParams
from kvflow.config import AsyncEngineArgs
from kvflow.engine.async_llm import AsyncLLM
from tests.engine.leaks import assert_core_clean
from tests.engine.test_async_llm import assert_engine_clean

PROMPTS = [[101, 2002, 303, 4004, 55], [7, 8, 9, 10], [300, 301, 302, 303, 304, 305, 306]]


@pytest.fixture(scope="module")
def engine(tiny_llama_path: Path):
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(tiny_llama_path), enable_lora=True, max_loras=2, max_cpu_loras=3,
        max_lora_rank=8,
        kv_cache_memory_gb=0.05, max_model_len=256, disable_log_stats=True))
    yield llm
    llm.shutdown()


@pytest.fixture()
def loras(llama_adapters: dict[str, Path]) -> list[LoRARequest]:
    """Four adapters of rank <= 8 (ids 1-4); the rank-16 one is kept for the refusals."""
    small = [(name, path) for name, path in llama_adapters.items() if name != "mlp16"]
    return [LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(small)]


async def tokens(engine: AsyncLLM, request_id: str, prompt: list[int],
                 lora: LoRARequest | None, max_tokens: int = 8) -> list[int]:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                        output_kind=RequestOutputKind.DELTA)
    out = []
    async for o in engine.generate({"prompt_token_ids": prompt}, sp, request_id,
                                   lora_request=lora):
        out.extend(o.outputs[0].token_ids)
        assert o.lora_request == lora
    return out


async def test_add_list_pin_remove(engine: AsyncLLM, loras: list[LoRARequest]) -> None:
    for lora in loras[:3]:
        assert await engine.add_lora(lora) is True
    assert await engine.list_loras() == {1, 2, 3}
    assert await engine.pin_lora(1)
    await engine.add_lora(loras[3])
    assert await engine.list_loras() == {1, 3, 4}  # 2 was least recently used; 1 pinned
    assert await engine.remove_lora(3) is True
    assert await engine.remove_lora(3) is False
    assert await engine.list_loras() == {1, 4}
    with pytest.raises(ValueError, match="not loaded"):
        await engine.pin_lora(2)
    for lora_id in (1, 4):
        await engine.remove_lora(lora_id)
    assert await engine.list_loras() == set()
    await assert_engine_clean(engine)


async def test_concurrent_streams_match_one_at_a_time(engine: AsyncLLM,
                                                      loras: list[LoRARequest]) -> None:
    choices: list[LoRARequest | None] = [loras[0], loras[1], loras[2], None]
    cases = [(PROMPTS[i % 3], choices[i % 4]) for i in range(12)]
    alone = [await tokens(engine, f"alone{i}", p, lora) for i, (p, lora) in enumerate(cases)]
    together = await asyncio.gather(*(tokens(engine, f"mix{i}", p, lora)
                                      for i, (p, lora) in enumerate(cases)))
    assert together == alone
    assert alone[0] != alone[3]  # the adapter changes the answer
    for lora_id in await engine.list_loras():
        assert await engine.remove_lora(lora_id)
    await assert_engine_clean(engine)


async def test_bad_adapters_are_refused_before_queueing(
        engine: AsyncLLM, loras: list[LoRARequest], llama_adapters: dict[str, Path],
        tmp_path: Path) -> None:
    dora = shutil.copytree(loras[0].lora_path, tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    corrupt = shutil.copytree(loras[0].lora_path, tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    bad = [(LoRARequest("missing", 20, str(tmp_path / "nope")), "No adapter found"),
           (LoRARequest("dora", 21, str(dora)), "DoRA"),
           (LoRARequest("corrupt", 22, str(corrupt)), "corrupt"),
           (LoRARequest("rank16", 23, str(llama_adapters["mlp16"])), "max_lora_rank"),
           (LoRARequest("clash", loras[0].lora_int_id, loras[1].lora_path), "already used")]
    await engine.add_lora(loras[0])
    good = asyncio.create_task(tokens(engine, "good", PROMPTS[0], loras[1], max_tokens=40))
    for lora, reason in bad:
        with pytest.raises(ValueError, match=reason) as info:
            await tokens(engine, f"bad-{lora.lora_name}", PROMPTS[1], lora)
        assert f"'{lora.lora_name}'" in str(info.value)
        with pytest.raises(ValueError, match=reason):
            await engine.add_lora(lora)
    with pytest.raises(ValueError, match="LoRARequest"):
        await tokens(engine, "not-a-request", PROMPTS[1], "sql")  # type: ignore[arg-type]
    assert len(await good) == 40
    assert await engine.list_loras() == {1, 2}
    await engine.remove_lora(1)
    await engine.remove_lora(2)
    await assert_engine_clean(engine)


async def test_remove_while_running(engine: AsyncLLM, loras: list[LoRARequest]) -> None:
    expected = await tokens(engine, "ref", PROMPTS[2], loras[3], max_tokens=30)
    started = asyncio.Event()

    async def stream() -> list[int]:
        sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
        out: list[int] = []
        async for o in engine.generate({"prompt_token_ids": PROMPTS[2]}, sp, "running",
                                       lora_request=loras[3]):
            out.extend(o.outputs[0].token_ids)
            started.set()
        return out

    task = asyncio.create_task(stream())
    await started.wait()
    assert await engine.remove_lora(loras[3].lora_int_id)
    assert await task == expected  # it finishes with the adapter it started with
    assert loras[3].lora_int_id not in await engine.list_loras()
    await assert_engine_clean(engine)


def test_remove_frees_the_slot_and_lora_off_is_refused(
        tiny_llama_path: Path, loras: list[LoRARequest]) -> None:
    llm = LLM(str(tiny_llama_path), enable_lora=True, max_loras=2, num_kv_blocks=64,
              max_model_len=256)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]], params,
                 lora_request=loras[:2], use_tqdm=False)
    core = llm.llm_engine.core
    assert core.runner.lora_slots is not None and core.runner.lora_slots.num_used == 2
    assert llm.remove_lora(loras[0].lora_int_id)
    assert core.runner.lora_slots.num_used == 1 and llm.list_loras() == {2}
    assert_core_clean(core)
    plain = LLM(str(tiny_llama_path), num_kv_blocks=64, max_model_len=256)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        plain.generate([{"prompt_token_ids": PROMPTS[0]}], params, lora_request=loras[0],
                       use_tqdm=False)
    assert_core_clean(plain.llm_engine.core)

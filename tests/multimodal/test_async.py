"""Images through AsyncLLM (core in its own process, pixels over ZMQ): the same tokens as the
offline engine, concurrent requests sharing images, cancellation, n > 1, caller-given image
ids; no leaks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kvflow import RequestOutput, RequestOutputKind, SamplingParams
from kvflow.config import AsyncEngineArgs
from kvflow.engine.async_llm import AsyncLLM
from tests.engine.test_async_llm import assert_engine_clean

PROMPT = "USER: <image>\nWhat is shown?\nASSISTANT:"
TWO = "USER: <image>\n<image>\nCompare.\nASSISTANT:"


@pytest.fixture(scope="module")
def engine(clip_llama_dir: Path):
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(clip_llama_dir), dtype="float32", limit_mm_per_prompt={"image": 2},
        kv_cache_memory_gb=0.05, max_num_batched_tokens=32, block_size=4,
        disable_log_stats=True))
    yield llm
    llm.shutdown()


def greedy(max_tokens: int = 6, n: int = 1) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, n=n, ignore_eos=True,
                          output_kind=RequestOutputKind.FINAL_ONLY)


async def final(engine: AsyncLLM, request_id: str, prompt: Any,
                params: SamplingParams) -> RequestOutput:
    outs = [o async for o in engine.generate(prompt, params, request_id)]
    return outs[-1]


async def test_same_tokens_as_transformers_over_zmq(engine: AsyncLLM, hf_greedy,
                                                    clip_llama_dir: Path,
                                                    images: dict[str, Image.Image]) -> None:
    one, two = images["rgb40x50"], [images["wide64x32"], images["gray17x90"]]
    out1, out2 = await asyncio.gather(
        final(engine, "a1", {"prompt": PROMPT, "multi_modal_data": {"image": one}}, greedy()),
        final(engine, "a2", {"prompt": TWO, "multi_modal_data": {"image": two}}, greedy()))
    assert out1.outputs[0].token_ids == hf_greedy(clip_llama_dir, PROMPT, [one], 6)
    assert out2.outputs[0].token_ids == hf_greedy(clip_llama_dir, TWO, two, 6)
    assert len(out1.prompt_token_ids) > 25  # the placeholders are expanded (25 per image)
    await assert_engine_clean(engine)


async def test_concurrent_repeats_encode_each_image_once(engine: AsyncLLM,
                                                         make_image) -> None:
    before = (await engine.get_scheduler_stats()).mm_images_encoded
    distinct = [make_image(20 + i, 30, seed=100 + i) for i in range(3)]
    prompts = [{"prompt": PROMPT, "multi_modal_data": {"image": make_image(20 + i % 3, 30,
                                                                           seed=100 + i % 3)}}
               for i in range(9)]  # equal images as separate objects: hashed by content
    outs = await asyncio.gather(*(final(engine, f"r{i}", p, greedy())
                                  for i, p in enumerate(prompts)))
    assert (await engine.get_scheduler_stats()).mm_images_encoded - before == len(distinct)
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == outs[i % 3].outputs[0].token_ids
    await assert_engine_clean(engine)


async def test_cancelled_image_stream_leaves_nothing(engine: AsyncLLM, make_image) -> None:
    prompt = {"prompt": TWO, "multi_modal_data": {"image": [make_image(40, 40, seed=7),
                                                            make_image(41, 40, seed=8)]}}
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(prompt, params, "cancel-me"):
            started.set()  # past the image's prefill: cancelled while decoding

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_engine_clean(engine)
    again = await final(engine, "after-cancel", prompt, greedy())
    assert len(again.outputs[0].token_ids) == 6
    await assert_engine_clean(engine)


async def test_n_greater_than_one_shares_the_image(engine: AsyncLLM, make_image) -> None:
    image = make_image(25, 25, seed=11)
    before = (await engine.get_scheduler_stats()).mm_images_encoded
    out = await final(engine, "fan", {"prompt": PROMPT, "multi_modal_data": {"image": image}},
                      greedy(n=3))
    assert len(out.outputs) == 3
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1  # greedy children agree
    assert (await engine.get_scheduler_stats()).mm_images_encoded - before == 1
    await assert_engine_clean(engine)


async def test_caller_image_ids_replace_the_content_hash(engine: AsyncLLM,
                                                         make_image) -> None:
    image = make_image(30, 30, seed=21)
    base = {"prompt": PROMPT, "multi_modal_data": {"image": image}}
    plain = await final(engine, "u0", base, greedy())
    before = (await engine.get_scheduler_stats()).mm_images_encoded
    tagged = {**base, "multi_modal_uuids": {"image": ["photo-21"]}}
    first = await final(engine, "u1", tagged, greedy())
    second = await final(engine, "u2", tagged, greedy())
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == plain.outputs[0].token_ids
    # a new id is a new image to the caches (encoded once), however equal the pixels
    assert (await engine.get_scheduler_stats()).mm_images_encoded - before == 1
    bads: list[object] = [{"image": ["a", "b"]}, {"image": [""]}, ["photo"]]
    for bad in bads:
        with pytest.raises(ValueError, match="multi_modal_uuids"):
            await final(engine, "u-bad", {**base, "multi_modal_uuids": bad}, greedy())
    await assert_engine_clean(engine)


async def test_bad_images_are_refused_before_queueing(engine: AsyncLLM, make_image) -> None:
    image = make_image(30, 30, seed=31)
    cases = [
        ({"prompt": PROMPT + " <image>", "multi_modal_data": {"image": image}}, "placeholders"),
        ({"prompt": TWO, "multi_modal_data": {"image": [image] * 3}}, "limit"),
        ({"prompt": PROMPT, "multi_modal_data": {"image": "cat.png"}}, "PIL image"),
        ({"prompt": "USER: <image>\nno image\nASSISTANT:"}, "no images"),
    ]
    for prompt, words in cases:
        with pytest.raises(ValueError, match=words):
            await final(engine, "bad", prompt, greedy())
    out = await final(engine, "good", {"prompt": PROMPT, "multi_modal_data": {"image": image}},
                      greedy())
    assert len(out.outputs[0].token_ids) == 6
    await assert_engine_clean(engine)

"""LLaVA through the offline LLM: greedy parity with transformers (batched images of several
sizes, text-only prompts, two images in one prompt), under chunked prefill, preemption and
prefix caching; the encoder and processor caches; bad input refused before queueing."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kvflow import LLM, SamplingParams
from kvflow.engine.protocol import MultiModalFeature
from kvflow.outputs import RequestOutput
from tests.engine.leaks import assert_core_clean
from tests.multimodal.conftest import HFReference, MakeImage

NEW_TOKENS = 8
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=0)
LOGPROB_TOL = 1e-4
TWO = "USER: <image>\n<image>\nCompare. ASSISTANT:"
# (prompt text, names of its images in the `images` fixture)
Case = tuple[str, list[str]]
BATCH: list[Case] = [
    ("USER: <image>\nWhat is shown? ASSISTANT:", ["rgb40x50"]),
    ("USER: Hello, who are you? ASSISTANT:", []),
    ("USER: <image>\nDescribe the colors in detail. ASSISTANT:", ["wide64x32"]),
    (TWO, ["gray17x90", "rgba33x33"]),
    ("USER: Write a short poem about the sea. ASSISTANT:", []),
    ("USER: <image>\nWhat is shown? ASSISTANT:", ["gray17x90"]),
]
BASE_ARGS: dict[str, Any] = dict(dtype="float32", limit_mm_per_prompt={"image": 2},
                                 num_kv_blocks=256)
MakeLLM = Callable[..., LLM]


@pytest.fixture(scope="module")
def make_llm() -> Iterator[MakeLLM]:
    """make_llm(folder, **engine_args): one LLM per distinct configuration in this module."""
    made: dict[str, LLM] = {}

    def get(folder: Path, **kwargs: Any) -> LLM:
        args = {**BASE_ARGS, **kwargs}
        key = repr((folder, sorted(args.items())))
        if key not in made:
            made[key] = LLM(str(folder), **args)
        return made[key]

    yield get
    made.clear()


@pytest.fixture(params=["clip_llama", "siglip_qwen2"])
def folder(request: pytest.FixtureRequest) -> Path:
    return Path(request.getfixturevalue(f"{request.param}_dir"))


def mm_prompt(text: str, images: Sequence[Image.Image]) -> str | dict[str, Any]:
    """vLLM's prompt forms: a plain string, or a dict with one image or a list of them."""
    if not images:
        return text
    return {"prompt": text,
            "multi_modal_data": {"image": images[0] if len(images) == 1 else list(images)}}


def run_cases(llm: LLM, cases: Sequence[Case], images: dict[str, Image.Image]
              ) -> list[RequestOutput]:
    prompts = [mm_prompt(text, [images[n] for n in names]) for text, names in cases]
    return llm.generate(prompts, GREEDY, use_tqdm=False)


def assert_parity(hf: HFReference, folder: Path, cases: Sequence[Case],
                  images: dict[str, Image.Image], outputs: Sequence[RequestOutput]) -> None:
    """Expanded prompt ids equal the HF processor's; greedy tokens equal HF generate's, with
    the same logprobs (an image moves them by ~1e-2, float32 rounding by ~1e-6)."""
    for (text, names), out in zip(cases, outputs, strict=True):
        ref = hf.run(folder, text, [images[n] for n in names], NEW_TOKENS)
        assert out.prompt_token_ids == ref.prompt_ids, (text, names)
        completion = out.outputs[0]
        assert list(completion.token_ids) == ref.tokens, (text, names)
        assert completion.logprobs is not None
        logprobs = [step[t].logprob for step, t in zip(completion.logprobs, ref.tokens,
                                                        strict=True)]
        assert logprobs == pytest.approx(ref.logprobs, abs=LOGPROB_TOL), (text, names)


def image_positions(llm: LLM, ids: Sequence[int]) -> list[int]:
    token = llm.llm_engine.config.model_config.image_token_id
    return [i for i, t in enumerate(ids) if t == token]


# ---- 1. parity ---------------------------------------------------------------------------
def test_batch_parity_with_transformers(make_llm: MakeLLM, folder: Path,
                                        images: dict[str, Image.Image],
                                        hf_greedy: HFReference) -> None:
    llm = make_llm(folder)
    outputs = run_cases(llm, BATCH, images)
    assert_parity(hf_greedy, folder, BATCH, images, outputs)
    two = outputs[BATCH.index((TWO, ["gray17x90", "rgba33x33"]))]
    assert len(image_positions(llm, two.prompt_token_ids)) == 2 * 25
    assert_core_clean(llm.llm_engine.core)


def test_mistral_decoder_parity(make_llm: MakeLLM, siglip_mistral_dir: Path,
                                images: dict[str, Image.Image], hf_greedy: HFReference) -> None:
    llm = make_llm(siglip_mistral_dir)
    assert_parity(hf_greedy, siglip_mistral_dir, BATCH, images, run_cases(llm, BATCH, images))
    assert_core_clean(llm.llm_engine.core)


# ---- 2. chunked prefill, preemption, prefix caching -----------------------------------
def test_chunked_prefill_splits_placeholders(make_llm: MakeLLM, folder: Path,
                                             images: dict[str, Image.Image],
                                             hf_greedy: HFReference) -> None:
    # 16-token chunks over 25-placeholder images: every image spans two or three chunks,
    # and the encoder cache (the budget: one image) holds one image at a time.
    llm = make_llm(folder, max_num_batched_tokens=16, block_size=4)
    core = llm.llm_engine.core
    case = [("USER: <image>\nWhat is shown? ASSISTANT:", ["wide64x32"])]
    (single,) = run_cases(llm, case, images)
    assert core.get_stats().num_steps >= 3 + NEW_TOKENS - 1  # the prompt took 3+ chunks
    assert core.get_stats().mm_images_encoded == 1  # once, not once per chunk
    assert_parity(hf_greedy, folder, case, images, [single])

    outputs = run_cases(llm, BATCH, images)
    assert_parity(hf_greedy, folder, BATCH, images, outputs)
    stats = core.get_stats()
    # at most once per occurrence (5 over 4 images, one of them encoded above): a cache of
    # one image may evict gray17x90 between its two prompts, never within a prompt's chunks
    assert 1 + 3 <= stats.mm_images_encoded <= 1 + 5
    assert_core_clean(core)


def test_preemption_keeps_parity(make_llm: MakeLLM, clip_llama_dir: Path,
                                 images: dict[str, Image.Image], hf_greedy: HFReference) -> None:
    llm = make_llm(clip_llama_dir, block_size=4, num_kv_blocks=24)
    core = llm.llm_engine.core
    outputs = run_cases(llm, BATCH, images)
    stats = core.get_stats()
    assert stats.num_preemptions > 0
    # recomputing after preemption finds the embeddings in the encoder cache
    assert stats.mm_images_encoded == len({n for _, names in BATCH for n in names})
    assert_parity(hf_greedy, clip_llama_dir, BATCH, images, outputs)
    assert_core_clean(core)


def test_prefix_cache_keys_include_the_image(make_llm: MakeLLM, folder: Path,
                                             make_image: MakeImage,
                                             hf_greedy: HFReference) -> None:
    llm = make_llm(folder, block_size=4, enable_prefix_caching=True)
    core = llm.llm_engine.core
    text = "USER: Look at this picture carefully, please. <image>\nWhat is it? ASSISTANT:"
    images = {"a": make_image(41, 29, seed=30), "b": make_image(41, 29, seed=31),
              "a_again": make_image(41, 29, seed=30)}

    def hits_of(name: str) -> tuple[int, RequestOutput]:
        before = core.get_stats().prefix_cache_hits
        (out,) = run_cases(llm, [(text, [name])], images)
        return core.get_stats().prefix_cache_hits - before, out

    hits, out_a = hits_of("a")
    assert hits == 0
    first = image_positions(llm, out_a.prompt_token_ids)[0]
    assert first >= 8  # some whole text blocks come before the image's first block
    # Same text, another image: only the blocks before the image's first block are shared.
    hits, out_b = hits_of("b")
    assert hits == first // 4 * 4
    # The same image again (an equal image, another object): every full block is shared.
    encoded = core.get_stats().mm_images_encoded
    hits, out_again = hits_of("a_again")
    assert hits == (len(out_a.prompt_token_ids) - 1) // 4 * 4
    assert out_again.outputs[0].token_ids == out_a.outputs[0].token_ids
    assert core.get_stats().mm_images_encoded == encoded  # its placeholders were all cached
    assert_parity(hf_greedy, folder, [(text, ["a"]), (text, ["b"])], images, [out_a, out_b])
    # the image matters: b's KV or a's served for the other would fail the parity above
    ref_a, ref_b = (hf_greedy.run(folder, text, [images[n]], NEW_TOKENS) for n in "ab")
    gaps = [abs(x - y) for x, y in zip(ref_a.logprobs, ref_b.logprobs, strict=True)]
    assert max(gaps) > 10 * LOGPROB_TOL
    assert_core_clean(core)


def test_prefix_hit_ending_inside_an_image(make_llm: MakeLLM, siglip_qwen2_dir: Path,
                                           make_image: MakeImage, hf_greedy: HFReference) -> None:
    """Same image, another question: the cached prefix ends inside the image's placeholders,
    so the rest of them come from its embeddings (cached, or encoded again)."""
    llm = make_llm(siglip_qwen2_dir)  # 16-token blocks, prefix caching on
    core = llm.llm_engine.core
    images = {"a": make_image(26, 44, seed=60)}
    cases: list[Case] = [("USER: <image>\nWhat is shown? ASSISTANT:", ["a"]),
                         ("USER: <image>\nName three colors. ASSISTANT:", ["a"]),
                         ("USER: <image>\nIs it day or night? ASSISTANT:", ["a"])]
    (first,) = run_cases(llm, cases[:1], images)
    start = image_positions(llm, first.prompt_token_ids)[0]
    before = core.get_stats()
    (second,) = run_cases(llm, cases[1:2], images)
    stats = core.get_stats()
    hits = stats.prefix_cache_hits - before.prefix_cache_hits
    assert start < hits < start + 25  # the prefix hit ends mid-image
    assert stats.mm_images_encoded == before.mm_images_encoded  # embeddings still cached
    assert stats.mm_encoder_cache_hits == before.mm_encoder_cache_hits + 1
    assert core.reset_mm_cache()  # now the image must be encoded again for the rest
    (third,) = run_cases(llm, cases[2:], images)
    assert core.get_stats().mm_images_encoded == stats.mm_images_encoded + 1
    assert core.get_stats().prefix_cache_hits - stats.prefix_cache_hits == hits
    assert_parity(hf_greedy, siglip_qwen2_dir, cases, images, [first, second, third])
    assert_core_clean(core)


# ---- 3. encoder and processor caches ------------------------------------------------------
def repeat_cases() -> list[Case]:
    """8 requests over 3 distinct images: shared objects and equal images built apart."""
    t1, t2, t3 = ("USER: <image>\nWhat is shown? ASSISTANT:",
                  "USER: <image>\nName three colors you see. ASSISTANT:",
                  "USER: <image>\nIs it day or night? ASSISTANT:")
    return [(t1, ["a"]), (t2, ["a"]), (t1, ["a2"]), (t1, ["b"]), (t2, ["b2"]),
            (TWO, ["a", "c"]), (t3, ["c"]), (t1, ["c2"])]


@pytest.mark.parametrize("cache_gb", [4.0, 0.0])
def test_encoder_runs_once_per_distinct_image(make_llm: MakeLLM, clip_llama_dir: Path,
                                              make_image: MakeImage, hf_greedy: HFReference,
                                              cache_gb: float) -> None:
    # With the processor cache off every image is preprocessed, yet the encoder (keyed by
    # content hash) still runs once per distinct image.
    llm = make_llm(clip_llama_dir, mm_processor_cache_gb=cache_gb)
    core, mm = llm.llm_engine.core, llm.llm_engine.processor.mm_processor
    assert mm is not None
    images = {"a": make_image(45, 38, seed=20), "b": make_image(20, 70, "L", seed=21),
              "c": make_image(52, 52, "RGBA", seed=22)}
    images |= {"a2": make_image(45, 38, seed=20), "b2": make_image(20, 70, "L", seed=21),
               "c2": make_image(52, 52, "RGBA", seed=22)}
    before, processed = core.get_stats(), mm.num_images_processed
    cases = repeat_cases()
    outputs = run_cases(llm, cases, images)
    stats = core.get_stats()
    assert stats.mm_images_encoded - before.mm_images_encoded == 3
    # 9 image occurrences, but request 3 repeats request 1 (text and image): it takes all
    # of request 1's blocks from the prefix cache and never needs its image's embeddings
    assert stats.mm_encoder_cache_queries - before.mm_encoder_cache_queries == 8
    assert stats.mm_encoder_cache_hits - before.mm_encoder_cache_hits == 8 - 3
    assert mm.num_images_processed - processed == (3 if cache_gb else 9)
    # Outputs equal the runs of each distinct prompt alone, which equal transformers'.
    alone = {(text, tuple(n.rstrip("2") for n in names)) for text, names in cases}
    by_prompt = {key: hf_greedy(clip_llama_dir, key[0], [images[n] for n in key[1]], NEW_TOKENS)
                 for key in alone}
    for (text, names), out in zip(cases, outputs, strict=True):
        key = (text, tuple(n.rstrip("2") for n in names))
        assert list(out.outputs[0].token_ids) == by_prompt[key], key
    assert_core_clean(core)


def test_parallel_samples_share_one_encoding(make_llm: MakeLLM, clip_llama_dir: Path,
                                             make_image: MakeImage, hf_greedy: HFReference
                                             ) -> None:
    llm = make_llm(clip_llama_dir)
    core = llm.llm_engine.core
    image = make_image(30, 60, seed=70)
    text = "USER: <image>\nWhat is shown? ASSISTANT:"
    encoded = core.get_stats().mm_images_encoded
    params = SamplingParams(n=3, max_tokens=NEW_TOKENS, temperature=0.0)
    (out,) = llm.generate(mm_prompt(text, [image]), params, use_tqdm=False)
    assert core.get_stats().mm_images_encoded == encoded + 1
    expected = hf_greedy(clip_llama_dir, text, [image], NEW_TOKENS)
    assert [list(c.token_ids) for c in out.outputs] == [expected] * 3
    assert_core_clean(core)


@pytest.mark.parametrize("cache_gb", [4.0, 0.0])
def test_processor_cache_hits_on_a_repeated_image(make_llm: MakeLLM, clip_llama_dir: Path,
                                                  make_image: MakeImage, cache_gb: float) -> None:
    llm = make_llm(clip_llama_dir, mm_processor_cache_gb=cache_gb)
    mm = llm.llm_engine.processor.mm_processor
    assert mm is not None
    cache = mm.cache
    image = make_image(37, 23, seed=40)
    text = "USER: <image>\nWhat is shown? ASSISTANT:"
    hits, processed = cache.hits, mm.num_images_processed
    (first,) = llm.generate(mm_prompt(text, [image]), GREEDY, use_tqdm=False)
    assert (cache.hits, mm.num_images_processed) == (hits, processed + 1)
    again = [mm_prompt(text, [image]), mm_prompt(text, [make_image(37, 23, seed=40)])]
    outputs = llm.generate(again, GREEDY, use_tqdm=False)
    if cache_gb:
        assert (cache.hits, mm.num_images_processed) == (hits + 2, processed + 1)
    else:  # off: never hits, every image is preprocessed again
        assert (cache.hits, mm.num_images_processed) == (0, processed + 3)
        assert not cache.entries and cache.size == 0
    for out in outputs:
        assert out.outputs[0].token_ids == first.outputs[0].token_ids
        assert out.prompt_token_ids == first.prompt_token_ids
    assert_core_clean(llm.llm_engine.core)


# ---- 4. bad input --------------------------------------------------------------------------
def _bad_prompts(images: dict[str, Image.Image]) -> dict[str, tuple[Any, str]]:
    """name -> (prompt, what the ValueError says)."""
    one, two = images["rgb40x50"], [images["rgb40x50"], images["wide64x32"]]
    return {
        "no placeholder, one image": (
            {"prompt": "USER: What is shown? ASSISTANT:", "multi_modal_data": {"image": one}},
            "0 image placeholders"),
        "two placeholders, one image": (
            {"prompt": TWO, "multi_modal_data": {"image": one}}, "2 image placeholders"),
        "one placeholder, two images": (
            {"prompt": "USER: <image>\nHi ASSISTANT:", "multi_modal_data": {"image": two}},
            "1 image placeholders"),
        "over the limit": (
            {"prompt": "USER: <image><image><image> ASSISTANT:",
             "multi_modal_data": {"image": [*two, images["gray17x90"]]}}, "limit"),
        "not an image": (
            {"prompt": "USER: <image>\nHi ASSISTANT:", "multi_modal_data": {"image": 42}},
            "must be a PIL image"),
        "array of 2 dimensions": (
            {"prompt": "USER: <image>\nHi ASSISTANT:",
             "multi_modal_data": {"image": np.zeros((30, 30), np.uint8)}}, "3 dimensions"),
        "unknown modality": (
            {"prompt": "USER: <image>\nHi ASSISTANT:", "multi_modal_data": {"video": one}},
            "only 'image'"),
        "multi_modal_data not a dict": (
            {"prompt": "USER: <image>\nHi ASSISTANT:", "multi_modal_data": [one]}, "dict"),
        "oversized image": (  # 48M pixels, more than MAX_IMAGE_PIXELS; cheap in mode "1"
            {"prompt": "USER: <image>\nHi ASSISTANT:",
             "multi_modal_data": {"image": Image.new("1", (8000, 6000))}}, "pixels"),
        "placeholder text without images": (
            "USER: <image>\nWhat is shown? ASSISTANT:", "no images"),
    }


def test_bad_input_is_refused_and_the_engine_keeps_serving(
        make_llm: MakeLLM, clip_llama_dir: Path, images: dict[str, Image.Image],
        hf_greedy: HFReference) -> None:
    llm = make_llm(clip_llama_dir)
    engine = llm.llm_engine
    good = ("USER: <image>\nWhat is shown? ASSISTANT:", ["rgb40x50"])
    for name, (prompt, message) in _bad_prompts(images).items():
        with pytest.raises(ValueError, match=message):
            llm.generate(prompt, GREEDY, use_tqdm=False)
        # also after a good prompt of the same batch: nothing stays queued
        with pytest.raises(ValueError, match=message):
            llm.generate([mm_prompt(good[0], [images["rgb40x50"]]), prompt], GREEDY,
                         use_tqdm=False)
        assert not engine.output_processor.states, name
        assert_core_clean(engine.core)
    outputs = run_cases(llm, [good], images)
    assert_parity(hf_greedy, clip_llama_dir, [good], images, outputs)
    assert_core_clean(engine.core)


def test_prompt_token_ids_with_images(make_llm: MakeLLM, clip_llama_dir: Path,
                                      images: dict[str, Image.Image],
                                      hf_greedy: HFReference) -> None:
    llm = make_llm(clip_llama_dir)
    token = llm.llm_engine.config.model_config.image_token_id
    assert token is not None
    pair = [images["gray17x90"], images["rgba33x33"]]
    ref = hf_greedy.run(clip_llama_dir, TWO, pair, NEW_TOKENS)
    expanded, tokens = ref.prompt_ids, ref.tokens
    positions = [i for i, t in enumerate(expanded) if t == token]
    first, second = positions[0], positions[25]
    collapsed = expanded[:first + 1] + expanded[first + 25:second + 1] + expanded[second + 25:]
    data = {"image": pair}
    # one image token per image (expanded by the engine) or the full runs: both work
    for ids in (collapsed, expanded):
        (out,) = llm.generate({"prompt_token_ids": ids, "multi_modal_data": data}, GREEDY,
                              use_tqdm=False)
        assert out.prompt_token_ids == expanded
        assert list(out.outputs[0].token_ids) == tokens
    wrong = {
        "run of 3": (expanded[:first] + [token] * 3 + expanded[first + 25:], "has 3 tokens"),
        "one run, two images": (expanded[:first + 1] + expanded[first + 25:second], "1 image"),
        "no images": (collapsed, "no images"),
    }
    for name, (ids, message) in wrong.items():
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if name != "no images":
            prompt["multi_modal_data"] = data
        with pytest.raises(ValueError, match=message):
            llm.generate(prompt, GREEDY, use_tqdm=False)
    assert_core_clean(llm.llm_engine.core)


def test_core_refuses_features_off_their_placeholders(make_llm: MakeLLM, clip_llama_dir: Path,
                                                      images: dict[str, Image.Image]) -> None:
    """The core checks a request message's images against its placeholders."""
    llm = make_llm(clip_llama_dir)
    engine = llm.llm_engine
    prompt = mm_prompt("USER: <image>\nHi ASSISTANT:", [images["rgb40x50"]])
    _, ids, features = engine.processor.process(prompt)
    assert features is not None and len(features) == 1
    feature = features[0]
    params = SamplingParams(max_tokens=2, temperature=0.0)
    shifted = MultiModalFeature(feature.identifier, feature.offset + 1, feature.length,
                                feature.pixels, feature.shape, feature.dtype)
    truncated = MultiModalFeature(feature.identifier, feature.offset, feature.length,
                                  feature.pixels[:-4], feature.shape, feature.dtype)
    for bad in (shifted, truncated):
        req = engine.processor.make_request("bad", ids, params, mm_features=[bad])
        with pytest.raises(ValueError, match="does not match its"):
            engine.core.add_request(req)
    engine.core.add_request(engine.processor.make_request("ok", ids, params,
                                                          mm_features=[feature]))
    tokens = []
    while engine.core.has_work():
        tokens += [t for o in engine.core.step().outputs for t in o.new_token_ids]
    assert len(tokens) == 2
    assert_core_clean(engine.core)


def test_images_on_a_text_only_model(tiny_llama_path: Path, images: dict[str, Image.Image]
                                     ) -> None:
    llm = LLM(str(tiny_llama_path), dtype="float32", num_kv_blocks=64)
    prompt = mm_prompt("USER: <image>\nWhat is shown? ASSISTANT:", [images["rgb40x50"]])
    with pytest.raises(ValueError, match="text-only"):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    (out,) = llm.generate("USER: <image>\nWhat is shown? ASSISTANT:", GREEDY, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == NEW_TOKENS  # "<image>" is plain text here
    assert_core_clean(llm.llm_engine.core)

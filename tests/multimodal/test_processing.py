"""The client side of images, without the engine: content hashes, the processor cache, the
checks on a prompt's multi_modal_data, and MultiModalProcessor against transformers'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kvflow.config import EngineArgs, EngineConfig
from kvflow.multimodal.inputs import (
    MAX_IMAGE_PIXELS,
    ProcessedImage,
    ProcessorCache,
    content_hash,
    images_of,
)
from kvflow.multimodal.processing import MultiModalProcessor, load_hf_processor
from tests.multimodal.conftest import MakeImage


def test_content_hash_follows_pixels_not_identity(make_image: MakeImage) -> None:
    a, same = make_image(40, 50, seed=0), make_image(40, 50, seed=0)
    assert a is not same and content_hash(a) == content_hash(same)
    assert content_hash(a) == content_hash(a.copy())
    changed = a.copy()
    changed.putpixel((3, 7), (0, 0, 0) if a.getpixel((3, 7)) != (0, 0, 0) else (1, 1, 1))
    assert content_hash(changed) != content_hash(a)
    assert content_hash(make_image(40, 50, seed=1)) != content_hash(a)


def test_content_hash_includes_mode_and_size() -> None:
    gray = Image.new("L", (8, 8), 0)
    assert content_hash(gray) != content_hash(gray.convert("RGB"))
    assert content_hash(gray) != content_hash(gray.convert("P"))
    # the same bytes in another shape are another image
    assert content_hash(Image.new("L", (8, 8), 0)) != content_hash(Image.new("L", (4, 16), 0))
    # a palette image: equal indices under another palette are another image
    p1 = Image.new("P", (4, 4), 1)
    p2 = p1.copy()
    p1.putpalette([0, 0, 0, 255, 0, 0] * 128)
    p2.putpalette([0, 0, 0, 0, 255, 0] * 128)
    assert p1.tobytes() == p2.tobytes()
    assert content_hash(p1) != content_hash(p2)


def test_content_hash_of_arrays_and_tensors() -> None:
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert content_hash(pixels) == content_hash(pixels.copy())
    assert content_hash(pixels) == content_hash(np.asfortranarray(pixels))  # layout aside
    assert content_hash(pixels) != content_hash(pixels.reshape(3, 2, 3))
    assert content_hash(pixels) != content_hash(pixels.astype(np.int16))
    tensor = torch.from_numpy(pixels)
    assert content_hash(tensor) == content_hash(tensor.clone())
    assert content_hash(tensor) != content_hash(pixels)  # kept apart by kind
    changed = pixels.copy()
    changed[1, 2, 0] += 1
    assert content_hash(changed) != content_hash(pixels)


def entry(nbytes: int) -> ProcessedImage:
    return ProcessedImage(torch.zeros(nbytes, dtype=torch.uint8), num_tokens=1)


def test_processor_cache_evicts_least_recently_used_by_bytes() -> None:
    cache = ProcessorCache(capacity_bytes=100)
    for key in "abc":
        cache.put(key, entry(30))
    assert list(cache.entries) == ["a", "b", "c"] and cache.size == 90
    assert cache.get("a") is not None  # a is now the most recent: b goes first
    cache.put("d", entry(30))
    assert list(cache.entries) == ["c", "a", "d"] and cache.size == 90
    cache.put("e", entry(70))  # needs two evictions: c, then a
    assert list(cache.entries) == ["d", "e"] and cache.size == 100
    assert cache.get("b") is None and cache.get("c") is None
    assert (cache.queries, cache.hits) == (3, 1)


def test_processor_cache_put_of_a_present_key_changes_nothing() -> None:
    cache = ProcessorCache(capacity_bytes=100)
    first = entry(10)
    cache.put("a", first)
    cache.put("a", entry(20))
    assert cache.entries["a"] is first and cache.size == 10


def test_processor_cache_skips_an_entry_larger_than_its_capacity() -> None:
    cache = ProcessorCache(capacity_bytes=50)
    cache.put("small", entry(20))
    cache.put("huge", entry(51))
    assert list(cache.entries) == ["small"] and cache.size == 20  # nothing evicted for it
    cache.put("exact", entry(50))
    assert list(cache.entries) == ["exact"] and cache.size == 50


def test_processor_cache_of_capacity_zero_never_holds_anything() -> None:
    cache = ProcessorCache(capacity_bytes=0)
    for key in "ab":
        cache.put(key, entry(1))
        assert cache.get(key) is None
    assert not cache.entries and cache.size == 0 and cache.hits == 0 and cache.queries == 2


def test_processed_image_size_counts_the_pixel_bytes() -> None:
    assert ProcessedImage(torch.zeros(3, 4, 5), 25).nbytes == 3 * 4 * 5 * 4


def test_images_of_gives_the_images_in_order(make_image: MakeImage) -> None:
    a, b = make_image(10, 12), make_image(12, 10, "L")
    assert images_of({"prompt": "x"}, limit=2) == []
    assert images_of({"prompt": "x", "multi_modal_data": {"image": None}}, limit=2) == []
    assert images_of({"multi_modal_data": {"image": a}}, limit=1) == [a]
    assert images_of({"multi_modal_data": {"image": [a, b]}}, limit=2) == [a, b]
    assert images_of({"multi_modal_data": {"image": (b, a)}}, limit=2) == [b, a]
    array, tensor = np.zeros((6, 7, 3), np.uint8), torch.zeros(3, 6, 7)
    assert images_of({"multi_modal_data": {"image": [array, tensor]}}, limit=2) == [array, tensor]


@pytest.mark.parametrize(("data", "message"), [
    ({"image": [0] * 3}, "more than the limit of 2"),
    ({"image": "cat.png"}, "must be a PIL image"),
    ({"image": [None]}, "must be a PIL image"),
    ({"image": b"\x89PNG"}, "must be a PIL image"),
    ({"video": []}, r"only 'image' inputs are supported, got \['video'\]"),
    ({"image": [], "audio": 1}, r"got \['audio'\]"),
    ([1], "must be a dict"),
    ("image", "must be a dict"),
    ({"image": np.zeros((5, 5), np.uint8)}, "3 dimensions"),
    ({"image": np.zeros((0, 5, 3), np.uint8)}, "3 dimensions"),
    ({"image": torch.zeros(3, 4, 5, 6)}, "3 dimensions"),
])
def test_images_of_refuses(data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        images_of({"prompt": "<image>", "multi_modal_data": data}, limit=2)


def test_images_over_the_limit_are_refused_before_any_is_checked() -> None:
    with pytest.raises(ValueError, match="3 images, more than the limit of 2"):
        images_of({"multi_modal_data": {"image": ["not", "images", "at all"]}}, limit=2)
    with pytest.raises(ValueError, match="limit of 0"):
        images_of({"multi_modal_data": {"image": Image.new("RGB", (2, 2))}}, limit=0)


def test_pixel_limit_is_checked_without_decoding() -> None:
    side = int(MAX_IMAGE_PIXELS**0.5)
    ok = Image.new("1", (side, side))  # mode "1": a bit per pixel, cheap to make
    assert images_of({"multi_modal_data": {"image": ok}}, limit=1) == [ok]
    with pytest.raises(ValueError, match="image 1 is 8000x6000 pixels"):
        images_of({"multi_modal_data": {"image": [ok, Image.new("1", (8000, 6000))]}}, limit=2)
    big = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (8000, 6000, 3))  # no memory behind
    with pytest.raises(ValueError, match="pixels"):
        images_of({"multi_modal_data": {"image": big}}, limit=1)


# ---- MultiModalProcessor (the model's own processor, no engine) ---------------------------
@pytest.fixture(scope="module")
def clip_config(clip_llama_dir: Path) -> tuple[EngineConfig, Any]:
    config = EngineArgs(model=str(clip_llama_dir), dtype="float32", max_model_len=128,
                        limit_mm_per_prompt={"image": 2}).create_engine_config()
    return config, load_hf_processor(clip_llama_dir)


@pytest.fixture
def processor(clip_config: tuple[EngineConfig, Any]) -> MultiModalProcessor:
    config, hf_processor = clip_config
    assert config.mm_config is not None
    return MultiModalProcessor(config.model_config, config.mm_config, hf_processor)


TWO = "USER: <image>\n<image>\nCompare. ASSISTANT:"


def test_expansion_and_pixels_equal_the_hf_processor(processor: MultiModalProcessor,
                                                     images: dict[str, Image.Image]) -> None:
    pair = [images["gray17x90"], images["wide64x32"]]
    text, ids, features = processor.process(
        {"prompt": TWO, "multi_modal_data": {"image": pair}}, None)
    hf = processor.hf_processor(text=TWO, images=pair, return_tensors="pt")
    assert text == TWO and ids == hf["input_ids"][0].tolist()
    token = processor.config.image_token_id
    positions = [i for i, t in enumerate(ids) if t == token]
    assert [(f.offset, f.length) for f in features] == [(positions[0], 25), (positions[25], 25)]
    for feature, image, pixels in zip(features, pair, hf["pixel_values"], strict=True):
        assert feature.identifier == content_hash(image)
        assert feature.shape == [3, 30, 30] and feature.dtype == "float32"
        assert feature.pixels == pixels.numpy().tobytes()
    assert processor.num_images_processed == 2


def test_token_id_prompts_are_expanded(processor: MultiModalProcessor,
                                       images: dict[str, Image.Image]) -> None:
    pair = [images["gray17x90"], images["wide64x32"]]
    expanded = processor.process({"prompt": TWO, "multi_modal_data": {"image": pair}}, None)[1]
    token = processor.config.image_token_id
    first = expanded.index(token)
    second = expanded.index(token, first + 25)
    one_each = expanded[:first + 1] + expanded[first + 25:second + 1] + expanded[second + 25:]
    mixed = expanded[:first + 1] + expanded[first + 25:]  # the first collapsed, the second not
    for ids in (one_each, mixed, expanded):
        text, got, features = processor.process(
            {"prompt_token_ids": ids, "multi_modal_data": {"image": pair}}, None)
        assert text is None and got == expanded
        assert [f.offset for f in features] == [first, second]
    assert processor.num_images_processed == 2  # the rest came from the cache


def test_a_repeated_image_is_preprocessed_once(processor: MultiModalProcessor,
                                               make_image: MakeImage) -> None:
    image = make_image(23, 31, seed=50)
    prompt = {"prompt": TWO, "multi_modal_data": {"image": [image, make_image(23, 31, seed=50)]}}
    features = processor.process(prompt, None)[2]
    assert features[0].identifier == features[1].identifier
    assert features[0].pixels == features[1].pixels
    assert (processor.num_images_processed, processor.cache.hits) == (1, 1)


@pytest.mark.parametrize(("prompt", "message"), [
    ({"prompt": "USER: <image>\nHi", "multi_modal_data": {"image": []}}, "holds no image"),
    ({"multi_modal_data": {"image": Image.new("RGB", (5, 5))}}, "needs 'prompt'"),
    ({"prompt": "x" * 1000 + "<image>", "multi_modal_data": {"image": Image.new("RGB", (5, 5))}},
     "context length"),
    ({"prompt_token_ids": [1] * 110, "multi_modal_data": {"image": Image.new("RGB", (5, 5))}},
     "context length"),
    ({"prompt": "<image> <image>", "multi_modal_data": {"image": Image.new("RGB", (5, 5))}},
     "2 image placeholders"),
])
def test_bad_prompts_are_refused_before_preprocessing(processor: MultiModalProcessor,
                                                      prompt: dict[str, Any], message: str
                                                      ) -> None:
    processed = processor.num_images_processed
    with pytest.raises(ValueError, match=message):
        processor.process(prompt, None)
    if message != "2 image placeholders":  # (counted once the image is preprocessed)
        assert processor.num_images_processed == processed

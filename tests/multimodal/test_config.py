"""Image settings of the engine arguments: vLLM's forms of limit_mm_per_prompt, bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvflow.config import EngineArgs


def mm_config(folder: Path, **kwargs: object):
    args = EngineArgs(model=str(folder), dtype="float32", device="cpu", **kwargs)  # type: ignore[arg-type]
    return args.create_engine_config().mm_config


@pytest.mark.parametrize("given", [{"image": 2}, '{"image": 2}', "image=2"])
def test_limit_forms(clip_llama_dir: Path, given: object) -> None:
    config = mm_config(clip_llama_dir, limit_mm_per_prompt=given)
    assert config is not None and config.image_limit == 2 and config.tokens_per_image == 25


def test_defaults_and_text_models(clip_llama_dir: Path, tiny_llama_path: Path) -> None:
    config = mm_config(clip_llama_dir)
    assert config is not None and config.image_limit == 999 and config.processor_cache_gb == 4
    assert mm_config(tiny_llama_path) is None  # a text model: images are refused


@pytest.mark.parametrize("kwargs, words", [
    ({"limit_mm_per_prompt": '{"image": -1}'}, "counts >= 0"),
    ({"limit_mm_per_prompt": '{"video": 1}'}, "only 'image'"),
    ({"limit_mm_per_prompt": "{not json"}, "JSON"),
    ({"mm_processor_cache_gb": -1}, "mm_processor_cache_gb"),
    ({"allowed_local_media_path": "/no/such/folder"}, "not a folder"),
])
def test_bad_settings(clip_llama_dir: Path, kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        mm_config(clip_llama_dir, **kwargs)

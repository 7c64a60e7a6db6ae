"""Tiny random LLaVA folders, deterministic test images, and transformers' greedy reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kvflow.multimodal.example import save_random_llava
from kvflow.multimodal.inputs import content_hash

MakeImage = Callable[..., Image.Image]


@pytest.fixture(scope="session")
def clip_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """CLIP tower (strategy default, layer -2: 25 placeholders per image), Llama decoder."""
    return save_random_llava(tmp_path_factory.mktemp("clip-llama") / "model", tokenizer_dir,
                             tower="clip", decoder="llama", seed=0)


@pytest.fixture(scope="session")
def siglip_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """SigLIP tower (strategy full, layer -1: 25 placeholders per image), Qwen2 decoder."""
    return save_random_llava(tmp_path_factory.mktemp("siglip-qwen2") / "model", tokenizer_dir,
                             tower="siglip", decoder="qwen2", seed=1)


@pytest.fixture(scope="session")
def siglip_mistral_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """SigLIP tower, Mistral decoder (its 4096-token sliding window beyond the 1024 positions),
    two feature layers concatenated."""
    return save_random_llava(tmp_path_factory.mktemp("siglip-mistral") / "model",
                             tokenizer_dir, tower="siglip", decoder="mistral", seed=2,
                             vision_feature_layer=[-2, -1])


def _make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A fresh noise image: equal arguments give equal pixels (a new object each call)."""
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, channels), np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


@pytest.fixture(scope="session")
def make_image() -> MakeImage:
    return _make_image


@pytest.fixture(scope="session")
def images() -> dict[str, Image.Image]:
    """Images of different sizes, aspect ratios and modes (the processor resizes each)."""
    return {
        "rgb40x50": _make_image(40, 50, "RGB", seed=0),
        "wide64x32": _make_image(64, 32, "RGB", seed=1),
        "gray17x90": _make_image(17, 90, "L", seed=2),
        "rgba33x33": _make_image(33, 33, "RGBA", seed=3),
    }


class HFReference:
    """transformers' LlavaForConditionalGeneration + its processor, greedy, one prompt at a
    time; models and results are cached (each prompt is generated once per session)."""

    def __init__(self) -> None:
        self.models: dict[Path, tuple[Any, Any]] = {}
        self.results: dict[tuple[Any, ...], HFResult] = {}

    def _model(self, folder: Path) -> tuple[Any, Any]:
        if folder not in self.models:
            from transformers import AutoProcessor, LlavaForConditionalGeneration

            model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
            self.models[folder] = (model.eval(), AutoProcessor.from_pretrained(folder))
        return self.models[folder]

    def run(self, folder: Path, prompt: str, images: Sequence[Image.Image],
            max_new_tokens: int) -> HFResult:
        key = (folder, prompt, tuple(content_hash(i) for i in images), max_new_tokens)
        if key not in self.results:
            model, processor = self._model(folder)
            inputs = processor(text=prompt, images=list(images) or None, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
            prompt_len = inputs["input_ids"].shape[1]
            tokens = out.sequences[0, prompt_len:].tolist()
            logprobs = [float(step[0].log_softmax(-1)[t]) for step, t in zip(
                out.logits, tokens, strict=True)]
            self.results[key] = HFResult(inputs["input_ids"][0].tolist(), tokens, logprobs)
        return self.results[key]

    def __call__(self, folder: Path, prompt: str, images: Sequence[Image.Image],
                 max_new_tokens: int) -> list[int]:
        return self.run(folder, prompt, images, max_new_tokens).tokens


@dataclass(frozen=True)
class HFResult:
    prompt_ids: list[int]  # the processor's input ids (placeholders expanded)
    tokens: list[int]  # greedy new tokens
    # each new token's log-probability: random tiny models are only weakly steered by an
    # image, so equal greedy tokens alone would not prove that the right image was used
    logprobs: list[float]


@pytest.fixture(scope="session")
def hf_greedy() -> HFReference:
    """hf_greedy(folder, prompt, images, max_new_tokens) -> transformers' greedy new tokens;
    hf_greedy.run(...) -> HFResult with the processor's ids and the tokens' logprobs."""
    return HFReference()

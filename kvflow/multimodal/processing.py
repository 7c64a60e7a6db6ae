"""Prompt + images -> token ids with expanded placeholders and the images' pixel values.

The model's own processor (transformers' AutoProcessor) preprocesses each image and says how
many placeholder tokens one image token becomes; kvflow never resizes an image itself. A
repeated image (same content hash) comes from the ProcessorCache instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kvflow.config import ModelConfig, MultiModalConfig
from kvflow.engine.protocol import MultiModalFeature
from kvflow.errors import ModelLoadError
from kvflow.multimodal.inputs import (
    ProcessedImage,
    ProcessorCache,
    content_hash,
    images_of,
)

logger = logging.getLogger(__name__)


def load_hf_processor(path: Path) -> Any:
    """The model folder's processor (image processor + tokenizer + chat template)."""
    import transformers
    from transformers import AutoProcessor

    # Without torchvision, transformers falls back to the PIL image processors (the same
    # resize and normalization) and warns once per load; that warning is noise here.
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot load the image processor of {path}: {exc}") from exc
    finally:
        transformers.logging.set_verbosity(level)


class MultiModalProcessor:
    """Expands a prompt's image placeholders and preprocesses its images (client side)."""

    def __init__(self, model_config: ModelConfig, mm_config: MultiModalConfig,
                 hf_processor: Any) -> None:
        self.model_config = model_config
        self.config = mm_config
        self.hf_processor = hf_processor
        self.tokenizer = hf_processor.tokenizer
        # the processor's own template (image models keep theirs there), else the tokenizer's
        self.chat_template: str | None = getattr(hf_processor, "chat_template", None)
        self.image_token = str(getattr(hf_processor, "image_token", "<image>"))
        token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if token_id != mm_config.image_token_id:
            raise ModelLoadError(
                f"the processor's image token {self.image_token!r} is id {token_id}, the model's "
                f"image_token_id is {mm_config.image_token_id}")
        self.cache = ProcessorCache(int(mm_config.processor_cache_gb * 2**30))
        self.num_images_processed = 0  # images the HF processor ran on (cache misses)
        self._lock = threading.Lock()  # prompts are processed in worker threads too

    def process(self, prompt: Mapping[str, Any], kwargs: dict[str, Any] | None
                ) -> tuple[str | None, list[int], list[MultiModalFeature]]:
        """(text, token ids with placeholders expanded, one feature per image)."""
        images = images_of(prompt, self.config.image_limit)
        text = prompt.get("prompt")
        ids = prompt.get("prompt_token_ids")
        if not images:
            raise ValueError("multi_modal_data holds no image")
        if ids is None and not isinstance(text, str):
            raise ValueError("a prompt with images needs 'prompt' (text) or 'prompt_token_ids'")
        self._check_length(text, ids, len(images))
        uuids = _uuids_of(prompt, len(images))
        processed = [self._preprocess(image, uuid) for image, uuid in zip(images, uuids,
                                                                           strict=True)]
        if ids is None:
            assert isinstance(text, str)
            ids = self._expand_text(text, processed, kwargs)
        else:
            ids = self._expand_ids(list(ids), processed)
        return text, ids, self._features(ids, images, processed)

    def _check_length(self, text: Any, ids: Any, num_images: int) -> None:
        """Refuse a prompt that cannot fit before any image is preprocessed."""
        length = len(ids) if ids is not None else len(text) // 8  # ids, or a floor on them
        total = length + num_images * self.config.tokens_per_image
        if total > self.model_config.max_model_len:
            raise ValueError(
                f"the prompt has at least {total} tokens with its {num_images} images "
                f"({self.config.tokens_per_image} each), more than the model's context length "
                f"max_model_len={self.model_config.max_model_len}")

    def _preprocess(self, image: Any, uuid: str | None) -> tuple[str, ProcessedImage]:
        # a caller's id stands for the content (vLLM's multi_modal_uuids): no hashing
        key = content_hash(image) if uuid is None else f"uuid:{uuid}"
        with self._lock:
            hit = self.cache.get(key)
        if hit is not None:
            return key, hit
        try:
            out = self.hf_processor(text=self.image_token, images=[image], return_tensors="pt")
        except Exception as exc:  # PIL and numpy raise many kinds for a bad image
            raise ValueError(f"cannot preprocess the image: {exc}") from exc
        pixels = out["pixel_values"]
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[0] != 1:
            raise ValueError("the processor gave no pixel values of one image for the image")
        num_tokens = int((out["input_ids"] == self.config.image_token_id).sum())
        entry = ProcessedImage(pixels[0].contiguous(), num_tokens)
        with self._lock:
            self.num_images_processed += 1
            self.cache.put(key, entry)
        return key, entry

    def _expand_text(self, text: str, processed: list[tuple[str, ProcessedImage]],
                     kwargs: dict[str, Any] | None) -> list[int]:
        """Each image token of the text becomes its image's placeholder run, then the whole
        text is tokenized as the processor would."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(processed):
            raise ValueError(
                f"the prompt has {len(pieces) - 1} image placeholders ({self.image_token!r}) "
                f"but {len(processed)} images; write one {self.image_token!r} per image")
        expanded = pieces[0] + "".join(
            self.image_token * entry.num_tokens + piece
            for (_, entry), piece in zip(processed, pieces[1:], strict=True))
        return list(self.tokenizer(expanded, **(kwargs or {}))["input_ids"])

    def _expand_ids(self, ids: list[int], processed: list[tuple[str, ProcessedImage]]
                    ) -> list[int]:
        """Token ids with one image token per image (expanded here) or already expanded."""
        runs = _runs(ids, self.config.image_token_id)
        if len(runs) != len(processed):
            raise ValueError(f"prompt_token_ids has {len(runs)} image placeholder runs (id "
                             f"{self.config.image_token_id}) but {len(processed)} images")
        result, last = [], 0
        for (start, length), (_, entry) in zip(runs, processed, strict=True):
            if length not in (1, entry.num_tokens):
                raise ValueError(f"an image placeholder run at {start} has {length} tokens; "
                                 f"give 1 (expanded here) or {entry.num_tokens}")
            result += ids[last:start] + [self.config.image_token_id] * entry.num_tokens
            last = start + length
        return result + ids[last:]

    def _features(self, ids: list[int], images: list[Any],
                  processed: list[tuple[str, ProcessedImage]]) -> list[MultiModalFeature]:
        """One feature per image at its placeholders, checked against the model's count."""
        positions = [i for i, t in enumerate(ids) if t == self.config.image_token_id]
        wanted = sum(entry.num_tokens for _, entry in processed)
        if len(positions) != wanted:
            raise ValueError(f"the prompt has {len(positions)} image tokens where its "
                             f"{len(images)} images need {wanted}")
        features: list[MultiModalFeature] = []
        used = 0
        for key, entry in processed:
            if entry.num_tokens != self.config.tokens_per_image:
                raise ValueError(f"the processor made {entry.num_tokens} placeholders for an "
                                 f"image; the model encodes {self.config.tokens_per_image}")
            offset = positions[used]
            if positions[used + entry.num_tokens - 1] != offset + entry.num_tokens - 1:
                raise ValueError(f"the placeholders of image {len(features)} are not contiguous")
            pixels = entry.pixels
            features.append(MultiModalFeature(
                identifier=key, offset=offset, length=entry.num_tokens,
                pixels=pixels.numpy().tobytes(), shape=list(pixels.shape),
                dtype=str(pixels.dtype).removeprefix("torch.")))
            used += entry.num_tokens
        return features


def _uuids_of(prompt: Mapping[str, Any], count: int) -> list[str | None]:
    """The caller's ids of the images (`multi_modal_uuids`, vLLM's), None where absent."""
    given = prompt.get("multi_modal_uuids")
    if given is None:
        return [None] * count
    uuids = given.get("image") if isinstance(given, Mapping) else None
    uuids = [uuids] if isinstance(uuids, str) else uuids
    if not isinstance(uuids, list) or len(uuids) != count or not all(
            u is None or (isinstance(u, str) and u) for u in uuids):
        raise ValueError(f"multi_modal_uuids must be {{'image': [id or None, ...]}} with one "
                         f"non-empty string (or None) per image ({count})")
    return uuids


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `token` in ids."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(ids):
        if t != token:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs

"""A prompt's images: checked, content-hashed, and the client's cache of preprocessed ones."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvflow.multimodal.media import MediaLimits

# Pixels one image may have (width x height) before anything decodes or resizes it: the
# bound on decoded URLs holds for images given in memory too.
MAX_IMAGE_PIXELS = MediaLimits.max_image_pixels


def images_of(prompt: Mapping[str, Any], limit: int) -> list[Any]:
    """The images of a prompt's `multi_modal_data`, checked against the per-prompt limit."""
    data = prompt.get("multi_modal_data")
    if data is None:
        return []
    if not isinstance(data, Mapping):
        raise ValueError("multi_modal_data must be a dict such as {'image': image}")
    unknown = sorted(str(k) for k in data if k != "image")
    if unknown:
        raise ValueError(f"multi_modal_data: only 'image' inputs are supported, got {unknown}")
    images = data.get("image")
    if images is None:
        return []
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(images) > limit:
        raise ValueError(f"the prompt has {len(images)} images, more than the limit of {limit} "
                         "per prompt (limit_mm_per_prompt)")
    for index, image in enumerate(images):
        check_image(image, index)
    return images


def check_image(image: Any, index: int) -> None:
    """A PIL image, or an array [H, W, C] / tensor [C, H, W] of pixels, of a bounded size."""
    from PIL import Image

    if isinstance(image, Image.Image):
        width, height = image.size
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        if image.ndim != 3 or min(image.shape) < 1:
            raise ValueError(f"image {index}: an array image must have 3 dimensions "
                             f"(height, width, channels), got shape {tuple(image.shape)}")
        height, width = sorted(image.shape)[1:]  # the two largest dimensions
    else:
        raise ValueError(f"image {index} must be a PIL image, numpy array or torch tensor, "
                         f"got {type(image).__name__}")
    if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"image {index} is {width}x{height} pixels; images must have between "
                         f"1 and {MAX_IMAGE_PIXELS} pixels")


def content_hash(image: Any) -> str:
    """A digest of the image's content: mode, size and pixels (not the object's identity),
    so an equal image from another request or another file gets the same identifier."""
    from PIL import Image

    h = hashlib.blake2b(digest_size=32)
    if isinstance(image, Image.Image):
        h.update(f"pil:{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
        palette = image.getpalette()
        if palette:
            h.update(bytes(palette))
    else:
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        array = np.ascontiguousarray(array)
        kind = "tensor" if isinstance(image, torch.Tensor) else "array"
        h.update(f"{kind}:{array.dtype}:{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    """What the model's processor made of one image."""

    pixels: torch.Tensor  # [C, H, W] pixel values
    num_tokens: int  # placeholder tokens the processor expands one image token into

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() * self.pixels.element_size()


class ProcessorCache:
    """Preprocessed images by content hash, least recently used evicted past a byte size."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.size = 0
        self.entries: OrderedDict[str, ProcessedImage] = OrderedDict()
        self.queries = 0
        self.hits = 0

    def get(self, key: str) -> ProcessedImage | None:
        self.queries += 1
        entry = self.entries.get(key)
        if entry is not None:
            self.hits += 1
            self.entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: ProcessedImage) -> None:
        if entry.nbytes > self.capacity or key in self.entries:
            return
        self.entries[key] = entry
        self.size += entry.nbytes
        while self.size > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.size -= old.nbytes

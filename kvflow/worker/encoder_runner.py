"""Image embeddings for a step: encode the images its chunks reach, scatter them in.

The scheduler decides which images the runner keeps (kvflow.core.encoder_cache); this
holds their tensors. An image is encoded the first time a step reaches its placeholders and
its embeddings serve every later chunk, preempted recompute and other request with the same
image until the scheduler reports it evicted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from kvflow.model.llava import LlavaEncoder

if TYPE_CHECKING:
    from kvflow.core.scheduler import ScheduledRequest
    from kvflow.engine.protocol import MultiModalFeature
    from kvflow.model.llama import LlamaForCausalLM

# (first row in the step's flat tokens, image, first and end placeholder index of the image)
_Piece = tuple[int, "MultiModalFeature", int, int]


class EncoderRunner:
    """Owns the vision encoder and the embeddings of the images the scheduler keeps."""

    def __init__(self, encoder: LlavaEncoder, device: torch.device) -> None:
        self.encoder = encoder
        self.device = device
        self.outputs: dict[str, torch.Tensor] = {}  # identifier -> [tokens_per_image, hidden]
        self.num_images_encoded = 0  # tower runs per image, since start
        self.encode_seconds = 0.0  # time in the tower and projector, since start
        self.dtype = next(encoder.parameters()).dtype

    def free(self, identifiers: Sequence[str]) -> None:
        for identifier in identifiers:
            self.outputs.pop(identifier, None)

    def input_embeddings(self, model: LlamaForCausalLM, scheduled: Sequence[ScheduledRequest],
                         input_ids: torch.Tensor) -> torch.Tensor | None:
        """[T, hidden] input embeddings with image rows replaced; None if no chunk of the
        step reaches an image (the decoder then looks tokens up itself)."""
        pieces = _pieces(scheduled)
        if not pieces:
            return None
        self._encode({f.identifier: f for _, f, _, _ in pieces if f.identifier not in self.outputs})
        embeds = model.embed_input_ids(input_ids)  # [T, hidden]
        for row, feature, first, end in pieces:
            image = self.outputs[feature.identifier]  # [tokens_per_image, hidden]
            embeds[row:row + end - first] = image[first:end].to(embeds.dtype)
        return embeds

    def _encode(self, features: dict[str, MultiModalFeature]) -> None:
        """Run the tower once per distinct image, batching images of one pixel shape."""
        if not features:
            return
        start = time.perf_counter()
        by_shape: dict[tuple[int, ...], list[MultiModalFeature]] = {}
        for feature in features.values():
            by_shape.setdefault(tuple(feature.shape), []).append(feature)
        for group in by_shape.values():
            pixels = torch.stack([_pixels(f) for f in group]).to(self.device)  # [B, C, H, W]
            embeddings = self.encoder(pixels)  # [B, tokens_per_image, hidden]
            for feature, image in zip(group, embeddings, strict=True):
                if image.shape[0] != feature.length:
                    raise ValueError(f"image {feature.identifier[:12]} gives {image.shape[0]} "
                                     f"embeddings for {feature.length} placeholders")
                self.outputs[feature.identifier] = image
            self.num_images_encoded += len(group)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.encode_seconds += time.perf_counter() - start


def _pieces(scheduled: Sequence[ScheduledRequest]) -> list[_Piece]:
    """Where each chunk of the step overlaps image placeholders."""
    pieces: list[_Piece] = []
    row = 0
    for item in scheduled:
        start = item.request.num_computed_tokens
        end = start + item.num_new_tokens
        features = item.request.mm_features
        if not features or start >= features[-1].offset + features[-1].length:
            row += item.num_new_tokens  # text, or past its images (decoding)
            continue
        for feature in features:
            if feature.offset >= end:
                break
            if feature.offset + feature.length <= start:
                continue
            first = max(start, feature.offset)
            last = min(end, feature.offset + feature.length)
            pieces.append((row + first - start, feature, first - feature.offset,
                           last - feature.offset))
        row += item.num_new_tokens
    return pieces


def _pixels(feature: MultiModalFeature) -> torch.Tensor:
    """The processor's pixel values [C, H, W] from the request message's bytes."""
    dtype = getattr(torch, feature.dtype)
    return torch.frombuffer(bytearray(feature.pixels), dtype=dtype).view(feature.shape)

"""Chat messages with image parts (OpenAI's content format) -> template input and images.

OpenAI clients send `{"type": "image_url", "image_url": {"url": ...}}` parts; chat
templates of image models take `{"type": "image"}` parts and write the model's placeholder
themselves. A template that only reads string content gets the placeholders put before the
message's text instead (vLLM's fallback), one per image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

# vLLM's offline API also takes images in memory: {"type": "image_pil", "image_pil": img}
# (the server accepts image_url only)
IMAGE_PART_TYPES = ("image_url", "image_pil")


def split_images(messages: Sequence[Mapping[str, Any]]
                 ) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages with image parts as {"type": "image"}, the images in order: URL strings or
    images in memory). Text-only messages pass through unchanged."""
    converted: list[dict[str, Any]] = []
    images: list[Any] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict with role and content")
        content = message.get("content")
        if not isinstance(content, list):
            converted.append(dict(message))
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{index}]: a text part needs a 'text' string")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in IMAGE_PART_TYPES:
                images.append(_image_of(part, index))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"messages[{index}]: content parts of type {kind!r} are not "
                                 "supported (text, image_url)")
        converted.append({**message, "content": parts})
    return converted, images


def _image_of(part: Mapping[str, Any], index: int) -> Any:
    from PIL import Image

    kind = part["type"]
    if kind == "image_pil":
        if not isinstance(part.get("image_pil"), Image.Image):
            raise ValueError(f"messages[{index}]: an image_pil part needs a PIL image")
        return part["image_pil"]
    value = part.get(kind)
    url = value.get("url") if isinstance(value, Mapping) else value
    if not isinstance(url, str) or not url:
        raise ValueError(f"messages[{index}]: an {kind} part needs a URL "
                         f'({{"{kind}": {{"url": "data:image/png;base64,..."}}}})')
    return url


def joined_text(messages: Sequence[Mapping[str, Any]], placeholder: str | None = None
                ) -> list[dict[str, Any]]:
    """Messages with list content joined into one string, for templates that read strings;
    with `placeholder`, each image part's placeholder is written first, one per line."""
    result = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            texts = "\n".join(p["text"] for p in content if p.get("type") == "text")
            images = sum(1 for p in content if p.get("type") == "image")
            content = f"{placeholder}\n" * images + texts if placeholder else texts
        result.append({**message, "content": content or ""})
    return result


def render_with_images(render: Callable[[list[dict[str, Any]]], str],
                       messages: list[dict[str, Any]], num_images: int, placeholder: str) -> str:
    """Render with the template; if it dropped the image parts, render string contents with
    the placeholders written in. The result holds exactly one placeholder per image."""
    text = render(messages)
    if text.count(placeholder) == num_images:
        return text
    text = render(joined_text(messages, placeholder))
    if text.count(placeholder) != num_images:
        raise ValueError(f"the chat template renders {text.count(placeholder)} image "
                         f"placeholders for {num_images} images")
    return text

"""LLaVA: a vision tower and an MLP projector whose outputs replace the decoder's input
embeddings at the image placeholder tokens.

The decoder is kvflow's Llama (Llama, Mistral, Qwen2) built from `text_config`; this module
holds the image side (`LlavaEncoder`), how checkpoint names split between the two, and the
config facts the client needs (placeholder id, tokens per image).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kvflow.errors import ModelLoadError
from kvflow.model.vision import VisionTower, activation

LLAVA_ARCHITECTURE = "LlavaForConditionalGeneration"

# Vision-language architectures transformers knows and kvflow does not run: refused by name
# rather than as an unknown architecture.
OTHER_VLMS = frozenset({
    "LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
    "LlavaNextVideoForConditionalGeneration", "Idefics3ForConditionalGeneration",
    "SmolVLMForConditionalGeneration", "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration", "PaliGemmaForConditionalGeneration",
    "MllamaForConditionalGeneration", "Gemma3ForConditionalGeneration",
    "LlavaLlamaForCausalLM", "Phi3VForCausalLM", "InternVLChatModel", "MiniCPMV",
    "Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration",
    "FuyuForCausalLM", "ChameleonForConditionalGeneration", "Mistral3ForConditionalGeneration",
    "AyaVisionForConditionalGeneration", "InternVLForConditionalGeneration",
})

_TEXT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM"}


def _architecture(config: Any) -> str | None:
    names = getattr(config, "architectures", None) or []
    return names[0] if names else None


def is_llava(config: Any) -> bool:
    return _architecture(config) == LLAVA_ARCHITECTURE


def _sub_config(config: Any, name: str) -> Any:
    """A nested config as an object (transformers' config, or a dict from ModelConfig)."""
    from transformers import AutoConfig, PretrainedConfig

    sub = getattr(config, name)
    if isinstance(sub, dict):
        model_type = sub.get("model_type")
        fields = {k: v for k, v in sub.items() if k != "model_type"}
        return AutoConfig.for_model(model_type, **fields) if model_type \
            else PretrainedConfig.from_dict(sub)
    return sub


def text_config_of(config: Any) -> Any:
    """The decoder's config: `text_config` of a LLaVA model, the config itself otherwise.
    Its `architectures` names the decoder class kvflow builds."""
    if not is_llava(config):
        return config
    text = _sub_config(config, "text_config")
    if text.model_type not in _TEXT_ARCHITECTURES:
        raise ModelLoadError(f"LLaVA decoder '{text.model_type}' is not supported; supported: "
                             f"{', '.join(_TEXT_ARCHITECTURES)}")
    text.architectures = [_TEXT_ARCHITECTURES[text.model_type]]
    return text


def image_token_id_of(config: Any) -> int | None:
    if not is_llava(config):
        return None
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if token is None:
        raise ModelLoadError("the LLaVA config names no image_token_id / image_token_index")
    return int(token)


def _feature_layers(config: Any) -> list[int]:
    layer = getattr(config, "vision_feature_layer", -2)
    return [int(layer)] if isinstance(layer, int) else [int(x) for x in layer]


def _strategy(config: Any) -> str:
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ModelLoadError(f"vision_feature_select_strategy '{strategy}' is not supported "
                             "(default or full)")
    return str(strategy)


def tokens_per_image(config: Any) -> int:
    """Placeholder tokens (= embeddings) per image; 0 for a text-only model. 'default' drops
    CLIP's class token, 'full' keeps every position."""
    if not is_llava(config):
        return 0
    vision = _sub_config(config, "vision_config")
    positions = (vision.image_size // vision.patch_size) ** 2
    if vision.model_type == "clip_vision_model":
        positions += 1
    return positions - (1 if _strategy(config) == "default" else 0)


class LlavaProjector(nn.Module):
    """Two linear layers with an activation between: vision width -> decoder width."""

    def __init__(self, in_features: int, out_features: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaEncoder(nn.Module):
    """Pixel values -> one embedding per placeholder token, in the decoder's width."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        vision = _sub_config(config, "vision_config")
        text = text_config_of(config)
        layers = _feature_layers(config)
        self.drop_class_token = _strategy(config) == "default"
        self.vision_tower = VisionTower(vision, layers)
        self.multi_modal_projector = LlavaProjector(
            vision.hidden_size * len(layers), text.hidden_size,
            getattr(config, "projector_hidden_act", "gelu"),
            bool(getattr(config, "multimodal_projector_bias", True)))
        self.tokens_per_image = tokens_per_image(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, C, H, W] -> [B, tokens_per_image, decoder hidden]."""
        states = self.vision_tower(pixels)  # [B, positions, vision hidden] per feature layer
        if self.drop_class_token:
            states = [s[:, 1:] for s in states]
        return self.multi_modal_projector(torch.cat(states, dim=-1))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy `vision_tower.*` / `multi_modal_projector.*` tensors (see split_weight_name)."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            inner = name.removeprefix("vision_tower.")
            if inner != name and (self.vision_tower.is_unused_weight(inner)
                                  or inner.endswith("position_ids")):
                continue
            if name not in params:
                raise ModelLoadError(f"unexpected weight '{name}' in the LLaVA checkpoint")
            if params[name].shape != tensor.shape:
                raise ModelLoadError(f"weight '{name}' has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
            with torch.no_grad():
                params[name].copy_(tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ModelLoadError(f"the LLaVA checkpoint is missing {len(missing)} vision "
                                 f"weights, e.g. {', '.join(missing[:5])}")


def split_weight_name(name: str) -> tuple[bool, str]:
    """(is a vision weight, its name in LlavaEncoder or LlamaForCausalLM).

    Checkpoints name the parts two ways: transformers 4.x `language_model.model.layers.0...`,
    `vision_tower.vision_model.encoder...`; newer `model.language_model.layers.0...`,
    `model.vision_tower...`, `lm_head.weight`.
    """
    if name.startswith("model.") and name.split(".")[1] in (
            "language_model", "vision_tower", "multi_modal_projector"):
        name = name.removeprefix("model.")
    if name.startswith("vision_tower."):
        return True, "vision_tower." + name.removeprefix("vision_tower.").removeprefix(
            "vision_model.")
    if name.startswith("multi_modal_projector."):
        return True, name
    if name.startswith("language_model."):
        inner = name.removeprefix("language_model.")
        if inner.startswith(("model.", "lm_head.")):
            return False, inner
        return False, "model." + inner
    if name.startswith("lm_head."):
        return False, name
    raise ModelLoadError(f"unexpected weight '{name}' in the LLaVA checkpoint")

"""Random-weight LLaVA folders written by transformers, for tests and benchmarks.

No LLaVA checkpoint installs from a package registry, so tests and `benchmarks/multimodal.py`
build one: transformers' `LlavaForConditionalGeneration` with random weights and its
`LlavaProcessor` (the PIL image processor of CLIP or SigLIP), saved with `save_pretrained`
exactly as a downloaded model folder looks. The tokenizer is another model's (the default
model's) with `<image>` added.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

IMAGE_TOKEN = "<image>"

# LLaVA-1.5's conversation format, taking OpenAI-style content lists (image parts become
# the image token) as well as plain strings.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% elif m['role'] == 'user' %}USER: "
    "{% else %}ASSISTANT: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

TINY_DECODER: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=1024)
# SmolLM2-135M's shape (the default model's decoder)
DEFAULT_DECODER: dict[str, Any] = dict(hidden_size=576, intermediate_size=1536,
                                       num_hidden_layers=30, num_attention_heads=9,
                                       num_key_value_heads=3, max_position_embeddings=2048,
                                       rope_theta=100000.0, rms_norm_eps=1e-5)
TINY_TOWER: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=30, patch_size=6)


def save_random_llava(folder: Path, tokenizer_src: Path, *, tower: str = "clip",
                      decoder: str = "llama", decoder_shape: dict[str, Any] | None = None,
                      tower_shape: dict[str, Any] | None = None, seed: int = 0,
                      vision_feature_layer: int | list[int] | None = None) -> Path:
    """Write a LLaVA folder (weights, config, processor, tokenizer, chat template).

    tower: "clip" (class token dropped: strategy "default", feature layer -2) or "siglip"
    (strategy "full", feature layer -1); decoder: "llama", "mistral" or "qwen2".
    """
    from transformers import AutoConfig, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_src))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert isinstance(image_token_id, int)
    text_config = AutoConfig.for_model(
        decoder, vocab_size=len(tokenizer), tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        **(decoder_shape or TINY_DECODER))
    clip = tower == "clip"
    vision_config = AutoConfig.for_model("clip_vision_model" if clip else "siglip_vision_model",
                                         **(tower_shape or TINY_TOWER))
    layer = vision_feature_layer if vision_feature_layer is not None else (-2 if clip else -1)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_index=image_token_id, vision_feature_layer=layer,
                         vision_feature_select_strategy="default" if clip else "full",
                         projector_hidden_act="gelu")
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: make them count
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    _processor(vision_config, tokenizer, clip, layer).save_pretrained(folder)
    return folder


def _processor(vision: Any, tokenizer: Any, clip: bool, layer: int | list[int]) -> Any:
    from transformers import CLIPImageProcessorPil, LlavaProcessor, SiglipImageProcessorPil

    side = vision.image_size
    image_processor: Any
    if clip:
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": side},
                                                crop_size={"height": side, "width": side})
    else:
        image_processor = SiglipImageProcessorPil(size={"height": side, "width": side})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=vision.patch_size,
                          vision_feature_select_strategy="default" if clip else "full",
                          num_additional_image_tokens=1 if clip else 0,
                          chat_template=CHAT_TEMPLATE)

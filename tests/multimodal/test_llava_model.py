"""The image side of LLaVA against transformers: vision tower + projector outputs, which
checkpoint weights it skips, weight names of both naming schemes, refused architectures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kvflow import LLM
from kvflow.errors import ModelLoadError
from kvflow.model.llava import LlavaEncoder, split_weight_name, tokens_per_image
from kvflow.model.loader import architecture_of, load_hf_config, load_vision_encoder
from kvflow.multimodal.example import save_random_llava

# (tower, vision_feature_layer or None for the tower's default, hidden states the tower
# computes: the deepest selected one of its 2 layers)
VARIANTS = [
    ("clip", None, 1),  # -2: the last layer and the post-norm are in the checkpoint, unused
    ("siglip", None, 2),  # -1: every layer; post-norm and pooling head unused
    ("clip", [-1, 0], 2),  # several layers, concatenated in the order given
    ("siglip", [0, -2], 1),
]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            tokenizer_dir: Path) -> tuple[Path, int]:
    tower, layer, built = request.param
    folder = tmp_path_factory.mktemp(f"llava-{tower}") / "model"
    save_random_llava(folder, tokenizer_dir, tower=tower,
                      decoder="llama" if tower == "clip" else "qwen2",
                      vision_feature_layer=layer, seed=7)
    return folder, built


def test_encoder_equals_transformers_image_features(variant: tuple[Path, int]) -> None:
    from transformers import LlavaForConditionalGeneration

    folder, built = variant
    encoder = load_vision_encoder(folder, torch.float32, torch.device("cpu"))
    assert isinstance(encoder, LlavaEncoder)
    assert encoder.vision_tower.num_built_layers == built
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    config = hf.config
    pixels = torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = encoder(pixels)  # [3, 25, decoder hidden]
        theirs = hf.model.get_image_features(
            pixels, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output
    assert ours.shape == (3, tokens_per_image(config), config.text_config.hidden_size) \
        == (3, 25, 64)
    torch.testing.assert_close(ours, torch.stack(list(theirs)), atol=1e-5, rtol=1e-5)
    # one image alone gives what it gives in a batch (the runner batches by pixel shape)
    with torch.inference_mode():
        torch.testing.assert_close(encoder(pixels[1:2])[0], ours[1], atol=1e-6, rtol=1e-6)


def test_unused_tower_weights_are_in_the_checkpoint_and_skipped(variant: tuple[Path, int]
                                                                ) -> None:
    folder, built = variant
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    vision = [split_weight_name(n)[1] for n in names if split_weight_name(n)[0]]
    encoder = load_vision_encoder(folder, torch.float32, torch.device("cpu"))
    assert encoder is not None
    tower = encoder.vision_tower
    inner = [n.removeprefix("vision_tower.") for n in vision if n.startswith("vision_tower.")]
    unused = {n for n in inner if tower.is_unused_weight(n)}
    assert any(n.startswith("post_layernorm.") for n in unused)
    assert any(n.startswith("encoder.layers.1.") for n in unused) == (built == 1)
    assert all(n.startswith(("post_layernorm.", "head.", "encoder.layers.1.")) for n in unused)
    params = dict(encoder.named_parameters())
    assert not any(f"vision_tower.{n}" in params for n in unused)
    assert len(tower.encoder.layers) == built


def test_encoder_weight_errors(clip_llama_dir: Path) -> None:
    config = load_hf_config(clip_llama_dir)
    with safe_open(str(clip_llama_dir / "model.safetensors"), "pt") as f:
        weights = [(split_weight_name(n)[1], f.get_tensor(n)) for n in list(f.keys())
                   if split_weight_name(n)[0]]
    LlavaEncoder(config).load_weights(weights)  # the whole set loads
    name = "multi_modal_projector.linear_2.bias"
    cases = [
        ([w for w in weights if w[0] != name], "missing 1 vision weights"),
        ([*weights, ("multi_modal_projector.linear_3.weight", torch.zeros(1))], "unexpected"),
        ([(n, t[:-1] if n == name else t) for n, t in weights], "has shape"),
    ]
    for bad, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            LlavaEncoder(config).load_weights(bad)


def test_text_only_folder_has_no_vision_encoder(tiny_llama_path: Path) -> None:
    assert load_vision_encoder(tiny_llama_path, torch.float32, torch.device("cpu")) is None
    assert tokens_per_image(load_hf_config(tiny_llama_path)) == 0


@pytest.mark.parametrize(("name", "expected"), [
    # transformers 4.x checkpoints
    ("language_model.model.layers.0.self_attn.q_proj.weight",
     (False, "model.layers.0.self_attn.q_proj.weight")),
    ("language_model.model.embed_tokens.weight", (False, "model.embed_tokens.weight")),
    ("language_model.lm_head.weight", (False, "lm_head.weight")),
    ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
     (True, "vision_tower.encoder.layers.0.mlp.fc1.weight")),
    ("vision_tower.vision_model.embeddings.class_embedding",
     (True, "vision_tower.embeddings.class_embedding")),
    ("vision_tower.vision_model.pre_layrnorm.weight", (True, "vision_tower.pre_layrnorm.weight")),
    ("multi_modal_projector.linear_1.weight", (True, "multi_modal_projector.linear_1.weight")),
    # newer checkpoints
    ("model.language_model.layers.0.mlp.down_proj.weight",
     (False, "model.layers.0.mlp.down_proj.weight")),
    ("model.language_model.norm.weight", (False, "model.norm.weight")),
    ("model.vision_tower.encoder.layers.1.self_attn.k_proj.bias",
     (True, "vision_tower.encoder.layers.1.self_attn.k_proj.bias")),
    ("model.vision_tower.vision_model.post_layernorm.weight",
     (True, "vision_tower.post_layernorm.weight")),
    ("model.multi_modal_projector.linear_2.bias", (True, "multi_modal_projector.linear_2.bias")),
    ("lm_head.weight", (False, "lm_head.weight")),
])
def test_split_weight_name(name: str, expected: tuple[bool, str]) -> None:
    assert split_weight_name(name) == expected


@pytest.mark.parametrize("name", ["image_newline", "model.image_newline",
                                  "vision_model.encoder.layers.0.mlp.fc1.weight"])
def test_split_weight_name_refuses_unknown_parts(name: str) -> None:
    with pytest.raises(ModelLoadError, match="unexpected weight"):
        split_weight_name(name)


def renamed_copy(src: Path, dst: Path, architecture: str, model_type: str | None = None
                 ) -> Path:
    """A copy of a LLaVA folder whose config.json names another architecture."""
    shutil.copytree(src, dst)
    config_file = dst / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = [architecture]
    config["model_type"] = model_type or config["model_type"]
    config_file.write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("architecture", ["LlavaNextForConditionalGeneration",
                                          "Qwen2VLForConditionalGeneration"])
def test_other_vision_language_models_are_refused_by_name(
        architecture: str, clip_llama_dir: Path, tmp_path: Path) -> None:
    folder = renamed_copy(clip_llama_dir, tmp_path / "model", architecture)
    with pytest.raises(ModelLoadError, match=f"'{architecture}' is a vision-language model"):
        architecture_of(load_hf_config(folder))
    assert architecture_of(load_hf_config(clip_llama_dir)) == "LlavaForConditionalGeneration"


def test_llm_refuses_llava_next_by_name(clip_llama_dir: Path, tmp_path: Path) -> None:
    folder = renamed_copy(clip_llama_dir, tmp_path / "model",
                          "LlavaNextForConditionalGeneration", "llava_next")
    with pytest.raises(ModelLoadError, match="'LlavaNextForConditionalGeneration' is a "
                                             "vision-language model"):
        LLM(str(folder), dtype="float32", num_kv_blocks=16)

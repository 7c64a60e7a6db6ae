"""ViT image encoders of the LLaVA family: CLIP and SigLIP vision towers.

Parameter names follow the Hugging Face checkpoints (`embeddings.*`, `pre_layrnorm.*`,
`encoder.layers.N.*`), so a tower loads by name. Only the layers up to the deepest one a
LLaVA model reads are built: with `vision_feature_layer=-2` the last layer never runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.errors import ModelLoadError

# transformers' activation names -> function
ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}

VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")


def activation(name: str) -> Any:
    if name not in ACTIVATIONS:
        raise ModelLoadError(f"activation '{name}' is not supported; supported: "
                             f"{', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class VisionEmbeddings(nn.Module):
    """Patches (a strided convolution) plus learned positions; CLIP prepends a class token."""

    def __init__(self, config: Any, class_token: bool) -> None:
        super().__init__()
        hidden, patch = config.hidden_size, config.patch_size
        self.patch_size = patch
        self.num_patches = (config.image_size // patch) ** 2
        self.patch_embedding = nn.Conv2d(config.num_channels, hidden, kernel_size=patch,
                                         stride=patch, bias=not class_token)
        self.class_embedding = nn.Parameter(torch.empty(hidden)) if class_token else None
        num_positions = self.num_patches + (1 if class_token else 0)
        self.position_embedding = nn.Embedding(num_positions, hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [B, P, hidden]
        if patches.shape[1] != self.num_patches:
            raise ValueError(f"the image gives {patches.shape[1]} patches, the tower takes "
                             f"{self.num_patches} (pixel values of another size?)")
        if self.class_embedding is not None:
            cls = self.class_embedding.expand(patches.shape[0], 1, -1)
            patches = torch.cat([cls, patches], dim=1)  # [B, 1 + P, hidden]
        return patches + self.position_embedding.weight


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention over one image's tokens."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        # [B, heads, T, hd] each
        out = F.scaled_dot_product_attention(heads(self.q_proj), heads(self.k_proj),
                                             heads(self.v_proj))
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))  # [B, T, hidden]


class VisionLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = VisionMLP(hidden, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoder(nn.Module):
    def __init__(self, config: Any, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(num_layers))


class VisionTower(nn.Module):
    """A CLIP or SigLIP ViT that returns the hidden states of chosen layers.

    Hidden state 0 is the embeddings' output (after CLIP's pre-norm), state k the output of
    layer k; negative indices count from the last layer, as in transformers' `hidden_states`.
    The final post-norm is never applied: LLaVA reads the raw hidden states.
    """

    def __init__(self, config: Any, feature_layers: list[int]) -> None:
        super().__init__()
        if config.model_type not in VISION_MODEL_TYPES:
            raise ModelLoadError(f"vision tower '{config.model_type}' is not supported; "
                                 f"supported: {', '.join(VISION_MODEL_TYPES)}")
        self.is_clip = config.model_type == "clip_vision_model"
        self.embeddings = VisionEmbeddings(config, class_token=self.is_clip)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) \
            if self.is_clip else None
        total = config.num_hidden_layers
        self.feature_states = [f if f >= 0 else total + 1 + f for f in feature_layers]
        if not all(0 <= f <= total for f in self.feature_states):
            raise ModelLoadError(f"vision_feature_layer {feature_layers} is outside the tower's "
                                 f"{total} layers")
        self.num_built_layers = max(self.feature_states)
        self.total_layers = total
        self.encoder = VisionEncoder(config, self.num_built_layers)

    @property
    def num_positions(self) -> int:
        """Tokens per image out of the tower (patches, plus CLIP's class token)."""
        return self.embeddings.num_patches + (1 if self.is_clip else 0)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """pixels [B, C, H, W] -> the selected hidden states, [B, T, hidden] each."""
        x = self.embeddings(pixels)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        states = {0: x}
        for index, layer in enumerate(self.encoder.layers, start=1):
            x = layer(x)
            states[index] = x
        return [states[f] for f in self.feature_states]

    def is_unused_weight(self, name: str) -> bool:
        """Checkpoint weights a LLaVA model never reads: the post-norm, the pooling head, the
        layers after the deepest selected one."""
        if name.startswith(("post_layernorm.", "head.")):
            return True
        parts = name.split(".")
        return (parts[:2] == ["encoder", "layers"] and len(parts) > 2
                and int(parts[2]) >= self.num_built_layers)


"""Building blocks of Llama-family decoders: RMSNorm, rotary embedding, gated MLP, linear."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.errors import ModelLoadError


def linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """Every projection is made here, so one place can later swap in LoRA-aware layers."""
    return nn.Linear(in_features, out_features, bias=bias)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PackedLinear serves this device and dtype (float32 on a CPU with oneDNN)."""
    return (device.type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """A float32 CPU linear layer with its weight reordered once into oneDNN's blocked layout.

    Stock F.linear (MKL) repacks the weight on every call and is weak at decode batch
    sizes; the prepacked oneDNN matmul measured 1.3-1.4x faster at this model's shapes at
    batch 16-64 here (BENCHMARKS.md) and about equal at batch 1.
    """

    packed: torch.Tensor  # opaque oneDNN layout of the [N, K] weight

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, None))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, self.in_features), self.packed, self.bias, "none", [], "")  # [T, N]
        return out.reshape(*shape[:-1], self.out_features)


def replace_linears_(
    model: nn.Module, make: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]
) -> None:
    """Swap every nn.Linear for make(weight, bias), in place (packing, quantization)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                bias = None if child.bias is None else child.bias.data
                setattr(module, name, make(child.weight.data, bias))


def pack_linears_(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a float32 CPU model by a PackedLinear, in place.

    A tied LM head gets its own packed copy (vocab x hidden floats more memory, 113 MB for
    the default model): with 64 sequences it was a fifth of a decode step through F.linear.
    """
    replace_linears_(model, PackedLinear)
    if hasattr(model, "tied_head") and getattr(model, "lm_head", None) is None:
        embedding = model.get_submodule("model.embed_tokens")
        assert isinstance(embedding, nn.Embedding)
        model.tied_head = PackedLinear(embedding.weight.data, None)
    return model


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 like the reference."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # [T, hidden]
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = linear(hidden_size, 2 * intermediate_size, bias)
        self.down_proj = linear(intermediate_size, hidden_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 * intermediate]
        gate, up = gate_up.split(self.intermediate_size, dim=-1)  # [T, intermediate] each
        return self.down_proj(F.silu(gate) * up)  # [T, hidden]


def rope_parameters(config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from a transformers 4.x or 5.x config."""
    params = getattr(config, "rope_parameters", None)
    scaling: dict[str, Any] | None
    if isinstance(params, dict) and "rope_theta" in params:
        # transformers >= 5 merges theta and scaling into one dict.
        theta, scaling = float(params["rope_theta"]), params
    else:
        theta = float(getattr(config, "rope_theta", 10000.0))
        scaling = getattr(config, "rope_scaling", None)
    if scaling is None:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "llama3"):
        raise ModelLoadError(
            f"rope scaling type '{rope_type}' is not supported; supported: default, linear, llama3"
        )
    return theta, dict(scaling, rope_type=rope_type)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, half-split (GPT-NeoX) layout as Hugging Face checkpoints use.

    Holds no tensors: the frequencies are recomputed once per forward on the positions'
    device (a few dozen numbers), which keeps meta-device construction trivial.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling

    def inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))  # [head_dim / 2]
        if self.scaling is None:
            return inv_freq
        if self.scaling["rope_type"] == "linear":
            return inv_freq / self.scaling["factor"]
        return _llama3_frequencies(inv_freq, self.scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos and sin tables for these positions, each [T, head_dim]."""
        inv_freq = self.inverse_frequencies(positions.device)  # [head_dim / 2]
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, head_dim / 2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 long-context rescaling: slow frequencies divided by `factor`, a smooth ramp
    between the low and high wavelength cut-offs, fast frequencies unchanged."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq  # [head_dim / 2]
    scaled = torch.where(wavelen > old_context / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high_freq_factor) & (
        wavelen <= old_context / low_freq_factor
    )
    return torch.where(is_medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)  # [..., head_dim / 2] each
    return torch.cat((-second, first), dim=-1)


def apply_rotary(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [T, H, hd] and key [T, KvH, hd] by the [T, hd] cos/sin tables."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, hd]
    return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin

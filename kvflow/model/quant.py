"""Weight-only int8 quantization: per-output-channel scales, activations stay float.

Decode on a CPU is bound by memory bandwidth (every weight is read once per step), so
storing weights in one byte instead of four cuts the bytes moved per token about 4x
(2x against 16-bit). Matmuls use torch's int8-weight kernel where the device has one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATION_METHODS = ("int8",)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight ≈ q * scale[:, None]; returns (q [N, K], scale [N])."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [N]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
    return q, scale


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one float scale per output channel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = quantize_int8(linear.weight.data)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # [T, K]
        if x2.device.type == "cpu":
            out = torch._weight_int8pack_mm(x2, self.qweight, self.scale)  # [T, N]
        else:  # no fused kernel: dequantize on the fly (still saves memory, not time)
            out = F.linear(x2, self.qweight.to(x2.dtype) * self.scale[:, None].to(x2.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


class Int8Head(nn.Module):
    """An int8 copy of the LM head (or tied embedding) for compute_logits."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        q, scale = quantize_int8(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return torch._weight_int8pack_mm(x, self.qweight, self.scale)
        return F.linear(x, self.qweight.to(x.dtype) * self.scale[:, None].to(x.dtype))


def quantize_model_(model: nn.Module, method: str) -> nn.Module:
    """Replace every nn.Linear in place; a tied LM head gets its own int8 copy."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {method!r}")
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    if getattr(model, "lm_head", None) is None:  # tied: embedding lookups keep the float table
        model.int8_head = Int8Head(model.model.embed_tokens.weight.data)  # type: ignore
    return model

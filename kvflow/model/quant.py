"""Weight-only int8 quantization: per-output-channel scales, activations stay float.

Decode on a CPU is bound by memory bandwidth (every weight is read once per step), so
storing weights in one byte instead of four cuts the bytes moved per token about 4x
(2x against 16-bit). On the CPU, kvflow's C kernel multiplies by the int8 rows directly for
up to INT8_GEMV_MAX_TOKENS tokens (with AVX2 it puts activations in int16 blocks of 32 and
multiplies in integers; int8 activations, llama.cpp's q8_0 scheme, cost this model ~1.5%
perplexity); larger batches (prefill) dequantize
the weight and use the float matmul, which is compute-bound there anyway. torch's own
int8-weight CPU kernel (`_weight_int8pack_mm`) measured slower than float32 at every batch
size here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.model import cpu_kernels
from kvflow.model.layers import INT8_GEMV_MAX_TOKENS, onednn_linear, replace_linears_

QUANTIZATION_METHODS = ("int8",)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight ≈ q * scale[:, None]; returns (q [N, K], scale [N])."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [N]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
    return q, scale


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with one float scale per output channel."""

    qweight: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N]

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        q, scale = quantize_int8(weight)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # [T, K]
        if (x2.device.type == "cpu" and x2.dtype == torch.float32
                and x2.shape[0] <= INT8_GEMV_MAX_TOKENS and cpu_kernels.load() is not None):
            out = cpu_kernels.linear_i8(x2, self.qweight, self.scale, self.bias)  # [T, N]
        else:  # dequantize on the fly (saves memory, not time)
            weight = self.qweight.to(x2.dtype) * self.scale[:, None].to(x2.dtype)  # [N, K]
            if x2.device.type == "cpu" and x2.dtype == torch.float32:
                out = onednn_linear(x2, weight, self.bias)
            else:
                out = F.linear(x2, weight, self.bias)
        return out.reshape(*shape[:-1], self.out_features)


def quantize_model_(model: nn.Module, method: str) -> nn.Module:
    """Replace every nn.Linear in place; a tied LM head gets its own int8 copy."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {method!r}")
    replace_linears_(model, Int8Linear)
    if getattr(model, "lm_head", None) is None:  # tied: embedding lookups keep the float table
        model.tied_head = Int8Linear(model.model.embed_tokens.weight.data)  # type: ignore
    return model

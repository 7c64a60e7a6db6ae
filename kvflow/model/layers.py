"""Building blocks of Llama-family decoders: RMSNorm, rotary embedding, gated MLP, linear."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.errors import ModelLoadError
from kvflow.model import cpu_isa, cpu_kernels


def linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """Every projection is made here (CPU kernels and quantization swap them later)."""
    return nn.Linear(in_features, out_features, bias=bias)


@dataclass(slots=True)
class LoRAMapping:
    """Which adapter slot each token of a step uses; built once per step by the runner.

    `groups` lists each slot in use with its tokens' rows in the flat batch: a slice when
    they are contiguous (requests of one adapter side by side), else an index tensor.
    """

    token_slots: torch.Tensor  # [T] int64, -1 = the base model only
    groups: list[tuple[int, slice | torch.Tensor]]


class LoRAHook(Protocol):
    """What a projection calls to add its adapters (kvflow.lora.slots implements it).

    `a` [S, parts * R, K] and `b` [S, parts * R, N] are its slot weights, which the C decode layer
    reads in place: they never move once made.
    """

    a: torch.Tensor
    b: torch.Tensor

    def add_(self, out: torch.Tensor, x: torch.Tensor, mapping: LoRAMapping) -> None:
        """out [T, N] += each token's adapter applied to x [T, K]."""


# Token counts up to which the C kernels beat oneDNN here (BENCHMARKS.md): float32 from 8
# tokens on runs six weight rows against two tokens at a time, level with oneDNN at 64.
GEMV_MAX_TOKENS = 64
INT8_GEMV_MAX_TOKENS = 64
# bfloat16 weights: on a CPU without native bf16 the C kernel (weights widened as read) led
# torch at every count up to 64 (1.5-2x at one token: half the bytes of float32); above,
# weights are widened to float32 for oneDNN's float32 GEMM (torch's emulated bf16 GEMM ran
# 4x slower than float32 on a Zen 3). With native bf16, oneDNN's AVX512-BF16 and AMX
# kernels take over sooner (see bf16_gemv_max_tokens).
_BF16_GEMV_MAX_TOKENS = {"amx": 8, "avx512_bf16": 16}


def bf16_gemv_max_tokens() -> int:
    """Up to how many tokens a bfloat16 projection runs kvflow's C kernel on this CPU
    (KVFLOW_BF16_GEMV_MAX_TOKENS overrides, for tuning on a new CPU)."""
    forced = os.environ.get("KVFLOW_BF16_GEMV_MAX_TOKENS")
    if forced:
        return int(forced)
    return _BF16_GEMV_MAX_TOKENS.get(cpu_isa.detect().level, GEMV_MAX_TOKENS)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether CpuLinear serves this device and dtype (float32 or bfloat16 on a CPU, kernels
    on)."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and cpu_kernels.enabled())


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] · weight [N, K]ᵀ through oneDNN where torch has it (faster than MKL's F.linear
    at this model's shapes), else F.linear.

    oneDNN builds and caches a primitive per input shape, and each held memory: with a new
    token count every step the engine core grew by ~170 MB per 1,000 requests (BENCHMARKS.md).
    Token counts are therefore padded up to a few buckets (zero rows, results dropped).
    """
    if not _HAS_ONEDNN:
        return F.linear(x, weight, bias)
    tokens = x.shape[0]
    padded = onednn_bucket(tokens)
    if padded != tokens:
        x = torch.cat((x, x.new_zeros(padded - tokens, x.shape[1])))
    out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return out[:tokens] if padded != tokens else out


def onednn_bucket(tokens: int) -> int:
    """Token count rounded up: to 8s up to 64, 32s up to 256, then 128s (at most 1/8 waste
    past 64 tokens, and a few dozen shapes per weight)."""
    step = 8 if tokens <= 64 else 32 if tokens <= 256 else 128
    return -(-tokens // step) * step


_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                 "_linear_pointwise")


class CpuLinear(nn.Module):
    """A float32 or bfloat16 CPU linear layer: kvflow's C kernel for few tokens (decode
    steps: bound by memory bandwidth at a few tokens, by arithmetic towards 64), oneDNN above.

    The weight stays in its plain [N, K] layout, so the model holds one copy of it. MKL's
    F.linear reached 15 GB/s at one token here, the C kernel about 25 (BENCHMARKS.md).
    bfloat16 weights: the C kernel takes float32 activations and sums in float32 (a
    float32 copy of the bias is kept for it); the output has the input's dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.bf16 = weight.dtype == torch.bfloat16
        self.bias_f32 = None if bias is None else bias.float()
        self.gemv_max = bf16_gemv_max_tokens() if self.bf16 else GEMV_MAX_TOKENS
        self.native_bf16 = cpu_isa.detect().native_bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # [T, K]
        if x2.shape[0] <= self.gemv_max and cpu_kernels.load() is not None:
            if self.bf16:
                out = cpu_kernels.linear_bf16(x2, self.weight, self.bias_f32).to(x.dtype)
            else:
                out = cpu_kernels.linear_f32(x2, self.weight, self.bias)
        elif not self.bf16:
            out = onednn_linear(x2, self.weight, self.bias)  # [T, N]
        elif self.native_bf16:  # oneDNN's AVX512-BF16 / AMX kernels
            out = onednn_linear(x2.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)
        else:  # no bf16 arithmetic here: widened to float32, which oneDNN runs 4x faster
            out = onednn_linear(x2.float(), self.weight.float(), self.bias_f32).to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)


def replace_linears_(
    model: nn.Module, make: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]
) -> None:
    """Swap every nn.Linear for make(weight, bias), in place (CPU kernels, quantization)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                bias = None if child.bias is None else child.bias.data
                setattr(module, name, make(child.weight.data, bias))


def use_cpu_kernels_(model: nn.Module) -> nn.Module:
    """Switch a float32 or bfloat16 CPU model onto kvflow's C kernels, in place.

    Every nn.Linear becomes a CpuLinear; a tied LM head becomes a CpuLinear over the
    embedding's own table (no copy); in a float32 model RMSNorm and the gated MLP's
    SiLU-and-multiply become single fused calls (bfloat16 models keep torch's ops there
    outside decode steps, which run whole layers in C). (Rotary embedding, the cache write
    and decode attention take the C path from the attention metadata, which the runner
    builds.)
    """
    replace_linears_(model, CpuLinear)  # (int8 layers of a quantized model stay)
    tied = getattr(model, "lm_head", 0) is None and getattr(model, "tied_head", 0) is None
    if tied:
        embedding = model.get_submodule("model.embed_tokens")
        assert isinstance(embedding, nn.Embedding)
        model.tied_head = CpuLinear(embedding.weight.data, None)
    # else no compiler here (torch ops stay), or bfloat16 activations (torch ops)
    fused = cpu_kernels.load() is not None and model_dtype(model) == torch.float32
    for module in model.modules():
        if isinstance(module, RMSNorm | GatedMLP):
            module.cpu_kernels = fused
    return model


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's (first) weights."""
    return next(model.parameters()).dtype


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 like the reference.

    With a residual, the residual stream is updated first (residual + x) and the sum is
    normalized; forward returns (normalized, residual stream) either way.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.cpu_kernels = False  # set by use_cpu_kernels_: one fused C call (in place)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cpu_kernels:
            out = cpu_kernels.rms_norm(x, residual, self.weight, self.eps)  # residual += x
            return out, x if residual is None else residual
        if residual is not None:
            x = x + residual
        x32 = x.float()  # [T, hidden]
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype), x


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = linear(hidden_size, 2 * intermediate_size, bias)
        self.down_proj = linear(intermediate_size, hidden_size, bias)
        self.cpu_kernels = False  # set by use_cpu_kernels_
        # LoRA adapters of gate+up and of down, set by the model's set_lora_hooks
        self.gate_up_lora: LoRAHook | None = None
        self.down_lora: LoRAHook | None = None

    def forward(self, x: torch.Tensor, lora: LoRAMapping | None = None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 * intermediate]
        if lora is not None and self.gate_up_lora is not None:
            self.gate_up_lora.add_(gate_up, x, lora)
        if self.cpu_kernels:
            act = cpu_kernels.silu_mul(gate_up)  # [T, intermediate]
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)  # [T, intermediate] each
            act = F.silu(gate) * up
        out = self.down_proj(act)  # [T, hidden]
        if lora is not None and self.down_lora is not None:
            self.down_lora.add_(out, act, lora)
        return out


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

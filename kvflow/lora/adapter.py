"""Reading a PEFT LoRA folder and checking it against the base model.

A PEFT folder holds adapter_config.json and adapter_model.safetensors, whose tensors are
named like `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in]) and
`....lora_B.weight` ([out, r]). The projection's output gains scale · (x Aᵀ) Bᵀ with
scale = lora_alpha / r, or lora_alpha / √r under use_rslora. The scale is folded into B here.

Everything an adapter may hold that kvflow would get wrong is refused by name (DoRA,
embedding or LM-head adapters, biases, modules_to_save, other PEFT methods), as is a rank
above max_lora_rank or a shape the base model does not have.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvflow.lora.request import LoRARequest

# The projections an adapter may target, with the fused kvflow projection each lands in.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])(?:\.default)?\.weight$"
)


@dataclass(frozen=True)
class LoRAShapes:
    """The base model's projection sizes an adapter must match."""

    num_layers: int
    hidden_size: int
    q_size: int  # num_heads * head_dim
    kv_size: int  # num_kv_heads * head_dim
    intermediate_size: int

    @classmethod
    def from_hf_config(cls, config: Any) -> LoRAShapes:
        """From a transformers config or its to_dict()."""
        def get(key: str) -> Any:
            return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

        heads, hidden = int(get("num_attention_heads")), int(get("hidden_size"))
        head_dim = int(get("head_dim") or hidden // heads)
        kv_heads = int(get("num_key_value_heads") or heads)
        return cls(int(get("num_hidden_layers")), hidden, heads * head_dim, kv_heads * head_dim,
                   int(get("intermediate_size")))

    def in_out(self, module: str) -> tuple[int, int]:
        """(input features, output features) of one target projection."""
        h, q, kv, i = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[module]


@dataclass
class LoRAAdapter:
    """A loaded adapter: per (layer, projection), A [r, in] and scale·B [out, r]."""

    request: LoRARequest
    digest: str  # sha256 of the config and weight files: the adapter's identity
    rank: int  # the largest rank of any module
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    uid: int = 0  # set by the manager: distinguishes reloads of one id

    @property
    def name(self) -> str:
        return self.request.lora_name

    @property
    def int_id(self) -> int:
        return self.request.lora_int_id

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def load_adapter(request: LoRARequest, shapes: LoRAShapes, max_rank: int,
                 dtype: torch.dtype) -> LoRAAdapter:
    """Read and check the adapter; ValueError naming the adapter and the reason if refused."""
    def refuse(reason: str) -> ValueError:
        return ValueError(f"LoRA adapter '{request.lora_name}' ({request.lora_path}): {reason}")

    folder = Path(request.lora_path) if request.lora_path else None
    if folder is None or not folder.is_dir():
        raise refuse("No adapter found: lora_path is not a local folder")
    config_bytes, weight_bytes = _read_files(folder, refuse, max_file_bytes(shapes, max_rank))
    try:
        config = json.loads(config_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise refuse(f"{CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise refuse(f"{CONFIG_FILE} must hold a JSON object")
    _check_config(config, refuse)
    tensors = _parse_weights(weight_bytes, refuse)
    weights = _pair_weights(tensors, config, shapes, max_rank, dtype, refuse)
    digest = content_digest(config_bytes, weight_bytes)
    rank = max(a.shape[0] for a, _ in weights.values())
    return LoRAAdapter(request, digest, rank, weights)


def content_digest(config_bytes: bytes, weight_bytes: bytes) -> str:
    """An adapter's identity: sha256 of its config and weight files (prefix-cache keys)."""
    return hashlib.sha256(config_bytes + b"\0" + weight_bytes).hexdigest()


def folder_digest(folder: str | Path) -> str | None:
    """`content_digest` of an adapter folder, read here (the data-parallel router keys a
    request's blocks as its replica will); None if the files cannot be read."""
    try:
        path = Path(folder)
        return content_digest((path / CONFIG_FILE).read_bytes(),
                              (path / WEIGHTS_FILE).read_bytes())
    except OSError:
        return None


def max_file_bytes(shapes: LoRAShapes, max_rank: int) -> int:
    """The largest weight file a valid adapter can have: every target module of every layer
    at max_rank in float64, plus room for the header. Larger files are refused unread."""
    per_layer = sum(sum(shapes.in_out(module)) for module in TARGET_MODULES)
    return shapes.num_layers * per_layer * max_rank * 8 + (1 << 20)


def _read_files(folder: Path, refuse: Any, limit: int) -> tuple[bytes, bytes]:
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise refuse(f"No adapter found: {CONFIG_FILE} is missing")
    if not weights_path.is_file():
        other = "adapter_model.bin is not read (pickle); save with safetensors" if (
            folder / "adapter_model.bin").exists() else f"{WEIGHTS_FILE} is missing"
        raise refuse(other)
    try:
        sizes = config_path.stat().st_size, weights_path.stat().st_size
        if sizes[0] > 1 << 20 or sizes[1] > limit:
            raise refuse(f"{CONFIG_FILE} ({sizes[0]} bytes) or {WEIGHTS_FILE} ({sizes[1]} "
                         f"bytes) is larger than any adapter of this model at max_lora_rank "
                         f"can be ({limit} bytes)")
        return config_path.read_bytes(), weights_path.read_bytes()
    except OSError as exc:
        raise refuse(f"cannot read the adapter: {exc}") from None


def _check_config(config: dict[str, Any], refuse: Any) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise refuse(f"peft_type {peft_type} is not supported; only LORA adapters are")
    unsupported = {
        "use_dora": "DoRA adapters are not supported",
        "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D layouts) is not supported",
        "lora_bias": "LoRA biases are not supported",
        "trainable_token_indices": "trainable token indices are not supported",
        "target_parameters": "target_parameters (parameter LoRA) is not supported",
        "layer_replication": "layer_replication is not supported",
    }
    for key, reason in unsupported.items():
        if config.get(key):
            raise refuse(reason)
    if config.get("bias", "none") not in ("none", None):
        raise refuse(f"bias='{config.get('bias')}' is not supported; only 'none'")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        others = sorted(set(map(str, targets)) - set(TARGET_MODULES))
        if others:
            raise refuse(f"target module(s) {', '.join(others)} are not supported; "
                         f"supported: {', '.join(TARGET_MODULES)}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise refuse(f"lora_alpha must be a number, got {alpha!r}")


def _parse_weights(data: bytes, refuse: Any) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise refuse(f"{WEIGHTS_FILE} is corrupt or truncated ({exc})") from None


def _pair_weights(tensors: dict[str, torch.Tensor], config: dict[str, Any], shapes: LoRAShapes,
                  max_rank: int, dtype: torch.dtype, refuse: Any
                  ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            what = ("embedding or LM-head adapters are" if "embed" in key or "lm_head" in key
                    else "this weight is")
            raise refuse(f"{what} not supported: '{key}'")
        layer, module, half = int(match[1]), match[2], match[3]
        if layer >= shapes.num_layers:
            raise refuse(f"'{key}' names layer {layer}; the base model has {shapes.num_layers}")
        halves.setdefault((layer, module), {})[half] = tensor
    if not halves:
        raise refuse(f"{WEIGHTS_FILE} holds no LoRA weights")
    weights = {}
    for (layer, module), pair in sorted(halves.items()):
        where = f"layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise refuse(f"{where} has lora_{'A' if 'A' in pair else 'B'} without its partner")
        a, b = pair["A"], pair["B"]
        in_features, out_features = shapes.in_out(module)
        rank = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (rank, in_features) \
                or tuple(b.shape) != (out_features, rank):
            raise refuse(f"{where}: shapes A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                         f"the base model (expected [r, {in_features}] and [{out_features}, r])")
        if rank > max_rank:
            raise refuse(f"rank {rank} ({where}) exceeds max_lora_rank={max_rank}")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise refuse(f"{where}: weights must be floating point, got {a.dtype}")
        scale = _scale(config, layer, module, rank)
        weights[(layer, module)] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype))
    return weights


def _scale(config: dict[str, Any], layer: int, module: str, rank: int) -> float:
    """lora_alpha / r (or / √r with use_rslora); alpha_pattern overrides alpha per module,
    matched against the module's path as PEFT does (a key matching the path's end)."""
    alpha = float(config.get("lora_alpha", 8))
    path = f"model.layers.{layer}.{'mlp' if module in TARGET_MODULES[4:] else 'self_attn'}.{module}"
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = float(value)
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)

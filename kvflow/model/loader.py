"""Load models from Hugging Face style folders, and turn GGUF files into such folders."""

from __future__ import annotations

import functools
import json
import logging
import math
import mmap
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig

from kvflow.errors import ModelLoadError
from kvflow.model import cpu_isa, cpu_kernels, hugepages
from kvflow.model.layers import can_pack, use_cpu_kernels_
from kvflow.model.llama import LlamaForCausalLM
from kvflow.model.llava import (
    LLAVA_ARCHITECTURE,
    OTHER_VLMS,
    LlavaEncoder,
    is_llava,
    split_weight_name,
    text_config_of,
)

# config.architectures[0] -> model factory. Mistral is Llama without sliding windows;
# Qwen2 is Llama with biases on the q/k/v projections.
logger = logging.getLogger(__name__)

# (name, tensor) pairs in, (name, tensor) pairs out: a rank's slices (tensor parallelism)
WeightFilter = Callable[[Iterator[tuple[str, torch.Tensor]]], Iterator[tuple[str, torch.Tensor]]]

ARCHITECTURES: MappingProxyType[str, Callable[[Any], LlamaForCausalLM]] = MappingProxyType(
    {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": LlamaForCausalLM,
        "Qwen2ForCausalLM": functools.partial(LlamaForCausalLM, qkv_bias=True),
    }
)


def load_hf_config(path: Path) -> PretrainedConfig:
    """Read `path/config.json` with transformers (no remote code, no downloads)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{config_file} does not exist; a model folder needs a config.json")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read {config_file}: {exc}") from exc


def architecture_of(config: PretrainedConfig) -> str:
    """The first entry of `config.architectures`, checked against what kvflow implements."""
    names = getattr(config, "architectures", None) or []
    name = names[0] if names else f"<none; model_type '{config.model_type}'>"
    if name == LLAVA_ARCHITECTURE:
        return name
    if name in OTHER_VLMS:
        raise ModelLoadError(f"'{name}' is a vision-language model kvflow does not run; its "
                             f"image models are {LLAVA_ARCHITECTURE} (CLIP or SigLIP tower, "
                             "Llama, Mistral or Qwen2 decoder)")
    if name not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelLoadError(f"unsupported architecture '{name}'; supported: {supported}")
    return name


def weight_files(path: Path) -> list[Path]:
    """All safetensors files of a folder (one file or the shards of a sharded checkpoint)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no *.safetensors weights in {path}; only safetensors checkpoints are supported"
        )
    return files


def iterate_weights(files: list[Path], keep: Callable[[str], bool] | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, read one tensor at a time on the CPU with plain file reads;
    with `keep`, only the tensors whose names it accepts are read.

    Not through safetensors' memory map: every page of a mapped checkpoint counts in the
    process's resident size until the file is closed, so loading would peak at the weights
    twice over. A read goes through the page cache instead, which the process does not own.
    """
    for file in files:
        try:
            yield from _read_safetensors(file, keep)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(
                f"cannot read weights from {file}: {exc}; if this folder is a kvflow conversion "
                f"cache, delete {file.parent} and it is rebuilt on the next start"
            ) from exc


_SAFETENSORS_DTYPES = MappingProxyType({
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
})
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header


def _read_safetensors(file: Path, keep: Callable[[str], bool] | None = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one safetensors file in file order: an 8-byte little-endian header
    length, a JSON header {name: {dtype, shape, data_offsets}}, then the data."""
    with open(file, "rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if not 0 < header_len <= _MAX_HEADER_BYTES:
            raise ValueError(f"header length {header_len} is not a safetensors header")
        header = json.loads(f.read(header_len))
        data_start = 8 + header_len
        entries = sorted(((name, info) for name, info in header.items()
                          if name != "__metadata__" and (keep is None or keep(name))),
                         key=lambda e: e[1]["data_offsets"][0])
        for name, info in entries:
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"tensor '{name}' has dtype {info['dtype']}, which kvflow "
                                 f"does not load ({', '.join(_SAFETENSORS_DTYPES)})")
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes:
                raise ValueError(f"tensor '{name}' spans {end - begin} bytes, its shape and "
                                 f"dtype need {nbytes}")
            if not nbytes:
                yield name, torch.empty(shape, dtype=dtype)
                continue
            # Its own mapping, unmapped as soon as the caller drops the tensor: a heap block
            # would stay resident after loading (the engine keeps freed heap memory).
            area = mmap.mmap(-1, nbytes)
            f.seek(data_start + begin)
            if f.readinto(area) != nbytes:
                raise ValueError(f"the file ends inside tensor '{name}' (truncated)")
            data = torch.frombuffer(area, dtype=torch.uint8)
            yield name, data.view(dtype).view(shape)


def load_model(path: Path, dtype: torch.dtype, device: torch.device,
               quantization: str | None = None,
               hf_config: dict[str, Any] | None = None,
               shard: WeightFilter | None = None) -> LlamaForCausalLM:
    """Build the model on `device` in `dtype`, load its weights, return it in eval mode.

    Parameters start on the meta device, so no memory is spent on random initialization and
    each weight is copied (and cast) straight into its final place: on the CPU, one arena of
    huge pages (quantized models move there once quantized). The return type is the
    one class all supported architectures share (an nn.Module). `hf_config`, the resolved
    config as a dict (ModelConfig.hf_config), spares reading config.json through
    transformers' model classes. `shard` (tensor parallelism) slices each checkpoint tensor
    to this rank's part as it is read; `hf_config` then gives the rank's smaller shapes.
    """
    config = PretrainedConfig.from_dict(hf_config) if hf_config else load_hf_config(path)
    architecture_of(config)
    text_config = text_config_of(config)  # a LLaVA model's decoder; the model itself otherwise
    factory = ARCHITECTURES[architecture_of(text_config)]
    files = weight_files(path)
    with torch.device("meta"):
        model = factory(text_config).to(dtype=dtype)
    in_place = device.type == "cpu" and quantization is None
    if in_place:  # weights read straight into huge pages (kvflow.model.hugepages)
        hugepages.materialize_(model)
    else:
        model = model.to_empty(device=device)
    if is_llava(config):  # the decoder's weights, renamed; the vision side loads on its own
        model.load_weights((split_weight_name(n)[1], t) for n, t in iterate_weights(
            files, keep=lambda name: not split_weight_name(name)[0]))
    else:
        weights = iterate_weights(files)
        model.load_weights(weights if shard is None else shard(weights))
    model.requires_grad_(False)
    if quantization is not None:
        from kvflow.model.quant import quantize_model_

        quantize_model_(model, quantization)
    if device.type == "cpu" and not in_place:
        hugepages.move_to_hugepages_(model)
    if can_pack(device, dtype):
        use_cpu_kernels_(model)
        if dtype == torch.bfloat16 and not cpu_isa.detect().native_bf16 \
                and cpu_kernels.load() is not None:
            model.model.activation_dtype = torch.float32  # bf16 weights and KV cache only
    return model.eval()


def load_vision_encoder(path: Path, dtype: torch.dtype, device: torch.device,
                        hf_config: dict[str, Any] | None = None) -> LlavaEncoder | None:
    """The vision tower and projector of a LLaVA folder, in `dtype`; None for a text model."""
    config = PretrainedConfig.from_dict(hf_config) if hf_config else load_hf_config(path)
    if not is_llava(config):
        return None
    with torch.device("meta"):
        encoder = LlavaEncoder(config).to(dtype=dtype)
    encoder = encoder.to_empty(device=device)
    encoder.load_weights((split_weight_name(n)[1], t) for n, t in iterate_weights(
        weight_files(path), keep=lambda name: split_weight_name(name)[0]))
    return encoder.requires_grad_(False).eval()


# transformers' model_type of a GGUF-derived config -> the architecture kvflow loads it as.
_GGUF_ARCHITECTURES = MappingProxyType(
    {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
)
_GGUF_TOP_LEVEL = MappingProxyType(
    {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
)
_GGUF_BLOCK = MappingProxyType(
    {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
)


def open_gguf(gguf_file: Path) -> gguf.GGUFReader:
    """Open a GGUF file, turning a truncated or corrupt file into a ModelLoadError."""
    try:
        return gguf.GGUFReader(gguf_file)
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise ModelLoadError(
            f"cannot read GGUF file {gguf_file}: it is truncated or corrupt ({exc}); "
            "copy or download it again"
        ) from exc


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF checkpoint name of a llama.cpp tensor name; None for tensors kvflow derives itself."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if base == "rope_freqs":
        # Llama 3 rope factors; transformers' GGUF reader ignores them too (see docs).
        logger.warning("ignoring GGUF tensor 'rope_freqs': long-context rope scaling is lost")
        return None
    if base in _GGUF_TOP_LEVEL:
        return f"{_GGUF_TOP_LEVEL[base]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK:
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{suffix}"
    raise ModelLoadError(f"GGUF tensor '{gguf_name}' has no counterpart in kvflow's models")


def unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time reordering of Llama q/k rows.

    llama.cpp stores each head's rows interleaved (pairs of rotated dims side by side);
    Hugging Face checkpoints keep them half-split. Per head, rows go back from
    [x0, y0, x1, y1, ...] to [x0, x1, ..., y0, y1, ...].
    """
    shape = weight.shape
    return weight.reshape(num_heads, -1, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def read_gguf_tensors(reader: gguf.GGUFReader, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 under its HF name, q/k rows un-permuted for Llama."""
    permuted = config.model_type in ("llama", "mistral")
    head_counts = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists dimensions fastest-first; torch wants them slowest-first.
        shape = [int(n) for n in reversed(tensor.shape.tolist())]
        weight = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # a copy
        projection = name.split(".")[-2]
        if permuted and projection in head_counts:
            weight = unpermute_rotary(weight, head_counts[projection])
        tensors[name] = weight.contiguous()
    return tensors


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Write a HF folder (config, float32 safetensors, tokenizer, generation config)."""
    reader = open_gguf(gguf_file)
    config = _gguf_config(gguf_file)
    tensors = read_gguf_tensors(reader, config)
    config.tie_word_embeddings = "lm_head.weight" not in tensors
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    _save_gguf_tokenizer(gguf_file, out_dir)
    eos_token_id = config.eos_token_id
    if eos_token_id is None:
        raise ModelLoadError(f"GGUF file {gguf_file} declares no EOS token")
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
    ).save_pretrained(out_dir)


def _gguf_config(gguf_file: Path) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True
        )
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot read the model config of GGUF file {gguf_file}: {exc}"
        ) from exc
    if config.model_type not in _GGUF_ARCHITECTURES:
        supported = ", ".join(_GGUF_ARCHITECTURES)
        raise ModelLoadError(
            f"unsupported GGUF architecture '{config.model_type}' in {gguf_file}; "
            f"supported: {supported}"
        )
    config.architectures = [_GGUF_ARCHITECTURES[config.model_type]]
    return config


def _save_gguf_tokenizer(gguf_file: Path, out_dir: Path) -> None:
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True
        )
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"cannot read the tokenizer of GGUF file {gguf_file}: {exc}") from exc
    tokenizer.save_pretrained(out_dir)
    # The chat template must survive the round trip, or chat requests would silently
    # fall back to no template.
    reloaded = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    if reloaded.chat_template != tokenizer.chat_template:
        raise ModelLoadError(f"the chat template of {gguf_file} was lost while converting it")

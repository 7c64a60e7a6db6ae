"""Engine arguments (what users set) and the frozen, validated engine config built from them."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import torch

from kvflow.spec_decode.config import SpeculativeConfig
from kvflow.structured.options import StructuredOutputsConfig
from kvflow.tracing import ObservabilityConfig

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


# vLLM's largest supported max_lora_rank.
MAX_LORA_RANK = 512

# Data parallel: where replicas run, and how a request picks one.
DATA_PARALLEL_BACKENDS = ("mp", "ray")
DATA_PARALLEL_ROUTINGS = ("prefix_aware", "round_robin")


def _arg(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class EngineArgs:
    """Every engine setting a user can choose; `kvflow serve` exposes each as a --flag."""

    model: str | None = _arg(
        None, "local HF folder, GGUF file, or packaged model name (default: smollm2-135m-instruct)"
    )
    tokenizer: str | None = _arg(None, "tokenizer folder (default: the model's)")
    dtype: str = _arg(
        "auto", "auto (bfloat16 on CUDA and on CPUs with native bf16 compute: AMX or "
        "AVX512-BF16; else float32), float32, bfloat16, float16",
        choices=["auto", "float32", "float", "bfloat16", "float16", "half"],
    )
    device: str = _arg("auto", "auto, cpu or cuda", choices=["auto", "cpu", "cuda"])
    seed: int = _arg(0, "seed of the engine's shared random generator")
    max_model_len: int | None = _arg(None, "longest prompt + output (default: the model's)")
    block_size: int = _arg(16, "tokens per KV-cache block")
    kv_cache_memory_gb: float = _arg(2.0, "KV cache size in GiB on CPU")
    gpu_memory_utilization: float = _arg(0.9, "fraction of GPU memory for weights + KV cache")
    num_kv_blocks: int | None = _arg(None, "exact number of KV blocks (overrides the sizing)")
    max_num_seqs: int = _arg(256, "most requests in one batch")
    max_num_batched_tokens: int | None = _arg(
        None, "token budget of one step (default 1024 on CPU, 4096 on CUDA)"
    )
    enable_chunked_prefill: bool = _arg(True, "split long prompts over several steps")
    enable_prefix_caching: bool = _arg(True, "reuse KV blocks of equal prompt prefixes")
    scheduling_policy: str = _arg("fcfs", "fcfs or priority", choices=["fcfs", "priority"])
    max_logprobs: int = _arg(20, "largest logprobs / prompt_logprobs a request may ask for")
    stream_interval: int = _arg(1, "send streamed outputs every N tokens (first and last always)")
    disable_log_stats: bool = _arg(False, "do not log the periodic stats line")
    num_threads: int | None = _arg(None, "torch threads in the engine core (default: all cores)")
    tensor_parallel_size: int = _arg(
        1, "ranks one model is split over (torch.distributed: gloo on CPU, NCCL on GPUs); "
        "each rank is a process with its share of the heads, FFN and vocabulary")
    quantization: str | None = _arg(
        None, "weight-only quantization: int8 (per-channel scales)", choices=["int8"])
    enforce_eager: bool = _arg(
        False, "no CUDA graphs: run decode steps op by op (graphs are CUDA-only, and need the "
        "triton attention backend)")
    attention_backend: str | None = _arg(
        None, "attention kernels: cpu (C), torch or triton (default: cpu on a CPU, triton on "
        "CUDA where installed, else torch)", choices=["cpu", "torch", "triton"])
    enable_lora: bool = _arg(False, "serve LoRA adapters (PEFT folders) over the base model")
    max_loras: int = _arg(1, "most distinct LoRA adapters in one step (the adapter slots)")
    max_lora_rank: int = _arg(16, "largest LoRA rank accepted (slots are sized for it)")
    max_cpu_loras: int | None = _arg(
        None, "LoRA adapters kept loaded, least recently used evicted (default: max_loras)")
    lora_dtype: str = _arg(
        "auto", "dtype of the LoRA weights: auto (the model's), float32, bfloat16, float16",
        choices=["auto", "float32", "float", "bfloat16", "float16", "half"])
    limit_mm_per_prompt: dict[str, int] | str | None = _arg(
        None, 'most images per prompt, as JSON: {"image": 2} (default 999 for image models)')
    mm_processor_cache_gb: float = _arg(
        4.0, "GiB of preprocessed images cached in the client by content hash (0: off)")
    allowed_local_media_path: str | None = _arg(
        None, "folder whose images file:// URLs may read (default: file:// refused)")
    kv_offloading_size: float | None = _arg(
        None, "GiB of host memory for a second KV tier: evicted prefix blocks are kept there "
        "and loaded back instead of recomputed (default: off)")
    kv_offloading_backend: str = _arg("native", "second KV tier backend", choices=["native"])
    kv_offloading_path: str | None = _arg(
        None, "folder for the second tier's disk level (survives restarts; default: none)")
    kv_offloading_disk_size: float = _arg(16.0, "GiB of block files in kv_offloading_path")
    enable_sleep_mode: bool = _arg(
        False, "allow sleep(level) / wake_up(): free the KV cache (1) and the weights (2)")
    otlp_traces_endpoint: str | None = _arg(
        None, "send a span per request to this OpenTelemetry collector (OTLP; the protocol "
        "from OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: grpc or http/protobuf); needs kvflow[tracing]")
    collect_detailed_traces: str | None = _arg(
        None, "also time the model steps of each traced request: model, worker or all "
        "(comma-separated); needs --otlp-traces-endpoint")
    structured_outputs_config: dict[str, Any] | str | None = _arg(
        None, 'JSON grammar options, as JSON: {"disable_any_whitespace": true} gives compact '
        'JSON (default: a bounded amount of whitespace), {"disable_additional_properties": '
        "false} lets schemas that do not say additionalProperties accept undeclared "
        "properties (default true)")
    # data parallel: engine-core replicas behind one client (kvflow/distributed/)
    data_parallel_size: int = _arg(1, "engine-core replicas, each with its own KV cache")
    data_parallel_backend: str = _arg(
        "mp", "where replicas run: mp (processes here) or ray (Ray actors, across machines)",
        choices=list(DATA_PARALLEL_BACKENDS))
    data_parallel_address: str | None = _arg(
        None, "Ray cluster to join with --data-parallel-backend ray (default: RAY_ADDRESS, "
        "else a Ray cluster started on this machine, else a new local one)")
    data_parallel_routing: str = _arg(
        "prefix_aware", "how requests pick a replica: prefix_aware (the replica holding the "
        "longest cached prefix, balanced against load) or round_robin",
        choices=list(DATA_PARALLEL_ROUTINGS))
    speculative_config: dict[str, Any] | str | None = _arg(
        None, 'speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_min": 2, "prompt_lookup_max": 5} or {"method": "draft_model", '
        '"model": PATH, "num_speculative_tokens": 4} (default: off)')

    def create_engine_config(self) -> EngineConfig:
        """Validate the arguments, resolve the model, and freeze the result."""
        from kvflow.model.registry import resolve_model

        _check_positive(self)
        if self.quantization not in (None, "int8"):
            raise ValueError(f"quantization must be 'int8' or None, got {self.quantization!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(
                f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}"
            )
        device = _resolve_device(self.device)
        dtype = _resolve_dtype(self.dtype, device, self.quantization)
        from kvflow.model.attention_backends import check_attention_backend

        check_attention_backend(self.attention_backend, device)
        path = resolve_model(self.model)
        model_config = ModelConfig.from_folder(
            model=self.model, path=path, tokenizer=self.tokenizer, dtype=dtype, device=device,
            max_model_len=self.max_model_len, seed=self.seed, max_logprobs=self.max_logprobs,
            quantization=self.quantization,
        )
        budget = self.max_num_batched_tokens or (4096 if device.type == "cuda" else 1024)
        if not self.enable_chunked_prefill:
            budget = max(budget, model_config.max_model_len)
        mm_config = self._mm_config(model_config)
        self._check_tensor_parallel(model_config, device, mm_config is not None)
        cache = CacheConfig(
            block_size=self.block_size, kv_cache_memory_gb=self.kv_cache_memory_gb,
            gpu_memory_utilization=self.gpu_memory_utilization, num_kv_blocks=self.num_kv_blocks,
            enable_prefix_caching=self.enable_prefix_caching, **self._offloading(),
        )
        scheduler = SchedulerConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=budget,
            enable_chunked_prefill=self.enable_chunked_prefill, policy=self.scheduling_policy,
            stream_interval=self.stream_interval,
            max_loras=self.max_loras if self.enable_lora else 0,
            # one image is encoded whole in one step: budget and cache hold at least one
            encoder_budget=max(budget, mm_config.tokens_per_image) if mm_config else 0,
            encoder_cache_size=_encoder_cache_size(model_config, budget) if mm_config else 0,
        )
        return EngineConfig(
            model_config=model_config, cache_config=cache, scheduler_config=scheduler,
            log_stats=not self.disable_log_stats, num_threads=self.num_threads,
            lora_config=self._lora_config(dtype, device), mm_config=mm_config,
            enable_sleep_mode=self.enable_sleep_mode,
            structured_outputs_config=StructuredOutputsConfig.parse(
                self.structured_outputs_config),
            observability_config=ObservabilityConfig.parse(
                self.otlp_traces_endpoint, self.collect_detailed_traces),
            attention_backend=self.attention_backend, enforce_eager=self.enforce_eager,
            tensor_parallel_size=self.tensor_parallel_size,
            data_parallel_config=self._data_parallel_config(device),
            speculative_config=_speculative_config(self.speculative_config, model_config),
        )

    def _check_tensor_parallel(self, model_config: ModelConfig, device: torch.device,
                               images: bool) -> None:
        """tensor_parallel_size > 1: enough KV heads (and GPUs), and none of the features
        whose state lives on one rank only."""
        size = self.tensor_parallel_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {size!r}")
        if size == 1:
            return
        from kvflow.distributed.parallel_state import check_shardable

        check_shardable(model_config.hf_config or {}, size)
        if device.type == "cuda" and size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {size} exceeds the "
                             f"{torch.cuda.device_count()} GPUs torch sees")
        unsupported = {"enable_lora": self.enable_lora, "image inputs (LLaVA)": images,
                       "enable_sleep_mode": self.enable_sleep_mode,
                       "kv_offloading_size": self.kv_offloading_size is not None}
        refused = [name for name, on in unsupported.items() if on]
        if refused:
            raise ValueError(f"tensor_parallel_size > 1 does not support {', '.join(refused)} "
                             "yet")

    def _data_parallel_config(self, device: torch.device) -> DataParallelConfig | None:
        """Replica settings; None for one engine core (the plain path, nothing added)."""
        size = self.data_parallel_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"data_parallel_size must be an integer >= 1, got {size!r}")
        if self.data_parallel_backend not in DATA_PARALLEL_BACKENDS:
            raise ValueError(f"data_parallel_backend must be one of "
                             f"{', '.join(DATA_PARALLEL_BACKENDS)}; got "
                             f"{self.data_parallel_backend!r}")
        if self.data_parallel_routing not in DATA_PARALLEL_ROUTINGS:
            raise ValueError(f"data_parallel_routing must be one of "
                             f"{', '.join(DATA_PARALLEL_ROUTINGS)}; got "
                             f"{self.data_parallel_routing!r}")
        if size == 1:
            return None
        gpus = size * self.tensor_parallel_size
        if self.data_parallel_backend == "mp" and device.type == "cuda" \
                and gpus > torch.cuda.device_count():
            raise ValueError(f"data_parallel_size {size} x tensor_parallel_size "
                             f"{self.tensor_parallel_size} needs {gpus} GPUs on this machine; "
                             f"torch sees {torch.cuda.device_count()}")
        return DataParallelConfig(size=size, backend=self.data_parallel_backend,
                                  address=self.data_parallel_address,
                                  routing=self.data_parallel_routing)

    def _offloading(self) -> dict[str, Any]:
        """The second KV tier's CacheConfig fields (vLLM's kv_offloading_* names)."""
        size = self.kv_offloading_size
        if size is None:
            if self.kv_offloading_path is not None:
                raise ValueError("kv_offloading_path needs kv_offloading_size (GiB of host "
                                 "memory for the second KV tier)")
            return {}
        if isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0:
            raise ValueError(f"kv_offloading_size must be > 0 GiB, got {size!r}")
        if self.kv_offloading_backend != "native":
            raise ValueError(f"kv_offloading_backend must be 'native', got "
                             f"{self.kv_offloading_backend!r}")
        if not self.enable_prefix_caching:
            raise ValueError("the second KV tier keeps prefix-cache blocks: it needs "
                             "enable_prefix_caching")
        if not self.kv_offloading_disk_size > 0:
            raise ValueError(f"kv_offloading_disk_size must be > 0 GiB, got "
                             f"{self.kv_offloading_disk_size!r}")
        path = self.kv_offloading_path
        return {"kv_offloading_bytes": int(size * 2**30),
                "kv_offloading_path": Path(path).expanduser() if path else None,
                "kv_offloading_disk_bytes": int(self.kv_offloading_disk_size * 2**30)}

    def _mm_config(self, model_config: ModelConfig) -> MultiModalConfig | None:
        """Image settings of a LLaVA model; None for a text-only model (images refused)."""
        limits = _parse_mm_limits(self.limit_mm_per_prompt)
        if not isinstance(self.mm_processor_cache_gb, (int, float)) \
                or self.mm_processor_cache_gb < 0:
            raise ValueError(f"mm_processor_cache_gb must be >= 0, got "
                             f"{self.mm_processor_cache_gb!r}")
        if model_config.image_token_id is None:
            return None
        media = self.allowed_local_media_path
        if media is not None and not Path(media).is_dir():
            raise ValueError(f"allowed_local_media_path {media!r} is not a folder")
        return MultiModalConfig(
            image_limit=(limits or {}).get("image", 999),
            processor_cache_gb=float(self.mm_processor_cache_gb),
            image_token_id=model_config.image_token_id,
            tokens_per_image=model_config.tokens_per_image,
            allowed_local_media_path=Path(media).resolve() if media else None,
        )

    def _lora_config(self, model_dtype: torch.dtype, device: torch.device) -> LoRAConfig | None:
        if not self.enable_lora:
            return None
        for name in ("max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_lora_rank > MAX_LORA_RANK:
            raise ValueError(f"max_lora_rank must be <= {MAX_LORA_RANK}, got {self.max_lora_rank}")
        cpu_loras = self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras
        if isinstance(cpu_loras, bool) or not isinstance(cpu_loras, int) \
                or cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({cpu_loras!r}) must be an integer >= max_loras "
                             f"({self.max_loras})")
        if self.lora_dtype != "auto" and self.lora_dtype not in _DTYPES:
            raise ValueError(f"lora_dtype must be auto or one of {', '.join(_DTYPES)}; "
                             f"got {self.lora_dtype!r}")
        # auto: the model's dtype, but float32 on a CPU (the C LoRA op's, and the C decode
        # layer's, whatever the model's dtype; adapters are small)
        auto = torch.float32 if model_dtype == torch.bfloat16 and device.type == "cpu" \
            else model_dtype
        dtype = auto if self.lora_dtype == "auto" else _DTYPES[self.lora_dtype]
        return LoRAConfig(max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                          max_cpu_loras=cpu_loras, dtype=dtype)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add one --flag per field, generated from the dataclass (one source of truth)."""
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "model":
                continue  # positional in the CLI
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            help_text = f.metadata.get("help", "")
            if kind is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                    default=f.default, help=help_text)
                continue
            parser.add_argument(flag, type=_scalar_type(kind), default=f.default,
                                choices=f.metadata.get("choices"), help=help_text)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


# Memory for kept image embeddings (the encoder cache), in bytes of float32 embeddings.
ENCODER_CACHE_BYTES = 256 << 20


def _speculative_config(value: dict[str, Any] | str | None,
                        model_config: ModelConfig) -> SpeculativeConfig | None:
    from kvflow.spec_decode.config import check_draft_model

    config = SpeculativeConfig.parse(value)
    if config is not None and config.model is not None:
        config = check_draft_model(config, model_config)
    return config


def _encoder_cache_size(model_config: ModelConfig, budget: int) -> int:
    """Image embeddings the encoder cache holds: what ENCODER_CACHE_BYTES of float32
    embeddings of the decoder's width takes, and at least one step's encoder budget. (vLLM
    sizes it to the step budget alone; at the CPU's 1024 tokens that is five 196-token
    images, and a workload cycling through eight distinct images never hit.)"""
    hf = model_config.hf_config or {}
    hidden = int((hf.get("text_config") or hf).get("hidden_size", 4096))
    return max(budget, model_config.tokens_per_image, ENCODER_CACHE_BYTES // (4 * hidden))


def _parse_mm_limits(value: dict[str, int] | str | None) -> dict[str, int] | None:
    """limit_mm_per_prompt as a dict: given as one, as JSON ('{"image": 2}') or as vLLM's
    older 'image=2' form."""
    limits: Any = value
    if isinstance(value, str):
        try:
            limits = json.loads(value) if value.lstrip().startswith("{") else {
                k.strip(): int(v) for k, v in (item.split("=") for item in value.split(","))}
        except (json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"limit_mm_per_prompt must be JSON such as '{{\"image\": 2}}', "
                             f"got {value!r} ({exc})") from None
    if limits is None:
        return None
    if not isinstance(limits, dict) or any(
            not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in limits.values()):
        raise ValueError(f"limit_mm_per_prompt must map modalities to counts >= 0, got {limits!r}")
    if set(limits) - {"image"}:
        raise ValueError(f"limit_mm_per_prompt: only 'image' is supported, got "
                         f"{sorted(set(limits) - {'image'})}")
    return limits


def _scalar_type(kind: Any) -> Any:
    for candidate in (int, float, str):
        if kind is candidate or candidate in getattr(kind, "__args__", ()):
            return candidate
    return str


def _check_positive(args: EngineArgs) -> None:
    for name in ("block_size", "max_num_seqs", "stream_interval", "max_logprobs"):
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name in ("max_model_len", "max_num_batched_tokens", "num_kv_blocks", "num_threads"):
        value = getattr(args, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if args.kv_cache_memory_gb <= 0:
        raise ValueError(f"kv_cache_memory_gb must be > 0, got {args.kv_cache_memory_gb}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ValueError(
            f"gpu_memory_utilization must be in (0, 1], got {args.gpu_memory_utilization}"
        )


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def offset_device(device: torch.device, offset: int) -> torch.device:
    """The GPU `offset` places after `device`'s (a tensor-parallel rank's, or a local
    data-parallel replica's first); a CPU stays itself."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + offset)


def with_device_offset(config: EngineConfig, offset: int) -> EngineConfig:
    """`config` on the device `offset_device` gives (a rank's or a replica's own GPU)."""
    mc = config.model_config
    return dataclasses.replace(config, model_config=dataclasses.replace(
        mc, device=offset_device(mc.device, offset)))


def _resolve_dtype(dtype: str, device: torch.device, quantization: str | None) -> torch.dtype:
    """auto: bfloat16 on a GPU, and on a CPU that computes bf16 natively (the ISA level in
    use: AMX or AVX512-BF16) unless the weights are int8 (float32 activations); float32 on
    other CPUs, where bf16 arithmetic is emulated."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        from kvflow.model import cpu_isa

        native = quantization is None and cpu_isa.detect().native_bf16
        return torch.bfloat16 if native else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class ModelConfig:
    """The resolved model: where it is, its shape, and the limits derived from it."""

    model: str
    path: Path
    tokenizer_path: Path
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    seed: int
    max_logprobs: int
    architecture: str
    quantization: str | None = None
    # LLaVA models: the placeholder token and how many of them one image takes
    image_token_id: int | None = None
    tokens_per_image: int = 0
    # The model's config.json as transformers resolves it (defaults filled in), as plain
    # data: the engine-core process builds the model from it without importing transformers'
    # model classes (which pull in sympy and accelerate: ~60 MB resident).
    hf_config: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_folder(cls, *, model: str | None, path: Path, tokenizer: str | None,
                    dtype: torch.dtype, device: torch.device, max_model_len: int | None,
                    seed: int, max_logprobs: int,
                    quantization: str | None = None) -> ModelConfig:
        from kvflow.model.llama import sliding_window_of
        from kvflow.model.llava import image_token_id_of, text_config_of, tokens_per_image
        from kvflow.model.loader import architecture_of, load_hf_config

        hf_config = load_hf_config(path)
        architecture_of(hf_config)  # an architecture kvflow does not run is refused by name
        text_config = text_config_of(hf_config)
        model_max = int(getattr(text_config, "max_position_embeddings", 2048))
        window = sliding_window_of(text_config)
        if window is not None:  # whole-context attention equals the window's up to its size
            model_max = min(model_max, window)
        if max_model_len is not None and max_model_len > model_max:
            why = f" (its sliding window: {window} tokens)" if model_max == window else ""
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the model's limit of {model_max}{why}"
            )
        return cls(
            model=model or path.name, path=path,
            tokenizer_path=Path(tokenizer) if tokenizer else path,
            dtype=dtype, device=device, max_model_len=max_model_len or model_max,
            vocab_size=int(text_config.vocab_size), eos_token_ids=_eos_ids(path, hf_config),
            seed=seed, max_logprobs=max_logprobs,
            architecture=(getattr(hf_config, "architectures", None) or ["?"])[0],
            quantization=quantization, hf_config=hf_config.to_dict(),
            image_token_id=image_token_id_of(hf_config),
            tokens_per_image=tokens_per_image(hf_config),
        )


def _eos_ids(path: Path, hf_config: Any) -> tuple[int, ...]:
    """EOS ids from generation_config.json where present (it may list several), else config."""
    eos: Any = None
    gen = path / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    if eos is None and getattr(hf_config, "text_config", None) is not None:
        eos = getattr(hf_config.text_config, "eos_token_id", None)  # LLaVA: the decoder's
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


@dataclass(frozen=True)
class CacheConfig:
    """How the paged KV cache is sized and whether prefixes are shared."""

    block_size: int
    kv_cache_memory_gb: float
    gpu_memory_utilization: float
    num_kv_blocks: int | None
    enable_prefix_caching: bool
    # the second KV tier: host memory (0: off) and an optional disk level
    kv_offloading_bytes: int = 0
    kv_offloading_path: Path | None = None
    kv_offloading_disk_bytes: int = 0


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits and the scheduling policy."""

    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    policy: str
    stream_interval: int
    max_loras: int = 0  # distinct LoRA adapters in one step; 0 when LoRA is off
    # image embeddings computed per step, and held by the encoder cache (0: text-only model)
    encoder_budget: int = 0
    encoder_cache_size: int = 0


@dataclass(frozen=True)
class MultiModalConfig:
    """Image inputs of a LLaVA model (vLLM's limit_mm_per_prompt, mm_processor_cache_gb)."""

    image_limit: int  # most images in one prompt
    processor_cache_gb: float  # client cache of preprocessed images; 0 turns it off
    image_token_id: int
    tokens_per_image: int
    allowed_local_media_path: Path | None = None


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA serving limits (set when enable_lora)."""

    max_loras: int  # adapter slots: distinct adapters in one step
    max_lora_rank: int
    max_cpu_loras: int  # adapters kept loaded in the core, LRU
    dtype: torch.dtype


@dataclass(frozen=True)
class DataParallelConfig:
    """Engine-core replicas behind one AsyncLLM client (data_parallel_size > 1)."""

    size: int
    backend: str  # "mp" (processes on this machine) or "ray" (actors on a Ray cluster)
    address: str | None  # the Ray cluster to join (None: RAY_ADDRESS or a local one)
    routing: str  # "prefix_aware" or "round_robin"

    @property
    def kv_cache_events(self) -> bool:
        """Whether each replica reports its prefix cache's changes (the router's index)."""
        return self.routing == "prefix_aware"


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, validated and frozen."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    log_stats: bool = True
    num_threads: int | None = None
    lora_config: LoRAConfig | None = None
    mm_config: MultiModalConfig | None = None
    enable_sleep_mode: bool = False
    structured_outputs_config: StructuredOutputsConfig = field(
        default_factory=StructuredOutputsConfig)
    observability_config: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    attention_backend: str | None = None  # None: chosen at start (attention_backends)
    enforce_eager: bool = False  # no CUDA graphs of decode steps
    tensor_parallel_size: int = 1  # ranks the model is split over (kvflow.distributed)
    data_parallel_config: DataParallelConfig | None = None
    speculative_config: SpeculativeConfig | None = None


@dataclass
class AsyncEngineArgs(EngineArgs):
    """EngineArgs plus what only the asyncio engine needs."""

    multiprocess: bool = _arg(True, "run the engine core in its own process (off: a thread)")
    disable_log_requests: bool = _arg(False, "do not log each request's arrival and end")

"""Llama-family decoder (Llama, Mistral, Qwen2) over a paged KV cache.

Parameter names follow Hugging Face checkpoints except two fusions made at load time:
q/k/v projections become `qkv_proj` and gate/up become `gate_up_proj` (one matmul each).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.errors import ModelLoadError
from kvflow.model import cpu_kernels
from kvflow.model.attention import AttentionMetadata, paged_attention
from kvflow.model.layers import (
    INT8_GEMV_MAX_TOKENS,
    CpuLinear,
    GatedMLP,
    LoRAHook,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    linear,
    rope_parameters,
)
from kvflow.model.quant import Int8Linear

# Checkpoint projection name -> (fused parameter name, shard index inside it).
_FUSED_SHARDS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

# What LoRA adapters may target, by kvflow projection: the checkpoint projections fused in it.
LORA_TARGETS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}

# make(layer index, kvflow projection name, input features, output width of each part)
MakeLoRAHook = Callable[[int, str, int, list[int]], LoRAHook]
# Sums a tensor over the tensor-parallel ranks, in place (kvflow.distributed provides it).
AllReduce = Callable[[torch.Tensor], None]


def head_dim_of(config: Any) -> int:
    """Per-head size: explicit in newer configs, else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config: Any) -> int | None:
    """The attention window where it is shorter than the model's positions, else None.

    kvflow attends over whole contexts, which equals sliding-window attention as long as a
    sequence fits the window: ModelConfig caps max_model_len at it.
    """
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None  # Qwen2 keeps a window size around but switches it off.
    max_positions = getattr(config, "max_position_embeddings", None)
    if window is not None and (max_positions is None or window < max_positions):
        return int(window)
    return None


def check_config(config: Any) -> None:
    """Refuse configs whose features this implementation would silently get wrong."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"activation '{act}' is not supported; only 'silu' is")
    rope_parameters(config)  # raises for rope scaling types we do not implement


class LlamaAttention(nn.Module):
    """Self-attention with grouped KV heads, rotary positions and a paged KV cache."""

    def __init__(self, config: Any, qkv_bias: bool, output_bias: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = linear(config.hidden_size, self.q_size + 2 * self.kv_size, qkv_bias)
        self.o_proj = linear(self.q_size, config.hidden_size, output_bias)
        self.qkv_lora: LoRAHook | None = None  # set by LlamaForCausalLM.set_lora_hooks
        self.o_lora: LoRAHook | None = None

    def shard_sizes(self) -> list[int]:
        return [self.q_size, self.kv_size, self.kv_size]

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, ...],
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, q_size + 2 * kv_size]
        if metadata.lora is not None and self.qkv_lora is not None:
            self.qkv_lora.add_(qkv, hidden, metadata.lora)
        if metadata.cpu_kernel:  # rotary in place and the cache write: one C call
            cos, sin = rotary
            cpu_kernels.rotary_cache_write(qkv, cos, sin, kv_cache, metadata.slot_mapping,
                                           self.num_heads)
        q, k, v = qkv.split(self.shard_sizes(), dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, hd]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, KvH, hd]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, KvH, hd]
        if not metadata.cpu_kernel:
            q, k = apply_rotary(q, k, *rotary)
        out = paged_attention(q, k, v, kv_cache, metadata, self.scale,
                              cache_written=metadata.cpu_kernel)  # [T, H, hd]
        flat = out.reshape(num_tokens, self.q_size)  # [T, q_size]
        projected = self.o_proj(flat)  # [T, hidden]
        if metadata.lora is not None and self.o_lora is not None:
            self.o_lora.add_(projected, flat, metadata.lora)
        return projected


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Any, qkv_bias: bool) -> None:
        super().__init__()
        attention_bias = bool(getattr(config, "attention_bias", False))
        self.self_attn = LlamaAttention(config, qkv_bias or attention_bias, attention_bias)
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, bool(getattr(config, "mlp_bias", False))
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Tensor parallelism (set by set_all_reduce): sums, in place, the ranks' partial
        # outputs of the row-parallel o and down projections.
        self.all_reduce: AllReduce | None = None

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rotary: tuple[torch.Tensor, ...],
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, residual stream before it); the next layer (or the final
        norm) adds the two. The residual is None for the first layer."""
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rotary, kv_cache, metadata)
        if self.all_reduce is not None:
            self.all_reduce(hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        hidden = self.mlp(hidden, metadata.lora)  # [T, hidden]
        if self.all_reduce is not None:
            self.all_reduce(hidden)
        return hidden, residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm."""

    def __init__(self, config: Any, qkv_bias: bool) -> None:
        super().__init__()
        # nn.Embedding's own init on the meta device (where the loader builds models) goes
        # through torch._refs, which imports torch._dynamo and sympy: ~50 MB resident in the
        # engine core for a table the checkpoint overwrites. Given its table, it skips that.
        table = torch.empty(config.vocab_size, config.hidden_size)
        if not table.is_meta:
            nn.init.normal_(table)  # what nn.Embedding would do
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, qkv_bias) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), *rope_parameters(config))
        self._c_layers: list[cpu_kernels.DecodeLayer] | None = None  # see _c_decode_layers
        # The activations' dtype when it is not the weights': float32 for bfloat16 weights on
        # a CPU without bf16 arithmetic (set by the loader), where torch's bf16 ops are
        # emulated and a 512-token prefill ran 0.78-0.87x as fast as float32.
        self.activation_dtype: torch.dtype | None = None
        self.all_reduce: AllReduce | None = None  # tensor parallelism: see set_all_reduce

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # [T, hidden]; given embeddings replace the lookup (images' rows in a LLaVA model)
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.activation_dtype is not None:
            hidden = hidden.to(self.activation_dtype)
        # cos, sin: [T, hd] each; the C kernels take them in float32 whatever the model's dtype
        rotary = self.rotary_emb(positions, torch.float32 if metadata.cpu_kernel else hidden.dtype)
        c_layers = self._c_decode_layers(metadata)
        if c_layers is not None:
            return self._decode_in_c(c_layers, hidden, rotary, kv_caches, metadata)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, rotary, kv_cache, metadata)
        return self.norm(hidden, residual)[0]  # [T, hidden]


    def _c_decode_layers(self, metadata: AttentionMetadata) -> list[cpu_kernels.DecodeLayer] | None:
        """Whole-layer C calls serve this step: decodes only, few enough tokens, every layer
        on the CPU kernels (float32, bfloat16 or int8 projections). Built once, rebuilt if
        weights move."""
        if not (metadata.cpu_kernel and not metadata.prefills and len(metadata.decodes) == 1):
            return None
        first = self.layers[0]
        assert isinstance(first, LlamaDecoderLayer)
        attn = first.self_attn
        qkv = attn.qkv_proj
        limit = (qkv.gemv_max if isinstance(qkv, CpuLinear)
                 else INT8_GEMV_MAX_TOKENS if isinstance(qkv, Int8Linear) else 0)
        if metadata.num_tokens > limit:
            return None
        if self._c_layers is None or self._c_layers[0].address != _weight_of(attn.qkv_proj):
            self._c_layers = [self._c_layer(layer) for layer in self.layers]  # type: ignore[arg-type]
        if metadata.lora is not None and self._c_layers[0].lora is None:
            return None  # adapters the C layer cannot read: the per-op path applies them
        return self._c_layers

    @staticmethod
    def _c_layer(layer: LlamaDecoderLayer) -> cpu_kernels.DecodeLayer:
        attn, mlp = layer.self_attn, layer.mlp
        projections = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        if len({type(p) for p in projections}) != 1:
            raise ValueError("decode layer kernel needs one kind of projection per layer")
        parts = [(p.qweight, p.scale, p.bias) if isinstance(p, Int8Linear)
                 else (p.weight, None, p.bias) for p in projections]
        dims = (attn.o_proj.out_features, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                mlp.intermediate_size)
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        hooks = [attn.qkv_lora, attn.o_lora, mlp.gate_up_lora, mlp.down_lora]
        lora = None
        if all(hook is not None and hook.a.dtype == torch.float32 for hook in hooks):
            lora = [(hook.a, hook.b) for hook in hooks]  # type: ignore[union-attr]
        return cpu_kernels.DecodeLayer(norms, parts, dims, layer.input_layernorm.eps, attn.scale,
                                       lora)

    def _decode_in_c(self, c_layers: list[cpu_kernels.DecodeLayer], hidden: torch.Tensor,
                     rotary: tuple[torch.Tensor, ...], kv_caches: list[torch.Tensor],
                     metadata: AttentionMetadata) -> torch.Tensor:
        # [T, hidden] float32 (whatever the weights' dtype), overwritten by each layer's output
        hidden = hidden.float().contiguous()
        residual = torch.zeros_like(hidden)  # the residual stream, accumulated in place
        cos, sin = rotary
        group = metadata.decodes[0]
        scratch = hidden.new_empty(hidden.shape[0] * c_layers[0].scratch_per_token)
        lora_slots = None if metadata.lora is None else metadata.lora.token_slots

        def run(layer: cpu_kernels.DecodeLayer, kv_cache: torch.Tensor, part: int) -> None:
            cpu_kernels.decode_layer(layer, hidden, residual, cos, sin, kv_cache,
                                     metadata.slot_mapping, group.blocks, group.seq_lens, scratch,
                                     lora_slots, part)

        for layer, kv_cache in zip(c_layers, kv_caches, strict=True):
            if self.all_reduce is None:
                run(layer, kv_cache, 0)
                continue
            # tensor parallel: the layer in two calls, split where the ranks' sums meet
            run(layer, kv_cache, 1)
            self.all_reduce(hidden)
            run(layer, kv_cache, 2)
            self.all_reduce(hidden)
        return self.norm(hidden, residual)[0]  # [T, hidden]


def _weight_of(projection: nn.Module) -> int:
    weight = projection.qweight if isinstance(projection, Int8Linear) else projection.weight
    assert isinstance(weight, torch.Tensor)
    return weight.data_ptr()


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head; Mistral and Qwen2 (qkv_bias=True) share this code."""

    def __init__(self, config: Any, qkv_bias: bool = False) -> None:
        super().__init__()
        check_config(config)
        self.config = config
        self.num_layers: int = config.num_hidden_layers
        self.num_kv_heads: int = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.vocab_size: int = config.vocab_size
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.model = LlamaModel(config, qkv_bias)
        # Tied models read the embedding matrix directly instead of sharing a Parameter,
        # which would come apart when the loader materializes meta tensors.
        self.lm_head = (
            None
            if self.tie_word_embeddings
            else linear(config.hidden_size, config.vocab_size, False)
        )
        # A tied head's own copy in a faster format (int8, oneDNN-packed), set by
        # kvflow.model.quant or use_cpu_kernels_; the embedding keeps the float table.
        self.tied_head: nn.Module | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] of the flattened new tokens of a step.
        `inputs_embeds` [T, hidden], when given, replaces the token embedding lookup."""
        return self.model(input_ids, positions, kv_caches, attn_metadata, inputs_embeds)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # [T, hidden]

    def set_lora_hooks(self, make: MakeLoRAHook) -> None:
        """Give every projection LoRA can target its adapter hook (see LORA_TARGETS)."""
        for index, layer in enumerate(self.model.layers):
            assert isinstance(layer, LlamaDecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            q, kv, inter = attn.q_size, attn.kv_size, mlp.intermediate_size
            hidden = self.config.hidden_size
            attn.qkv_lora = make(index, "qkv_proj", hidden, [q, kv, kv])
            attn.o_lora = make(index, "o_proj", q, [hidden])
            mlp.gate_up_lora = make(index, "gate_up_proj", hidden, [inter, inter])
            mlp.down_lora = make(index, "down_proj", inter, [hidden])
        self.model._c_layers = None  # rebuilt with the adapters' slot weights

    def set_all_reduce(self, all_reduce: AllReduce) -> None:
        """Tensor parallelism: each layer sums its row-parallel projections' outputs over
        the ranks (after attention and after the MLP, in both the per-op and C paths)."""
        self.model.all_reduce = all_reduce
        for layer in self.model.layers:
            assert isinstance(layer, LlamaDecoderLayer)
            layer.all_reduce = all_reduce

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [R, vocab] for selected hidden states [R, hidden]."""
        if self.tied_head is not None:
            return self.tied_head(hidden).float()
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return F.linear(hidden, self.model.embed_tokens.weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into the fused parameters."""
        params = dict(self.named_parameters())
        loaded: set[tuple[str, int]] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            target, shard = self._target_of(name)
            if target not in params:
                raise ModelLoadError(f"unexpected weight '{name}' in checkpoint")
            destination = self._shard_view(params[target], target, shard)
            if destination.shape != tensor.shape:
                raise ModelLoadError(
                    f"weight '{name}' has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(destination.shape)}"
                )
            with torch.no_grad():
                destination.copy_(tensor)
            loaded.add((target, shard))
        self._check_all_loaded(params, loaded)

    @staticmethod
    def _target_of(name: str) -> tuple[str, int]:
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _FUSED_SHARDS:
            fused, shard = _FUSED_SHARDS[parts[-2]]
            return ".".join([*parts[:-2], fused, parts[-1]]), shard
        return name, -1

    def _shard_view(self, param: torch.Tensor, name: str, shard: int) -> torch.Tensor:
        if shard < 0:
            return param
        if ".qkv_proj." in name:
            kv_size = self.num_kv_heads * self.head_dim
            sizes = [param.shape[0] - 2 * kv_size, kv_size, kv_size]
        else:
            sizes = [param.shape[0] // 2] * 2
        return param.split(sizes, dim=0)[shard]

    @staticmethod
    def _check_all_loaded(params: Mapping[str, torch.Tensor], loaded: set[tuple[str, int]]) -> None:
        missing = []
        for name in params:
            fused = [(part, shard) for part, (f, shard) in _FUSED_SHARDS.items() if f"{f}." in name]
            if not fused and (name, -1) not in loaded:
                missing.append(name)
            for part, shard in fused:
                if (name, shard) not in loaded:
                    missing.append(name.replace(_FUSED_SHARDS[part][0], part))
        if missing:
            shown = ", ".join(missing[:5])
            raise ModelLoadError(f"checkpoint is missing {len(missing)} weights, e.g. {shown}")

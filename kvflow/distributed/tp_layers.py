"""A rank's shard of a Llama-family model: checkpoint tensors sliced as they are read, and
the vocabulary-parallel embedding and LM head.

    q/k/v, gate/up   column-parallel: this rank's rows (its heads, its FFN columns)
    o, down          row-parallel: this rank's input columns; the outputs are partial sums,
                     all-reduced by the decoder layer's hook (model.set_all_reduce)
    embedding        this rank's vocabulary rows; other ids give zero rows, all-reduced
    LM head          this rank's vocabulary rows; the logits slices are gathered to rank 0
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.distributed.parallel_state import ModelShards, Shard, TensorParallelGroup

Weights = Iterator[tuple[str, torch.Tensor]]


def _rows(shard: Shard, per: int) -> slice:
    return slice(shard.start * per, shard.stop * per)


def slice_weight(name: str, tensor: torch.Tensor, shards: ModelShards) -> torch.Tensor:
    """This rank's part of one checkpoint tensor (a view; the loader copies it in place)."""
    parts = name.split(".")
    projection = parts[-2] if len(parts) >= 2 else ""
    is_bias = parts[-1] == "bias"
    hd = shards.head_dim
    if projection == "q_proj":
        return tensor[_rows(shards.q_heads, hd)]
    if projection in ("k_proj", "v_proj"):
        return tensor[_rows(shards.kv_heads, hd)]
    if projection in ("gate_proj", "up_proj"):
        return tensor[_rows(shards.intermediate, 1)]
    if projection in ("o_proj", "down_proj"):
        if is_bias:  # added once: by rank 0; the others' partial sums carry none
            return tensor if shards.rank == 0 else torch.zeros_like(tensor)
        cols = _rows(shards.q_heads, hd) if projection == "o_proj" \
            else _rows(shards.intermediate, 1)
        return tensor[:, cols]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return tensor[shards.vocab.start:shards.vocab.stop]
    return tensor  # norms: every rank holds them whole


def weight_filter(shards: ModelShards) -> Callable[[Weights], Weights]:
    """The loader's `shard` argument: each tensor sliced as soon as it is read, so a rank
    never holds more than one whole checkpoint tensor at a time."""

    def shard(weights: Weights) -> Weights:
        for name, tensor in weights:
            yield name, slice_weight(name, tensor, shards)

    return shard


class VocabParallelEmbedding(nn.Module):
    """Embedding over this rank's vocabulary rows: ids outside them give zero rows, and the
    all-reduce fills each row from the rank that holds it."""

    def __init__(self, weight: torch.Tensor, vocab: Shard, group: TensorParallelGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [vocab.size, hidden]
        self.vocab, self.group = vocab, group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab.start  # [T]
        outside = (local < 0) | (local >= self.vocab.size)  # [T]
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)  # [T, hidden]
        rows = rows.float() if rows.dtype != torch.float32 and rows.device.type == "cpu" \
            else rows
        rows.masked_fill_(outside[:, None], 0.0)
        self.group.all_reduce(rows)
        return rows.to(self.weight.dtype)


class VocabParallelHead(nn.Module):
    """LM head over this rank's vocabulary rows; rank 0 gathers every rank's logits slice
    (padded to one width) and returns [R, vocab]. Other ranks return their own slice."""

    def __init__(self, local_head: Callable[[torch.Tensor], torch.Tensor],
                 shards: ModelShards, vocab_size: int, group: TensorParallelGroup) -> None:
        super().__init__()
        self.local_head, self.shards, self.group = local_head, shards, group
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.local_head(hidden).float()  # [R, vocab.size]
        pad = self.shards.vocab_per_rank - local.shape[1]
        if pad:
            local = F.pad(local, (0, pad))  # [R, vocab_per_rank]
        parts = self.group.gather_to_first(local.contiguous())
        if parts is None:
            return local
        return torch.cat(parts, dim=1)[:, :self.vocab_size]  # [R, vocab]


def install_(model: nn.Module, shards: ModelShards, vocab_size: int,
             group: TensorParallelGroup) -> None:
    """Turn a loaded shard into a tensor-parallel model, in place: the all-reduce hooks,
    the vocabulary-parallel embedding and LM head."""
    decoder = model.get_submodule("model")
    table = decoder.get_submodule("embed_tokens").weight.data
    assert isinstance(table, torch.Tensor)
    decoder.embed_tokens = VocabParallelEmbedding(table, shards.vocab, group)
    head: Callable[[torch.Tensor], torch.Tensor]
    tied_head = getattr(model, "tied_head", None)
    lm_head = getattr(model, "lm_head", None)
    if tied_head is not None:
        head = tied_head
    elif lm_head is not None:
        head = lm_head
    else:
        def head(hidden: torch.Tensor) -> torch.Tensor:
            return F.linear(hidden, table)

    model.tied_head = VocabParallelHead(head, shards, vocab_size, group)
    model.set_all_reduce(group.all_reduce)  # type: ignore[operator]

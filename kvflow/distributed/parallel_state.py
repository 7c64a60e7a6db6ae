"""Tensor-parallel ranks: each rank's share of a Llama-family model, and the group's
collectives (torch.distributed: gloo on the CPU, NCCL on GPUs; a shared-memory all-reduce
for CPU ranks on one machine)."""

from __future__ import annotations

import ctypes
import datetime
import mmap
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# The step message's first broadcast: 8 bytes of length, then the message. A step that
# does not fit (a long prefill with many block tables) sends the rest in a second one.
HEAD_BYTES = 16384
# A collective that waits longer than this gives up (a rank hung or died).
TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Shard:
    """The contiguous range [start, stop) of a dimension one rank holds."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def split_evenly(total: int, parts: int, rank: int) -> Shard:
    """Rank's share of `total` units; the first `total % parts` ranks get one more."""
    base, extra = divmod(total, parts)
    start = rank * base + min(rank, extra)
    return Shard(start, start + base + (1 if rank < extra else 0))


def check_shardable(hf_config: dict[str, Any], world: int) -> None:
    """ValueError unless every rank can hold at least one KV head (with its query heads)."""
    kv_heads = int(hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"])
    if world > kv_heads:
        raise ValueError(f"tensor_parallel_size {world} exceeds the model's {kv_heads} KV "
                         "heads: each rank needs at least one KV head")


@dataclass(frozen=True)
class ModelShards:
    """What one rank holds of a Llama-family model, Megatron style: query heads by whole
    KV-head groups and FFN columns (column-parallel q/k/v and gate/up, row-parallel o and
    down), and a slice of the vocabulary (embedding and LM head). Shares may be uneven:
    3 KV heads over 2 ranks are 2 and 1."""

    rank: int
    world: int
    head_dim: int
    kv_heads: Shard
    q_heads: Shard
    intermediate: Shard
    vocab: Shard
    vocab_per_rank: int  # every rank's logits are padded to this width to be gathered

    @classmethod
    def of(cls, hf_config: dict[str, Any], rank: int, world: int) -> ModelShards:
        check_shardable(hf_config, world)
        heads = int(hf_config["num_attention_heads"])
        kv_heads = int(hf_config.get("num_key_value_heads") or heads)
        head_dim = int(hf_config.get("head_dim") or hf_config["hidden_size"] // heads)
        kv = split_evenly(kv_heads, world, rank)
        group = heads // kv_heads  # query heads per KV head
        vocab = int(hf_config["vocab_size"])
        per_rank = -(-vocab // world)
        return cls(rank=rank, world=world, head_dim=head_dim, kv_heads=kv,
                   q_heads=Shard(kv.start * group, kv.stop * group),
                   intermediate=split_evenly(int(hf_config["intermediate_size"]), world, rank),
                   vocab=Shard(min(vocab, rank * per_rank), min(vocab, (rank + 1) * per_rank)),
                   vocab_per_rank=per_rank)

    def local_config(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        """The config of this rank's model: its heads, FFN columns and vocabulary slice."""
        return dict(hf_config, num_attention_heads=self.q_heads.size,
                    num_key_value_heads=self.kv_heads.size,
                    intermediate_size=self.intermediate.size, head_dim=self.head_dim,
                    vocab_size=self.vocab.size)


class SharedMemoryAllReduce:
    """The C all-reduce over a shared area (csrc/shm_all_reduce.c) for CPU ranks on one
    machine. The area is a memfd the engine core creates and hands to its workers."""

    def __init__(self, fd: int, rank: int, world: int, capacity: int) -> None:
        from kvflow.model import cpu_kernels

        lib = cpu_kernels.load()
        if lib is None:
            raise RuntimeError("the shared-memory all-reduce needs kvflow's C kernels")
        self.lib, self.rank, self.world, self.capacity = lib, rank, world, capacity
        self.map = mmap.mmap(fd, area_bytes(world, capacity))
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.round = 0

    def __call__(self, tensor: torch.Tensor) -> None:
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        self.round += 1
        failed = self.lib.kvflow_shm_all_reduce(self.address, self.rank, self.world,
                                                self.capacity, self.round, tensor.data_ptr(),
                                                tensor.numel(), TIMEOUT_S)
        if failed:
            raise RuntimeError("tensor-parallel all-reduce gave up: a rank died or hung")

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's tensor on rank 0, in rank order (None on the other ranks)."""
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        self.round += 1
        out = torch.empty(self.world, *tensor.shape) if self.rank == 0 else None
        failed = self.lib.kvflow_shm_gather(self.address, self.rank, self.world, self.capacity,
                                            self.round, tensor.data_ptr(), tensor.numel(),
                                            None if out is None else out.data_ptr(), TIMEOUT_S)
        if failed:
            raise RuntimeError("tensor-parallel gather gave up: a rank died or hung")
        return None if out is None else list(out.unbind(0))

    def abort(self) -> None:
        """Wake every rank waiting in an all-reduce with a failure (a rank died)."""
        self.lib.kvflow_shm_set_abort(self.address, self.world)


def area_bytes(world: int, capacity: int) -> int:
    """Size of the shared area: one 64-byte line per rank and the abort line, then two
    buffer sets of `world` slots of `capacity` float32 values."""
    return 64 * (world + 1) + 2 * world * capacity * 4


def create_shared_area(world: int, capacity: int) -> int:
    """A zeroed anonymous shared-memory file (memfd: nothing in /dev/shm to leak)."""
    fd = os.memfd_create("kvflow-tp-all-reduce")
    os.ftruncate(fd, area_bytes(world, capacity))
    return fd


class TensorParallelGroup:
    """This process's rank in the group and the collectives the sharded model needs.

    Counts the calls of each collective and the seconds spent in them (`calls`, `seconds`;
    on rank 0 that includes waiting for slower ranks), which the benchmark reports."""

    def __init__(self, store: Any, rank: int, world: int, device: torch.device,
                 shm: SharedMemoryAllReduce | None = None) -> None:
        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        self.rank, self.world, self.device = rank, world, device
        # (typed Any: torch's stubs lack the backends' collective methods)
        self.cpu: Any = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, world,
                                              timeout)
        self.tensors: Any = self.cpu
        if device.type == "cuda":  # tensors on the GPUs meet over NCCL; step bytes over gloo
            self.tensors = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, world,
                                                 dist.ProcessGroupNCCL.Options())
        self.shm = shm
        self.head = torch.zeros(HEAD_BYTES, dtype=torch.uint8)
        self.calls = dict.fromkeys(("all_reduce", "broadcast", "gather"), 0)
        self.seconds = dict.fromkeys(("all_reduce", "broadcast", "gather"), 0.0)

    def _count(self, name: str, start: float) -> None:
        self.calls[name] += 1
        self.seconds[name] += time.perf_counter() - start

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum over the ranks, in place; every rank ends with the same values."""
        start = time.perf_counter()
        if self._fits_shm(tensor):
            assert self.shm is not None
            self.shm(tensor)
        else:
            self.tensors.allreduce([tensor]).wait()
        self._count("all_reduce", start)

    def _fits_shm(self, tensor: torch.Tensor) -> bool:
        """Whether the shared area takes this tensor (the same answer on every rank: the
        ranks' tensors have the same shape)."""
        return (self.shm is not None and tensor.dtype == torch.float32
                and tensor.numel() <= self.shm.capacity and tensor.is_contiguous())

    def broadcast_bytes(self, payload: bytes | None) -> bytes:
        """Rank 0's payload on every rank: one broadcast when it fits HEAD_BYTES."""
        start = time.perf_counter()
        head = self.head.numpy()  # shares the tensor's memory
        room = HEAD_BYTES - 8
        if self.rank == 0:
            assert payload is not None
            head[:8] = np.frombuffer(len(payload).to_bytes(8, "little"), dtype=np.uint8)
            head[8:8 + min(len(payload), room)] = np.frombuffer(payload[:room], dtype=np.uint8)
        self.cpu.broadcast([self.head], dist.BroadcastOptions()).wait()
        length = int.from_bytes(head[:8].tobytes(), "little")
        data = head[8:8 + min(length, room)].tobytes()
        if length > room:  # the rest of a long step
            rest = np.zeros(length - room, dtype=np.uint8)
            if self.rank == 0:
                assert payload is not None
                rest[:] = np.frombuffer(payload[room:], dtype=np.uint8)
            self.cpu.broadcast([torch.from_numpy(rest)], dist.BroadcastOptions()).wait()
            data += rest.tobytes()
        self._count("broadcast", start)
        return data

    def gather_to_first(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's tensor (same shape on all) on rank 0, in rank order; None elsewhere."""
        start = time.perf_counter()
        if self._fits_shm(tensor):
            assert self.shm is not None
            parts = self.shm.gather(tensor)
            self._count("gather", start)
            return parts
        options = dist.GatherOptions()
        options.rootRank = 0
        if self.rank == 0:
            parts = [torch.empty_like(tensor) for _ in range(self.world)]
            self.tensors.gather([parts], [tensor], options).wait()
        else:
            parts = None
            self.tensors.gather([], [tensor], options).wait()
        self._count("gather", start)
        return parts

    def minimum(self, value: int) -> int:
        """The smallest of the ranks' values, on every rank."""
        tensor = torch.tensor([value], dtype=torch.int64)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN  # type: ignore[assignment]
        self.cpu.allreduce([tensor], options).wait()
        return int(tensor.item())

    def abort(self) -> None:
        if self.shm is not None:
            self.shm.abort()

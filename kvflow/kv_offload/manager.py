"""The second KV tier: evicted prefix blocks kept in host memory (and on disk), loaded back.

    KV cache (first tier) ──evict a hashed block──► store(): copy it out now, before the
        ▲                                           block is reused (a memcpy per block)
        │                                           host tier: LRU by bytes
        │ load thread: host or disk ─► blocks        disk tier: written by a thread, LRU
        └── the scheduler schedules the request only once its loads are done

Blocks are keyed by the prefix cache's own block hashes (stable across restarts); the disk
tier's folder is named by the model key (weights, dtype, block size, layout), so another
model's files are never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from kvflow.kv_offload.disk import DiskTier

logger = logging.getLogger(__name__)

# layer tensors [2, num_blocks, block_size, num_kv_heads, head_dim]
KVCaches = Callable[[], list[torch.Tensor]]


@dataclass(frozen=True)
class OffloadConfig:
    """vLLM's kv_offloading_size (GiB of host memory), plus kvflow's disk level."""

    host_bytes: int
    disk_path: Path | None = None
    disk_bytes: int = 0


@dataclass
class OffloadStats:
    """Totals since start (SchedulerStats carries them to metrics)."""

    blocks_stored: int = 0
    blocks_loaded: int = 0
    bytes_stored: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    hit_blocks: int = 0  # blocks found in the second tier for an admitted request


def model_key(model_path: Path, dtype: torch.dtype, block_shape: Sequence[int],
              quantization: str | None = None) -> bytes:
    """What makes stored KV reusable: the model's files (config and, per weight file, name,
    size and the digest of its first and last MiB), the dtype, the weights' quantization
    (int8 weights compute other KV) and the block layout."""
    h = hashlib.blake2b(digest_size=32)
    h.update(f"kvflow-kv-1|{dtype}|{quantization}|{tuple(block_shape)}".encode())
    folder = Path(model_path)
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        h.update(f"|{file.name}|{size}|".encode())
        with open(file, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.digest()


class OffloadManager:
    """Stores evicted blocks, answers lookups, and loads blocks back in a thread."""

    def __init__(self, config: OffloadConfig, kv_caches: KVCaches, key: bytes) -> None:
        self.config = config
        self.kv_caches = kv_caches
        self.host: OrderedDict[int, torch.Tensor] = OrderedDict()  # hash -> [L, 2, bs, h, d]
        self.host_size = 0
        self.disk = (DiskTier(config.disk_path, key, config.disk_bytes)
                     if config.disk_path is not None and config.disk_bytes > 0 else None)
        self.lock = threading.Lock()  # host and disk indexes: the step thread and the workers
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="kvflow-kv-write")
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="kvflow-kv-load")
        self.loads: dict[str, Future[bool]] = {}  # request id -> its load
        self.stats = OffloadStats()

    # ---- store (step thread, at eviction) ----------------------------------------------
    def store(self, block_id: int, block_hash: int, write_now: bool = False) -> None:
        """Copy a block out of the KV cache before it is reused (`write_now`: its disk write
        in this thread, as at shutdown, when the writer thread may be gone)."""
        with self.lock:
            if block_hash in self.host:
                self.host.move_to_end(block_hash)
                return
        caches = self.kv_caches()
        block = torch.stack([c[:, block_id] for c in caches]).cpu()  # [L, 2, bs, h, d]
        nbytes = block.numel() * block.element_size()
        with self.lock:
            self.host[block_hash] = block
            self.host_size += nbytes
            while self.host_size > self.config.host_bytes and self.host:
                _, old = self.host.popitem(last=False)
                self.host_size -= old.numel() * old.element_size()
        self.stats.blocks_stored += 1
        self.stats.bytes_stored += nbytes
        if self.disk is not None and write_now:
            self._write(block_hash, block)
        elif self.disk is not None:  # written through, so a restart finds it
            self.writer.submit(self._write, block_hash, block)

    def _write(self, block_hash: int, block: torch.Tensor) -> None:
        assert self.disk is not None
        self.stats.bytes_stored += self.disk.write(block_hash, block)

    # ---- lookup and load ---------------------------------------------------------------
    def count_hits(self, hashes: Sequence[int]) -> int:
        """How many of these consecutive blocks the tier holds, from the first on."""
        count = 0
        for block_hash in hashes:
            with self.lock:
                in_host = block_hash in self.host
            if not in_host and (self.disk is None or block_hash not in self.disk):
                break
            count += 1
        return count

    def start_load(self, request_id: str, blocks: Sequence[tuple[int, int]]) -> None:
        """Copy (block id, hash) blocks back into the KV cache in the load thread."""
        self.stats.hit_blocks += len(blocks)
        self.loads[request_id] = self.loader.submit(self._load, list(blocks))

    def _load(self, blocks: list[tuple[int, int]]) -> bool:
        start = time.perf_counter()
        found = []
        for _, block_hash in blocks:
            with self.lock:
                block = self.host.get(block_hash)
            if block is None and self.disk is not None:
                block = self.disk.read(block_hash)
            if block is None:
                return False  # evicted (or a bad file) meanwhile: the request recomputes
            found.append(block)
        # one copy per layer for the whole load: each op takes the GIL, which the step
        # thread holds most of the time
        stacked = torch.stack(found, dim=2)  # [L, 2, n, bs, h, d]
        ids = torch.tensor([block_id for block_id, _ in blocks])
        for layer, cache in enumerate(self.kv_caches()):
            cache.index_copy_(1, ids.to(cache.device), stacked[layer].to(cache.device))
        self.stats.blocks_loaded += len(found)
        self.stats.bytes_loaded += stacked.numel() * stacked.element_size()
        self.stats.load_seconds += time.perf_counter() - start
        return True

    def finished_loads(self) -> list[tuple[str, bool]]:
        """(request id, every block loaded) of the loads done since the last call."""
        done = [(rid, f) for rid, f in self.loads.items() if f.done()]
        for rid, _ in done:
            del self.loads[rid]
        return [(rid, bool(f.result())) for rid, f in done]

    def wait_any(self, timeout: float) -> None:
        """Block until some load is done (or `timeout` s): an engine with nothing else to do
        waits here instead of spinning, which would starve the load thread of the GIL."""
        if self.loads:
            wait(list(self.loads.values()), timeout, return_when=FIRST_COMPLETED)

    def contains(self, block_hash: int) -> bool:
        return self.count_hits([block_hash]) == 1

    def wait(self, request_id: str) -> bool:
        """Block until the request's load is done (an abort waits for its copies)."""
        future = self.loads.pop(request_id, None)
        return future is None or bool(future.result())

    def flush(self) -> None:
        """Wait for the disk writes queued so far."""
        with contextlib.suppress(RuntimeError):  # shut down already: nothing is queued
            self.writer.submit(lambda: None).result()

    def close(self) -> None:
        self.writer.shutdown(wait=True)
        self.loader.shutdown(wait=True)

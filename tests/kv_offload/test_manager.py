"""OffloadManager with fake KV caches: a stored block comes back bit for bit into other
block ids in every layer, host memory is an LRU by bytes, the disk level keeps what host
memory evicts and survives a restart, and the stats count what moved."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvflow.kv_offload.manager import OffloadConfig, OffloadManager, model_key

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 8, 4, 2, 8
BLOCK_BYTES = LAYERS * 2 * BLOCK_SIZE * HEADS * HEAD_DIM * 4  # float32
KEY = b"k" * 32


def fake_caches(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, heads, head_dim] tensor per layer, no value twice."""
    per_layer = 2 * BLOCKS * BLOCK_SIZE * HEADS * HEAD_DIM
    return [(torch.arange(per_layer, dtype=torch.float32) + layer * per_layer)
            .view(2, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM).to(dtype) for layer in range(LAYERS)]


class Harness:
    """A manager over fake caches, with a snapshot of their initial contents."""

    def __init__(self, config: OffloadConfig, key: bytes = KEY,
                 dtype: torch.dtype = torch.float32) -> None:
        self.caches = fake_caches(dtype)
        self.original = [c.clone() for c in self.caches]
        self.manager = OffloadManager(config, lambda: self.caches, key)

    def load(self, blocks: list[tuple[int, int]], request_id: str = "r") -> bool:
        self.manager.start_load(request_id, blocks)
        return self.manager.wait(request_id)

    def assert_block(self, block_id: int, source_id: int) -> None:
        """Block `block_id` holds what block `source_id` held at the start, in every layer."""
        for layer, (cache, original) in enumerate(zip(self.caches, self.original, strict=True)):
            assert torch.equal(cache[:, block_id], original[:, source_id]), f"layer {layer}"

    def close(self) -> None:
        """The leak check: no load left, the threads stopped."""
        assert not self.manager.loads
        self.manager.close()


@pytest.fixture
def host_only() -> Iterator[Harness]:
    harness = Harness(OffloadConfig(host_bytes=2 * BLOCK_BYTES))
    yield harness
    harness.close()


def test_store_then_load_into_other_blocks(host_only: Harness) -> None:
    manager = host_only.manager
    manager.store(1, 101)
    manager.store(2, 102)
    for cache in host_only.caches:  # the stored blocks are reused and overwritten
        cache[:, 1:3].fill_(-1)
    assert manager.count_hits([101, 102]) == 2
    manager.start_load("r", [(5, 101), (6, 102)])
    deadline = time.monotonic() + 10
    while not (done := manager.finished_loads()):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert done == [("r", True)]
    host_only.assert_block(5, 1)
    host_only.assert_block(6, 2)
    for block_id in (0, 3, 4, 7):  # nothing else written
        host_only.assert_block(block_id, block_id)
    assert manager.finished_loads() == []


def test_bfloat16_blocks_round_trip() -> None:
    harness = Harness(OffloadConfig(host_bytes=BLOCK_BYTES), dtype=torch.bfloat16)
    harness.manager.store(0, 100)
    assert harness.load([(7, 100)])
    harness.assert_block(7, 0)
    harness.close()


def test_host_memory_is_an_lru_by_bytes(host_only: Harness) -> None:
    manager = host_only.manager
    for block_id, block_hash in ((1, 101), (2, 102), (3, 103)):
        manager.store(block_id, block_hash)
    assert manager.host_size == 2 * BLOCK_BYTES
    assert list(manager.host) == [102, 103]  # 101, the oldest, is gone
    manager.store(2, 102)  # present: no copy, but it becomes the most recently used
    manager.store(4, 104)
    assert list(manager.host) == [102, 104]
    assert manager.stats.blocks_stored == 4
    assert not host_only.load([(0, 101)])  # evicted: the request recomputes
    assert not host_only.load([(5, 102), (6, 103)])  # the second block is gone
    assert host_only.load([(6, 104)])
    host_only.assert_block(6, 4)


def test_count_hits_stops_at_the_first_missing_hash(host_only: Harness) -> None:
    manager = host_only.manager
    manager.store(1, 101)
    manager.store(2, 102)
    assert manager.count_hits([]) == 0
    assert manager.count_hits([999, 101]) == 0
    assert manager.count_hits([101, 999, 102]) == 1
    assert manager.count_hits([101, 102, 999]) == 2


def test_stats_count_blocks_and_bytes(host_only: Harness) -> None:
    manager = host_only.manager
    manager.store(1, 101)
    manager.store(2, 102)
    manager.store(1, 101)  # already held: not stored again
    assert host_only.load([(5, 101), (6, 102)])
    assert not host_only.load([(7, 999)], "missing")
    stats = manager.stats
    assert (stats.blocks_stored, stats.bytes_stored) == (2, 2 * BLOCK_BYTES)
    assert (stats.blocks_loaded, stats.bytes_loaded) == (2, 2 * BLOCK_BYTES)
    assert stats.hit_blocks == 3  # blocks asked for
    assert stats.load_seconds > 0


# ---- the disk level ------------------------------------------------------------------------
def disk_config(folder: Path) -> OffloadConfig:
    return OffloadConfig(host_bytes=BLOCK_BYTES, disk_path=folder, disk_bytes=1 << 20)


def test_a_block_evicted_from_host_memory_loads_from_disk(tmp_path: Path) -> None:
    harness = Harness(disk_config(tmp_path))
    manager = harness.manager
    manager.store(1, 101)
    manager.store(2, 102)  # host memory holds one block: 101 is left on disk only
    manager.flush()
    assert list(manager.host) == [102]
    assert manager.disk is not None and sorted(manager.disk.index) == [101, 102]
    assert manager.count_hits([101, 102]) == 2
    assert harness.load([(6, 101), (7, 102)])
    harness.assert_block(6, 1)
    harness.assert_block(7, 2)
    assert manager.stats.blocks_loaded == 2
    harness.close()


def test_a_restarted_manager_loads_what_the_first_wrote(tmp_path: Path) -> None:
    first = Harness(disk_config(tmp_path))
    for block_id in range(4):
        first.manager.store(block_id, 100 + block_id)
    first.manager.flush()
    first.close()
    del first
    second = Harness(disk_config(tmp_path))
    assert not second.manager.host
    assert second.manager.count_hits([100, 101, 102, 103, 104]) == 4
    for cache in second.caches:  # the restarted engine's KV cache holds something else
        cache.fill_(0)
    assert second.load([(7, 100), (4, 101), (5, 102), (6, 103)])
    for block_id, source in ((7, 0), (4, 1), (5, 2), (6, 3)):
        second.assert_block(block_id, source)
    assert second.manager.disk is not None and second.manager.disk.num_dropped == 0
    second.close()
    other = Harness(disk_config(tmp_path), key=b"o" * 32)  # another model: another folder
    assert other.manager.count_hits([100]) == 0
    assert not other.load([(0, 100)])
    other.close()


def test_a_bad_file_fails_the_load_and_is_dropped(tmp_path: Path) -> None:
    harness = Harness(OffloadConfig(host_bytes=0, disk_path=tmp_path, disk_bytes=1 << 20))
    manager = harness.manager
    manager.store(1, 101)
    manager.store(2, 102)
    manager.flush()
    assert not manager.host  # no host memory: disk only
    assert manager.disk is not None
    path = manager.disk._path(102)
    path.write_bytes(path.read_bytes()[:-1])
    assert manager.count_hits([101, 102]) == 2  # not read yet
    assert not harness.load([(5, 101), (6, 102)])
    assert manager.count_hits([101, 102]) == 1 and not path.exists()
    assert manager.disk.num_dropped == 1
    harness.close()


def test_model_key_names_weights_dtype_and_block_shape(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    (tmp_path / "model.safetensors").write_bytes(b"\1" * 1000)
    key = model_key(tmp_path, torch.float32, (2, 16, 2, 32))
    assert len(key) == 32
    assert key == model_key(tmp_path, torch.float32, (2, 16, 2, 32))
    assert key != model_key(tmp_path, torch.bfloat16, (2, 16, 2, 32))
    assert key != model_key(tmp_path, torch.float32, (2, 32, 2, 32))
    (tmp_path / "model.safetensors").write_bytes(b"\2" * 1000)
    assert key != model_key(tmp_path, torch.float32, (2, 16, 2, 32))

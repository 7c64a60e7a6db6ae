"""The disk level of the second KV tier: the block file format refuses anything but the
block it names, and DiskTier keeps an LRU of checked files that survives a restart; bad
files are dropped with a log line, another model's files are never seen."""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest
import torch

from kvflow.kv_offload.disk import (
    MAGIC,
    SUFFIX,
    VERSION,
    DiskTier,
    decode_block,
    encode_block,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SHAPE = (2, 2, 4, 2, 8)  # [layers, 2, block_size, kv heads, head_dim]
LOGGER = "kvflow.kv_offload.disk"


def block(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


FILE_BYTES = len(encode_block(KEY, 1, block(0)))


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_tier_consistent(tier: DiskTier) -> None:
    """The index is exactly the folder's block files, and its size their bytes."""
    files = {int(p.stem, 16): p.stat().st_size for p in tier.folder.glob(f"*{SUFFIX}")}
    assert dict(tier.index) == files
    assert tier.size == sum(files.values()) <= tier.capacity
    assert not [p for p in tier.folder.iterdir() if p.suffix != SUFFIX]  # no temporary files


# ---- the file format ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_decode_round_trip(dtype: torch.dtype) -> None:
    original = block(1, dtype)
    decoded = decode_block(encode_block(KEY, 123, original), KEY, 123)
    assert decoded.dtype == dtype and decoded.shape == original.shape
    assert torch.equal(decoded, original)


def test_a_non_contiguous_block_round_trips() -> None:
    original = block(2).transpose(3, 4)  # [2, 2, 4, 8, 2], not contiguous
    assert torch.equal(decode_block(encode_block(KEY, 5, original), KEY, 5), original)


def corrupt(data: bytes, what: str) -> bytes:
    if what == "empty":
        return b""
    if what == "header only":
        return data[:40]
    if what == "truncated":
        return data[:-1]
    if what == "one more byte":
        return data + b"\0"
    if what == "payload byte":
        return data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]
    if what == "magic":
        return b"X" + data[1:]
    assert what == "version"
    return MAGIC + struct.pack("<I", VERSION + 1) + data[len(MAGIC) + 4:]


@pytest.mark.parametrize("what", ["empty", "header only", "truncated", "one more byte",
                                  "payload byte", "magic", "version"])
def test_decode_refuses_damaged_bytes(what: str) -> None:
    data = encode_block(KEY, 7, block(3))
    with pytest.raises(ValueError):
        decode_block(corrupt(data, what), KEY, 7)


def test_decode_refuses_another_model_or_block() -> None:
    data = encode_block(KEY, 7, block(3))
    with pytest.raises(ValueError, match="another model"):
        decode_block(data, OTHER_KEY, 7)
    with pytest.raises(ValueError, match="another block"):
        decode_block(data, KEY, 8)


# ---- DiskTier ------------------------------------------------------------------------------
def test_write_then_read(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, KEY, 10 * FILE_BYTES)
    assert tier.folder.parent == tmp_path
    assert tier.read(1) is None and 1 not in tier
    assert tier.write(1, block(1)) == FILE_BYTES
    assert tier.write(1, block(1)) == 0  # already there
    assert 1 in tier
    read = tier.read(1)
    assert read is not None and torch.equal(read, block(1))
    assert tier.num_dropped == 0
    assert_tier_consistent(tier)


def test_a_block_larger_than_the_tier_is_not_written(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, KEY, FILE_BYTES - 1)
    assert tier.write(1, block(1)) == 0
    assert 1 not in tier and tier.size == 0
    assert_tier_consistent(tier)


def test_lru_eviction_by_size_deletes_the_oldest_file(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, KEY, 3 * FILE_BYTES + FILE_BYTES // 2)
    for h in (1, 2, 3):
        tier.write(h, block(h))
    assert tier.read(1) is not None  # 1 is now the most recently used: 2 is the oldest
    tier.write(4, block(4))
    assert 2 not in tier and not tier._path(2).exists()
    assert sorted(tier.index) == [1, 3, 4]
    tier.write(3, block(3))  # a write of a present block counts as a use: 1 is the oldest
    tier.write(5, block(5))
    assert sorted(tier.index) == [3, 4, 5]
    assert tier.size == 3 * FILE_BYTES
    assert_tier_consistent(tier)


def test_a_restart_rebuilds_the_index_oldest_file_first(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, KEY, 10 * FILE_BYTES)
    for h in (1, 2, 3):
        tier.write(h, block(h))
    for age, h in enumerate((2, 3, 1)):  # file times decide the order after a restart
        os.utime(tier._path(h), ns=(10**18 + age * 10**9,) * 2)
    again = DiskTier(tmp_path, KEY, 10 * FILE_BYTES)
    assert list(again.index) == [2, 3, 1] and again.size == 3 * FILE_BYTES
    for h in (1, 2, 3):
        read = again.read(h)
        assert read is not None and torch.equal(read, block(h))
    smaller = DiskTier(tmp_path, KEY, 2 * FILE_BYTES)  # a smaller tier drops the oldest
    assert sorted(smaller.index) == [1, 3] and not smaller._path(2).exists()
    assert smaller.num_dropped == 0
    assert_tier_consistent(smaller)


def test_bad_files_are_dropped_with_a_log_line(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    tier = DiskTier(tmp_path, KEY, 10 * FILE_BYTES)
    for h in (1, 2, 3, 4):
        tier.write(h, block(h))
    flip_byte(tier._path(1), -3)  # a payload byte
    tier._path(2).write_bytes(tier._path(2).read_bytes()[:-10])  # truncated
    tier._path(3).write_bytes(encode_block(OTHER_KEY, 3, block(3)))  # another model's file
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert [tier.read(h) for h in (1, 2, 3)] == [None, None, None]
    for h in (1, 2, 3):
        assert h not in tier and not tier._path(h).exists()
    assert tier.num_dropped == 3
    dropped = [r for r in caplog.records if "dropping KV block file" in r.getMessage()]
    assert len(dropped) == 3
    assert "another model" in caplog.text and "checksum" in caplog.text
    good = tier.read(4)
    assert good is not None and torch.equal(good, block(4))
    assert_tier_consistent(tier)


def test_bad_files_found_after_a_restart_are_dropped(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    tier = DiskTier(tmp_path, KEY, 10 * FILE_BYTES)
    for h in (1, 2, 3):
        tier.write(h, block(h))
    flip_byte(tier._path(1), 46)  # in the header: the block hash field
    tier._path(2).write_bytes(b"")
    (tier.folder / f"not-hex{SUFFIX}").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = DiskTier(tmp_path, KEY, 10 * FILE_BYTES)
        assert not (again.folder / f"not-hex{SUFFIX}").exists()  # dropped at start
        assert again.read(1) is None and again.read(2) is None
    assert again.num_dropped == 3
    assert len([r for r in caplog.records if "dropping" in r.getMessage()]) == 3
    read = again.read(3)
    assert read is not None and torch.equal(read, block(3))
    assert_tier_consistent(again)


def test_another_models_files_are_never_seen(tmp_path: Path) -> None:
    mine = DiskTier(tmp_path, KEY, 10 * FILE_BYTES)
    theirs = DiskTier(tmp_path, OTHER_KEY, 10 * FILE_BYTES)
    assert mine.folder != theirs.folder
    theirs.write(1, block(1, torch.bfloat16))
    theirs.write(2, block(2, torch.bfloat16))
    mine.write(2, block(2))
    assert 1 not in mine and mine.read(1) is None
    read = mine.read(2)
    assert read is not None and read.dtype == torch.float32
    restarted = DiskTier(tmp_path, KEY, 10 * FILE_BYTES)
    assert list(restarted.index) == [2]
    assert mine.num_dropped == restarted.num_dropped == theirs.num_dropped == 0
    assert sorted(DiskTier(tmp_path, OTHER_KEY, 10 * FILE_BYTES).index) == [1, 2]
    for tier in (mine, theirs, restarted):
        assert_tier_consistent(tier)

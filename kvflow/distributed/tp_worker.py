"""A tensor-parallel worker process (rank 1..N-1): joins the group, loads its shard, then
runs every step rank 0 broadcasts until told to stop or its engine core is gone.

    python -m kvflow.distributed.tp_worker   (started by MultiprocExecutor; spec on stdin)
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import sys
import threading
import time

import msgspec
import numpy as np
import torch
import torch.distributed as dist

from kvflow.config import with_device_offset
from kvflow.distributed.executor import RankContext, WorkerSpec, pin_rank
from kvflow.distributed.parallel_state import (
    ModelShards,
    SharedMemoryAllReduce,
    TensorParallelGroup,
)
from kvflow.engine.protocol import WorkerStep
from kvflow.worker.memory import settle_on
from kvflow.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def _watch_parent(parent_pid: int) -> None:
    """Exit as soon as the engine core's process is gone (a collective with it would fail
    or hang; nothing else would end this process)."""
    while os.getppid() == parent_pid:
        time.sleep(0.2)
    os._exit(0)


@torch.inference_mode()
def run_step(runner: ModelRunner, step: WorkerStep) -> None:
    """The same forward as rank 0's on this rank's shard, then its vocabulary slice of the
    logits of each row group rank 0 computes (the head gathers them to rank 0)."""
    model, device = runner.model, runner.device
    positions = torch.from_numpy(np.concatenate([
        np.arange(seq_len - q, seq_len, dtype=np.int64)
        for q, seq_len in zip(step.query_lens, step.seq_lens, strict=True)]))
    metadata = runner.build_metadata(step.query_lens, step.seq_lens, step.block_ids,
                                     runner.block_size, device)
    input_ids = torch.tensor(step.input_ids, dtype=torch.int64, device=device)
    hidden = model(input_ids, positions.to(device), runner.kv_caches, metadata)  # [T, hidden]
    for rows in step.logit_rows:
        model.compute_logits(hidden[torch.tensor(rows, device=device)])


def serve(spec: WorkerSpec) -> None:
    """Join the group, load the shard, run steps until told to stop."""
    config = with_device_offset(spec.config, spec.rank)
    device = config.model_config.device
    settle_on(device)  # before the group: NCCL binds the current GPU
    pin_rank(spec.cpus, spec.num_threads)
    torch.manual_seed(config.model_config.seed)
    store = dist.TCPStore("127.0.0.1", spec.store_port, spec.world, False,
                          timeout=datetime.timedelta(seconds=300))
    shm = None if spec.shm_fd is None else SharedMemoryAllReduce(
        spec.shm_fd, spec.rank, spec.world, spec.shm_capacity)
    store.set(f"up{spec.rank}", "1")
    group = TensorParallelGroup(store, spec.rank, spec.world, device, shm)
    assert config.model_config.hf_config is not None
    shards = ModelShards.of(config.model_config.hf_config, spec.rank, spec.world)
    runner = ModelRunner(config, parallel=RankContext(shards, group))
    decoder = msgspec.msgpack.Decoder(WorkerStep)
    while True:
        step = decoder.decode(group.broadcast_bytes(None))
        if step.stop:
            return
        run_step(runner, step)


def main() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s tp-worker: %(message)s")
    spec: WorkerSpec = pickle.load(sys.stdin.buffer)
    threading.Thread(target=_watch_parent, args=(spec.parent_pid,), daemon=True,
                     name="kvflow-tp-parent").start()
    try:
        serve(spec)
    except Exception:
        logger.exception("tensor-parallel worker %d failed", spec.rank)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""The leak check every engine test ends with."""

from __future__ import annotations

from kvflow.engine.core import EngineCore


def assert_core_clean(core: EngineCore) -> None:
    """No request state, and every KV block free (cached prefix blocks count as free)."""
    scheduler = core.scheduler
    assert not scheduler.requests, f"requests left: {list(scheduler.requests)}"
    assert not scheduler.running and not scheduler.waiting
    assert not core.kv.req_blocks
    assert core.kv.num_free_blocks == core.kv.num_blocks
    core.kv.check_invariants()
    encoder_cache = scheduler.encoder_cache
    if encoder_cache is not None:  # image embeddings: none referenced, runner in step
        assert encoder_cache.num_referenced == 0
        encoder_cache.check_invariants()
        runner = core.runner.encoder_runner
        assert runner is not None
        assert set(runner.outputs) <= set(encoder_cache.sizes) | set(encoder_cache.freed)

"""The periodic one-line stats log of a running engine."""

from __future__ import annotations

import logging
import time

from kvflow.engine.protocol import EngineCoreOutputs, SchedulerStats
from kvflow.spec_decode.metrics import format_spec_stats

logger = logging.getLogger("kvflow.stats")


class StatsLogger:
    """Logs throughput, running/waiting requests, KV usage and prefix hits every interval."""

    def __init__(self, enabled: bool, interval_s: float = 5.0) -> None:
        self.enabled = enabled
        self.interval_s = interval_s
        self.last_time = time.monotonic()
        self.last: SchedulerStats | None = None
        self.latest: SchedulerStats | None = None

    def record(self, outputs: EngineCoreOutputs,
               per_engine: list[SchedulerStats | None] | None = None) -> None:
        """`per_engine`: each data-parallel replica's latest stats (the line then ends with
        one short part per replica; `outputs` carries their total)."""
        if outputs.scheduler_stats is not None:
            self.latest = outputs.scheduler_stats
        now = time.monotonic()
        if self.enabled and self.latest is not None and now - self.last_time >= self.interval_s:
            line = format_stats(self.latest, self.last, now - self.last_time)
            if per_engine is not None:
                line += "; " + format_engines(per_engine)
            logger.info("%s", line)
            self.last, self.last_time = self.latest, now


def format_engines(per_engine: list[SchedulerStats | None]) -> str:
    """One short part per replica: running/waiting, KV usage, prefix hit rate, or dead."""
    parts = []
    for i, st in enumerate(per_engine):
        if st is None:
            parts.append(f"engine {i}: dead")
            continue
        rate = 100.0 * st.prefix_cache_hits / st.prefix_cache_queries \
            if st.prefix_cache_queries else 0.0
        parts.append(f"engine {i}: {st.num_running_reqs} running, {st.num_waiting_reqs} "
                     f"waiting, KV {100 * st.kv_cache_usage:.1f}%, hits {rate:.1f}%")
    return ", ".join(parts)


def format_stats(cur: SchedulerStats, prev: SchedulerStats | None, elapsed: float) -> str:
    prompt = cur.num_prompt_tokens - (prev.num_prompt_tokens if prev else 0)
    gen = cur.num_generation_tokens - (prev.num_generation_tokens if prev else 0)
    queries = cur.prefix_cache_queries - (prev.prefix_cache_queries if prev else 0)
    hits = cur.prefix_cache_hits - (prev.prefix_cache_hits if prev else 0)
    hit_rate = 100.0 * hits / queries if queries else 0.0
    line = (
        f"prompt throughput: {prompt / elapsed:.1f} tokens/s, "
        f"generation throughput: {gen / elapsed:.1f} tokens/s, "
        f"running: {cur.num_running_reqs} reqs, waiting: {cur.num_waiting_reqs} reqs, "
        f"KV cache usage: {100 * cur.kv_cache_usage:.1f}%, "
        f"prefix cache hit rate: {hit_rate:.1f}%, preemptions: {cur.num_preemptions}"
    )
    if cur.kv_offload_blocks_stored:  # the second KV tier is on and in use
        loaded = cur.kv_offload_blocks_loaded - (prev.kv_offload_blocks_loaded if prev else 0)
        line += f", second KV tier: {loaded} blocks loaded"
    if cur.mm_encoder_cache_queries:  # an image model that has seen images
        rate = 100.0 * cur.mm_encoder_cache_hits / cur.mm_encoder_cache_queries
        line += f", images encoded: {cur.mm_images_encoded}, encoder cache hit rate: {rate:.1f}%"
    if cur.spec_num_drafts:  # speculative decoding is on and proposed
        before = prev or SchedulerStats()
        per_pos = [n - (before.spec_num_accepted_tokens_per_pos[i]
                        if i < len(before.spec_num_accepted_tokens_per_pos) else 0)
                   for i, n in enumerate(cur.spec_num_accepted_tokens_per_pos)]
        line += format_spec_stats(cur.spec_num_drafts - before.spec_num_drafts,
                                  cur.spec_num_draft_tokens - before.spec_num_draft_tokens,
                                  cur.spec_num_accepted_tokens - before.spec_num_accepted_tokens,
                                  per_pos)
    return line

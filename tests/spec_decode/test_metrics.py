"""Acceptance counters, the stats log's part and the Prometheus series."""

from __future__ import annotations

from kvflow.engine.protocol import SchedulerStats
from kvflow.engine.stats import format_stats
from kvflow.metrics import ServerMetrics
from kvflow.spec_decode.metrics import SpecDecodingStats


def test_counters_and_log_line() -> None:
    stats = SpecDecodingStats()
    stats.observe(4, 4)
    stats.observe(4, 1)
    stats.observe(2, 0)
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (3, 10, 5)
    assert stats.num_accepted_tokens_per_pos == [2, 1, 1, 1]
    prev = SchedulerStats(spec_num_drafts=1, spec_num_draft_tokens=4,
                          spec_num_accepted_tokens=4, spec_num_accepted_tokens_per_pos=[1, 1])
    cur = SchedulerStats(spec_num_drafts=3, spec_num_draft_tokens=10,
                         spec_num_accepted_tokens=5, spec_num_accepted_tokens_per_pos=[2, 1])
    line = format_stats(cur, prev, 1.0)
    # the interval: 2 drafts, 6 tokens, 1 accepted: mean acceptance length 1 + 1/2
    assert "mean acceptance length 1.50" in line and "accepted 1/6" in line
    assert "per-position [0.50, 0.00]" in line
    assert "spec decoding" not in format_stats(SchedulerStats(), None, 1.0)


def test_prometheus_series() -> None:
    metrics = ServerMetrics("m")
    metrics.update_from_stats(SchedulerStats(
        spec_num_drafts=3, spec_num_draft_tokens=10, spec_num_accepted_tokens=5,
        spec_num_accepted_tokens_per_pos=[2, 1]))
    metrics.update_from_stats(SchedulerStats(
        spec_num_drafts=4, spec_num_draft_tokens=12, spec_num_accepted_tokens=6,
        spec_num_accepted_tokens_per_pos=[3, 1]))
    text = metrics.render().decode()
    assert 'kvflow:spec_decode_num_drafts_total{model_name="m"} 4.0' in text
    assert 'kvflow:spec_decode_num_draft_tokens_total{model_name="m"} 12.0' in text
    assert 'kvflow:spec_decode_num_accepted_tokens_total{model_name="m"} 6.0' in text
    assert ('kvflow:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"} '
            '3.0') in text
    assert ('kvflow:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="1"} '
            '1.0') in text

"""kvflow.metrics: names, counters fed from scheduler totals, per-request latencies."""

from __future__ import annotations

import time

from kvflow.engine.protocol import SchedulerStats
from kvflow.metrics import ServerMetrics
from kvflow.outputs import CompletionOutput, RequestMetrics, RequestOutput


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing")


def output(tokens: list[int], finish: str | None, times: RequestMetrics) -> RequestOutput:
    completion = CompletionOutput(0, "x", tokens, None, None, finish_reason=finish)
    return RequestOutput("r", "p", [1, 2, 3], None, [completion], finish is not None, times)


def test_gauges_and_counters_follow_the_core_totals() -> None:
    metrics = ServerMetrics("m")
    metrics.update_from_stats(SchedulerStats(num_running_reqs=3, num_waiting_reqs=1,
                                             kv_cache_usage=0.5, num_prompt_tokens=100,
                                             prefix_cache_queries=100, prefix_cache_hits=25))
    metrics.update_from_stats({"num_running_reqs": 0, "num_prompt_tokens": 150,
                               "prefix_cache_queries": 100, "prefix_cache_hits": 25})
    text = metrics.render().decode()
    assert sample(text, "kvflow:num_requests_running") == 0
    assert sample(text, "kvflow:prompt_tokens_total") == 150  # a counter, not a gauge
    assert sample(text, "kvflow:prefix_cache_hit_rate") == 0.25
    assert sample(text, "kvflow:num_requests_waiting") == 0
    assert ServerMetrics("other").registry is not metrics.registry
    metrics.update_from_stats(SchedulerStats(num_running_reqs=3, kv_cache_usage=0.5))
    metrics.engine_dead()
    text = metrics.render().decode()
    assert sample(text, "kvflow:num_requests_running") == 0
    assert sample(text, "kvflow:kv_cache_usage_perc") == 0


def test_kv_blocks_in_use_counts_blocks_held_by_requests() -> None:
    metrics = ServerMetrics("m")
    # 3 of 7 blocks held: a fraction that is not exact in binary still gives a whole count
    metrics.update_from_stats(SchedulerStats(kv_cache_usage=1.0 - 4 / 7, num_kv_blocks=7))
    text = metrics.render().decode()
    assert sample(text, "kvflow:kv_cache_blocks_in_use") == 3
    assert sample(text, "kvflow:kv_cache_blocks_total") == 7
    metrics.update_from_stats(SchedulerStats(kv_cache_usage=0.0, num_kv_blocks=7))
    assert sample(metrics.render().decode(), "kvflow:kv_cache_blocks_in_use") == 0
    metrics.update_from_stats(SchedulerStats(kv_cache_usage=1.0 - 4 / 7, num_kv_blocks=7))
    metrics.engine_dead()
    assert sample(metrics.render().decode(), "kvflow:kv_cache_blocks_in_use") == 0


def test_request_latencies() -> None:
    metrics = ServerMetrics("m")
    times = RequestMetrics(arrival_time=10.0, first_token_time=10.5, last_token_time=11.5,
                           finished_time=11.5)
    tracker = metrics.track_request()
    tracker.observe(output([5], None, times))
    tracker.observe(output([6, 7], "length", times))
    tracker.finish()
    abandoned = metrics.track_request()
    abandoned.finish()
    text = metrics.render().decode()
    assert sample(text, "kvflow:time_to_first_token_seconds_sum") == 0.5
    assert sample(text, "kvflow:e2e_request_latency_seconds_sum") == 1.5
    assert sample(text, "kvflow:request_time_per_output_token_seconds_sum") == 0.5
    assert sample(text, "kvflow:inter_token_latency_seconds_count") == 2
    assert 'kvflow:request_success_total{finished_reason="length",model_name="m"} 1.0' in text
    assert 'kvflow:request_success_total{finished_reason="abort",model_name="m"} 1.0' in text


def test_lora_gauges() -> None:
    metrics = ServerMetrics("m", lora=True)
    metrics.update_from_stats(SchedulerStats(running_lora_adapters={"sql": 2, "chat": 1},
                                             waiting_lora_adapters={"sql": 1}, max_lora=4),
                              lora_names=["sql", "chat", "idle"])
    text = metrics.render().decode()
    info = [line for line in text.splitlines() if line.startswith("kvflow:lora_requests_info{")]
    assert len(info) == 1
    assert 'running_lora_adapters="chat,sql"' in info[0] and 'max_lora="4"' in info[0]
    assert 'waiting_lora_adapters="sql"' in info[0]
    assert abs(float(info[0].rsplit(" ", 1)[1]) - time.time()) < 60  # when it was updated
    assert 'kvflow:lora_running_requests{lora_name="sql",model_name="m"} 2.0' in text
    assert 'kvflow:lora_waiting_requests{lora_name="sql",model_name="m"} 1.0' in text
    assert 'kvflow:lora_waiting_requests{lora_name="chat",model_name="m"} 0.0' in text
    assert 'kvflow:lora_running_requests{lora_name="idle",model_name="m"} 0.0' in text
    # "chat" was unloaded and has no requests left: its series go, and the info series is one
    metrics.update_from_stats(SchedulerStats(max_lora=4), lora_names=["sql"])
    text = metrics.render().decode()
    assert 'lora_name="chat"' not in text and 'lora_name="idle"' not in text
    assert 'kvflow:lora_running_requests{lora_name="sql",model_name="m"} 0.0' in text
    assert text.count("kvflow:lora_requests_info{") == 1
    assert 'running_lora_adapters="",waiting_lora_adapters=""' in text
    metrics.update_from_stats(SchedulerStats(running_lora_adapters={"sql": 1}, max_lora=4),
                              lora_names=["sql"])
    metrics.engine_dead()
    assert 'kvflow:lora_running_requests{lora_name="sql",model_name="m"}' not in \
        metrics.render().decode()
    assert "lora" not in ServerMetrics("m").render().decode()  # LoRA off: no LoRA metrics


def test_data_parallel_engines_get_series_of_their_own() -> None:
    metrics = ServerMetrics("m", num_engines=2)
    assert ServerMetrics("single").engines is None  # one engine: nothing added
    assert metrics.engines is not None
    metrics.engines.update([SchedulerStats(num_running_reqs=2, prefix_cache_queries=10,
                                           prefix_cache_hits=4), None], routed=[5, 3])
    metrics.engines.update([SchedulerStats(num_running_reqs=1), None], routed=[6, 3])
    text = metrics.render().decode()
    assert 'kvflow:engine_num_requests_running{engine="0",model_name="m"} 1.0' in text
    assert 'kvflow:engine_alive{engine="1",model_name="m"} 0.0' in text
    assert 'kvflow:engine_requests_routed_total{engine="0",model_name="m"} 6.0' in text
    assert 'kvflow:engine_requests_routed_total{engine="1",model_name="m"} 3.0' in text

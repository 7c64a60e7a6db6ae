"""Prometheus metrics of a kvflow server, with vLLM's names under a `kvflow:` prefix.

Engine-wide numbers (running/waiting requests, KV cache usage, token and preemption
counters, prefix-cache queries/hits, requests per LoRA adapter) are refreshed from the core's
`SchedulerStats` when /metrics is scraped; per-request latencies are observed by the server
from each request's outputs as they stream.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import msgspec
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from kvflow.engine.protocol import SchedulerStats
from kvflow.outputs import RequestOutput

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)

# SchedulerStats counters (totals since the core started) → Prometheus counter names.
_STAT_COUNTERS = {
    "num_prompt_tokens": ("kvflow:prompt_tokens", "Prompt tokens computed (prefill)"),
    "num_generation_tokens": ("kvflow:generation_tokens", "Tokens generated"),
    "num_preemptions": ("kvflow:num_preemptions", "Requests preempted by the scheduler"),
    "prefix_cache_queries": ("kvflow:prefix_cache_queries", "Prompt tokens looked up in the "
                             "prefix cache"),
    "prefix_cache_hits": ("kvflow:prefix_cache_hits", "Prompt tokens found in the prefix cache"),
    "mm_images_encoded": ("kvflow:mm_images_encoded", "Images the vision tower encoded"),
    "mm_encoder_cache_queries": ("kvflow:mm_encoder_cache_queries",
                                 "Images looked up in the encoder cache"),
    "mm_encoder_cache_hits": ("kvflow:mm_encoder_cache_hits",
                              "Images whose embeddings the encoder cache held"),
    "kv_offload_hit_blocks": ("kvflow:kv_offload_hit_blocks",
                              "Prefix blocks found in the second KV tier for admitted requests"),
    "kv_offload_blocks_stored": ("kvflow:kv_offload_blocks_stored",
                                 "Blocks copied into the second KV tier (evicted prefix blocks)"),
    "kv_offload_blocks_loaded": ("kvflow:kv_offload_blocks_loaded",
                                 "Blocks loaded back from the second KV tier"),
    "kv_offload_bytes_stored": ("kvflow:kv_offload_bytes_stored",
                                "Bytes written to the second KV tier (host memory and disk)"),
    "kv_offload_bytes_loaded": ("kvflow:kv_offload_bytes_loaded",
                                "Bytes loaded back from the second KV tier"),
    "spec_num_drafts": ("kvflow:spec_decode_num_drafts",
                        "Verify steps of requests with proposals (speculative decoding)"),
    "spec_num_draft_tokens": ("kvflow:spec_decode_num_draft_tokens", "Tokens proposed"),
    "spec_num_accepted_tokens": ("kvflow:spec_decode_num_accepted_tokens",
                                 "Proposed tokens accepted"),
}
# The client's processor-cache totals (vLLM's mm_cache_* names) → Prometheus counters.
_FRONTEND_COUNTERS = {
    "images_processed": ("kvflow:mm_images_processed",
                         "Images the model's processor preprocessed (processor-cache misses)"),
    "cache_queries": ("kvflow:mm_cache_queries", "Images looked up in the processor cache"),
    "cache_hits": ("kvflow:mm_cache_hits", "Images found in the processor cache"),
}


class ServerMetrics:
    """All metrics of one server, in a registry of its own (two apps never share one)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, lora: bool = False, num_engines: int = 1) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name}
        names = ["model_name"]

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, names, registry=self.registry).labels(**self.labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, names, buckets=buckets,
                             registry=self.registry).labels(**self.labels)

        self.running = gauge("kvflow:num_requests_running", "Requests in the running batch")
        self.waiting = gauge("kvflow:num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_cache_usage = gauge("kvflow:kv_cache_usage_perc",
                                    "Fraction of KV-cache blocks in use (1 = full)")
        # A count, not a fraction: a leak check wants "0 blocks held", and cached prefix
        # blocks that no live request holds are free (evictable), so they are not counted.
        self.kv_blocks_in_use = gauge("kvflow:kv_cache_blocks_in_use",
                                      "KV-cache blocks held by live requests (cached prefix "
                                      "blocks no request holds are not counted)")
        self.kv_blocks_total = gauge("kvflow:kv_cache_blocks_total", "KV-cache blocks in all")
        self.prefix_hit_rate = gauge("kvflow:prefix_cache_hit_rate",
                                     "Prefix-cache hits / queries since start")
        self.mm_cache_hit_rate = gauge("kvflow:mm_cache_hit_rate",
                                       "Processor-cache hits / lookups since start (images)")
        self.mm_encoder_hit_rate = gauge("kvflow:mm_encoder_cache_hit_rate",
                                         "Encoder-cache hits / lookups since start (images)")
        self.kv_offload_load_time = gauge("kvflow:kv_offload_load_seconds",
                                          "Seconds spent loading blocks from the second KV "
                                          "tier, since start")
        self.frontend_requests = gauge(
            "kvflow:frontend_requests",
            "Requests the server's engine client holds state for (n > 1: each child)")
        self.rejected_overload = Counter(
            "kvflow:requests_rejected_overload", "Requests refused with 503 while too many "
            "requests were waiting", names, registry=self.registry).labels(**self.labels)
        self.stat_counters = {
            field: Counter(name, doc, names, registry=self.registry).labels(**self.labels)
            for field, (name, doc) in _STAT_COUNTERS.items()
        }
        self.frontend_counters = {
            field: Counter(name, doc, names, registry=self.registry).labels(**self.labels)
            for field, (name, doc) in _FRONTEND_COUNTERS.items()
        }
        self._last_totals: dict[str, int] = dict.fromkeys([*_STAT_COUNTERS, *_FRONTEND_COUNTERS],
                                                          0)
        self.spec_accepted_per_pos = Counter(
            "kvflow:spec_decode_num_accepted_tokens_per_pos",
            "Proposed tokens accepted at each position (0 = the first proposal)",
            names + ["position"], registry=self.registry)
        self.request_success = Counter("kvflow:request_success", "Finished requests",
                                       names + ["finished_reason"], registry=self.registry)
        for reason in ("stop", "length", "abort"):  # exported at 0 before the first one
            self.request_success.labels(finished_reason=reason, **self.labels)
        self.ttft = histogram("kvflow:time_to_first_token_seconds",
                              "Time to first token", TTFT_BUCKETS)
        self.itl = histogram("kvflow:inter_token_latency_seconds",
                             "Time between consecutive output tokens", ITL_BUCKETS)
        # vLLM's older name for the same per-token gaps, kept for existing dashboards
        self.tpot_legacy = histogram("kvflow:time_per_output_token_seconds",
                                     "Time between consecutive output tokens", ITL_BUCKETS)
        self.tpot = histogram("kvflow:request_time_per_output_token_seconds",
                              "Mean time per output token of each request", ITL_BUCKETS)
        self.e2e = histogram("kvflow:e2e_request_latency_seconds",
                             "Arrival to finish of each request", E2E_BUCKETS)
        self.prompt_tokens = histogram("kvflow:request_prompt_tokens",
                                       "Prompt length of each request", TOKEN_BUCKETS)
        self.generation_tokens = histogram("kvflow:request_generation_tokens",
                                           "Tokens generated for each request", TOKEN_BUCKETS)
        self.lora = LoRAMetrics(self.registry, model_name) if lora else None
        # data-parallel replicas: the series above are totals; these split them per engine
        self.engines = EngineMetrics(self.registry, model_name, num_engines) \
            if num_engines > 1 else None

    def update_from_stats(self, stats: SchedulerStats | dict[str, Any],
                          lora_names: Iterable[str] = ()) -> None:
        """Refresh the engine-wide numbers from the core's stats (at scrape time);
        `lora_names`: the adapters served now (each gets its gauges, 0 when idle)."""
        if not isinstance(stats, SchedulerStats):
            stats = msgspec.convert(stats, SchedulerStats)
        self.running.set(stats.num_running_reqs)
        self.waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        # usage is 1 - free/total, so this is total - free up to float rounding
        self.kv_blocks_in_use.set(round(stats.kv_cache_usage * stats.num_kv_blocks))
        self.kv_blocks_total.set(stats.num_kv_blocks)
        queries = stats.prefix_cache_queries
        self.prefix_hit_rate.set(stats.prefix_cache_hits / queries if queries else 0.0)
        for field, counter in self.stat_counters.items():
            self._advance(field, counter, int(getattr(stats, field)))
        self.kv_offload_load_time.set(stats.kv_offload_load_seconds)
        for position, total in enumerate(stats.spec_num_accepted_tokens_per_pos):
            key = f"spec_pos_{position}"
            self._last_totals.setdefault(key, 0)
            self._advance(key, self.spec_accepted_per_pos.labels(
                position=str(position), **self.labels), total)
        queries = stats.mm_encoder_cache_queries
        self.mm_encoder_hit_rate.set(stats.mm_encoder_cache_hits / queries if queries else 0.0)
        if self.lora is not None:
            self.lora.update(stats.running_lora_adapters, stats.waiting_lora_adapters,
                             stats.max_lora, lora_names)

    def _advance(self, field: str, counter: Any, total: int) -> None:
        """Counters only go up: add what was counted since the last scrape."""
        counter.inc(max(0, total - self._last_totals[field]))
        self._last_totals[field] = max(total, self._last_totals[field])

    def update_frontend(self, num_tracked: int, mm_totals: dict[str, int] | None = None) -> None:
        """`mm_totals`: the processor cache's images_processed, cache_queries, cache_hits."""
        self.frontend_requests.set(num_tracked)
        for field, total in (mm_totals or {}).items():
            self._advance(field, self.frontend_counters[field], total)
        if mm_totals and mm_totals["cache_queries"]:
            self.mm_cache_hit_rate.set(mm_totals["cache_hits"] / mm_totals["cache_queries"])

    def overloaded(self) -> None:
        self.rejected_overload.inc()

    def engine_dead(self) -> None:
        """A dead engine runs nothing: gauges must not keep its last numbers."""
        for gauge in (self.running, self.waiting, self.kv_cache_usage, self.kv_blocks_in_use):
            gauge.set(0)
        if self.lora is not None:
            self.lora.update({}, {}, self.lora.max_lora, ())

    def track_request(self) -> RequestTracker:
        return RequestTracker(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineMetrics:
    """Per-replica series of a data-parallel engine (label `engine`, as vLLM's): requests
    running and waiting, KV usage, prefix-cache hit rate, alive, requests routed."""

    def __init__(self, registry: CollectorRegistry, model_name: str, num_engines: int) -> None:
        names = ["model_name", "engine"]

        def per_engine(kind: Any, name: str, doc: str) -> list[Any]:
            metric = kind(name, doc, names, registry=registry)
            return [metric.labels(model_name, str(i)) for i in range(num_engines)]

        self.running = per_engine(Gauge, "kvflow:engine_num_requests_running",
                                  "Requests in the running batch of each data-parallel engine")
        self.waiting = per_engine(Gauge, "kvflow:engine_num_requests_waiting",
                                  "Requests waiting in each data-parallel engine")
        self.kv_cache_usage = per_engine(Gauge, "kvflow:engine_kv_cache_usage_perc",
                                         "Fraction of each engine's KV-cache blocks in use")
        self.prefix_hit_rate = per_engine(Gauge, "kvflow:engine_prefix_cache_hit_rate",
                                          "Prefix-cache hits / queries of each engine")
        self.alive = per_engine(Gauge, "kvflow:engine_alive",
                                "1 while the data-parallel engine runs, 0 once it died")
        self.routed = per_engine(Counter, "kvflow:engine_requests_routed",
                                 "Requests the router sent to each data-parallel engine")
        self._last_routed = [0] * num_engines

    def update(self, per_engine: list[SchedulerStats | None], routed: list[int]) -> None:
        """`per_engine`: each engine's stats (None: dead); `routed`: totals since start."""
        for i, stats in enumerate(per_engine):
            self.alive[i].set(0 if stats is None else 1)
            queries = stats.prefix_cache_queries if stats else 0
            self.running[i].set(stats.num_running_reqs if stats else 0)
            self.waiting[i].set(stats.num_waiting_reqs if stats else 0)
            self.kv_cache_usage[i].set(stats.kv_cache_usage if stats else 0.0)
            self.prefix_hit_rate[i].set(stats.prefix_cache_hits / queries if stats and queries
                                        else 0.0)
        for i, total in enumerate(routed):
            self.routed[i].inc(max(0, total - self._last_routed[i]))
            self._last_routed[i] = max(total, self._last_routed[i])


class LoRAMetrics:
    """Requests per LoRA adapter: vLLM's lora_requests_info, plus a gauge pair per adapter.

    lora_requests_info has one series, whose labels name the adapters with running and
    waiting requests (comma-separated) and whose value is when it was last updated; the
    previous series is removed, so the label sets seen over time cannot pile up.
    """

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self.model_name = model_name
        self.max_lora = 0
        self.info = Gauge("kvflow:lora_requests_info", "Running stats on LoRA requests",
                          ["model_name", "running_lora_adapters", "waiting_lora_adapters",
                           "max_lora"], registry=registry)
        names = ["model_name", "lora_name"]
        self.running = Gauge("kvflow:lora_running_requests",
                             "Requests in the running batch, per LoRA adapter", names,
                             registry=registry)
        self.waiting = Gauge("kvflow:lora_waiting_requests",
                             "Requests waiting to be scheduled, per LoRA adapter", names,
                             registry=registry)
        self._shown: set[str] = set()  # adapters with series now

    def update(self, running: dict[str, int], waiting: dict[str, int], max_lora: int,
               served: Iterable[str]) -> None:
        self.max_lora = max_lora
        self.info.clear()
        self.info.labels(model_name=self.model_name,
                         running_lora_adapters=",".join(sorted(running)),
                         waiting_lora_adapters=",".join(sorted(waiting)),
                         max_lora=str(max_lora)).set_to_current_time()
        shown = set(served) | set(running) | set(waiting)
        for name in self._shown - shown:  # unloaded and idle: its series go
            self.running.remove(self.model_name, name)
            self.waiting.remove(self.model_name, name)
        for name in shown:
            self.running.labels(self.model_name, name).set(running.get(name, 0))
            self.waiting.labels(self.model_name, name).set(waiting.get(name, 0))
        self._shown = shown


class RequestTracker:
    """Observes one request's latencies from the outputs the server receives for it."""

    __slots__ = ("metrics", "last_output_time", "num_tokens", "last", "finish_reasons")

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.last_output_time: float | None = None
        self.num_tokens = 0
        self.last: RequestOutput | None = None
        self.finish_reasons: list[str] = []

    def observe(self, output: RequestOutput) -> None:
        now = time.time()
        new_tokens = sum(len(c.token_ids) for c in output.outputs)
        if new_tokens and self.last_output_time is not None:
            # Streamed outputs can bundle several tokens: spread the gap over them.
            gap = (now - self.last_output_time) / new_tokens
            for _ in range(new_tokens):
                self.metrics.itl.observe(gap)
                self.metrics.tpot_legacy.observe(gap)
        if new_tokens:
            self.last_output_time = now
        self.num_tokens += new_tokens
        self.finish_reasons.extend(c.finish_reason for c in output.outputs if c.finish_reason)
        self.last = output

    def finish(self) -> None:
        """Record the request's end-to-end figures (an abandoned stream counts as abort)."""
        m, out = self.metrics, self.last
        reasons = self.finish_reasons or ["abort"]
        for reason in reasons:
            m.request_success.labels(finished_reason=reason, **m.labels).inc()
        if out is None or out.metrics is None:
            return
        times = out.metrics
        if times.first_token_time is not None:
            m.ttft.observe(max(0.0, times.first_token_time - times.arrival_time))
        end = times.finished_time or time.time()
        m.e2e.observe(max(0.0, end - times.arrival_time))
        m.prompt_tokens.observe(len(out.prompt_token_ids))
        m.generation_tokens.observe(self.num_tokens)
        if times.first_token_time is not None and times.last_token_time is not None:
            per_token = self.num_tokens - len(out.outputs)
            if per_token > 0:
                m.tpot.observe((times.last_token_time - times.first_token_time) / per_token)

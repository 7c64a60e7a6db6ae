"""Scheduler without a model: fake outputs drive it; every test ends with a leak check."""

from __future__ import annotations

from kvflow.config import SchedulerConfig
from kvflow.core.kv_cache import KVCacheManager
from kvflow.core.request import Request, RequestStatus
from kvflow.core.scheduler import LORA_MAX_SKIPS, Scheduler, SchedulerOutput, StepResult
from kvflow.lora.adapter import LoRAAdapter
from kvflow.lora.request import LoRARequest
from tests.core.helpers import make_request


def make_scheduler(num_blocks: int = 64, budget: int = 64, max_seqs: int = 8,
                   policy: str = "fcfs", caching: bool = True) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                             enable_chunked_prefill=True, policy=policy, stream_interval=1)
    return Scheduler(config, KVCacheManager(num_blocks, 16, caching), max_model_len=4096)


def fake_step(s: Scheduler) -> tuple[SchedulerOutput, list]:
    """Schedule, 'compute', and sample token 7 wherever a token is due."""
    out = s.schedule()
    sampled = [7 if item.completes_sequence else None for item in out.scheduled]
    return out, s.update_from_output(out, StepResult(sampled))


def run_to_end(s: Scheduler, max_steps: int = 10_000) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            return tokens
        _, outputs = fake_step(s)
        for o in outputs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
    raise AssertionError("scheduler did not finish: deadlock?")


def assert_no_leaks(s: Scheduler) -> None:
    assert not s.requests and not s.running and not s.waiting
    assert s.kv.num_free_blocks == s.kv.num_blocks
    assert not s.kv.req_blocks
    s.kv.check_invariants()


def test_chunked_prefill_respects_budget_and_mixes_decodes() -> None:
    s = make_scheduler(budget=32)
    s.add_request(make_request("short", [1] * 5, max_tokens=4))
    s.add_request(make_request("long", [2] * 100, max_tokens=2))
    out, _ = fake_step(s)
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [
        ("short", 5), ("long", 27)]
    out, _ = fake_step(s)  # short decodes while long's prefill continues
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [
        ("short", 1), ("long", 31)]
    assert out.total_num_tokens <= 32
    run_to_end(s)
    assert s.num_generation_tokens == 4 + 2
    assert_no_leaks(s)


def test_max_num_seqs() -> None:
    s = make_scheduler(max_seqs=2)
    for i in range(5):
        s.add_request(make_request(f"r{i}", [i + 1] * 3, max_tokens=3))
    out, _ = fake_step(s)
    assert len(out.scheduled) == 2
    run_to_end(s)
    assert s.num_generation_tokens == 5 * 3
    assert_no_leaks(s)


def test_preemption_under_memory_pressure_fcfs_newest_first() -> None:
    s = make_scheduler(num_blocks=6, budget=256)  # 96 token slots
    a = make_request("a", [1] * 30, max_tokens=40)
    b = make_request("b", [2] * 30, max_tokens=40)
    s.add_request(a)
    s.add_request(b)
    preempted_first = None
    for _ in range(200):
        fake_step(s)
        if s.num_preemptions and preempted_first is None:
            preempted_first = "b" if b.num_preemptions else "a"
        if not s.has_unfinished_requests():
            break
    assert s.num_preemptions >= 1
    assert preempted_first == "b"
    assert a.num_output_tokens == 40 and b.num_output_tokens == 40
    assert_no_leaks(s)


def test_priority_admission_order_and_victim() -> None:
    s = make_scheduler(max_seqs=1, policy="priority")
    for name, prio, t in [("1", 2, 0.0), ("3", 1, 1.0), ("2", 1, 2.0), ("4", 0, 3.0)]:
        s.add_request(make_request(name, [5] * 4, max_tokens=1, priority=prio, arrival=t))
    order = []
    while s.has_unfinished_requests():
        out, _ = fake_step(s)
        order.extend(i.request.request_id for i in out.scheduled)
    assert order == ["4", "3", "2", "1"]
    assert_no_leaks(s)


def test_priority_preempts_the_lowest_priority() -> None:
    s = make_scheduler(num_blocks=6, budget=256, policy="priority")
    low = make_request("low", [1] * 30, max_tokens=40, priority=5, arrival=0.0)
    high = make_request("high", [2] * 30, max_tokens=40, priority=0, arrival=1.0)
    s.add_request(low)
    s.add_request(high)
    finished_order = []
    while s.has_unfinished_requests():
        _, outputs = fake_step(s)
        finished_order.extend(o.request_id for o in outputs if o.finished)
    assert low.num_preemptions >= 1 and high.num_preemptions == 0
    assert finished_order[0] == "high"
    assert_no_leaks(s)


def test_abort_frees_everything() -> None:
    s = make_scheduler()
    reqs = [make_request(f"r{i}", [i + 1] * 20, max_tokens=50) for i in range(4)]
    for r in reqs:
        s.add_request(r)
    fake_step(s)
    fake_step(s)
    ended = s.finish_requests(["r0", "r2", "missing"], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in ended] == ["r0", "r2"]
    s.finish_requests(["r1", "r3"], RequestStatus.FINISHED_ABORTED)
    assert_no_leaks(s)


def test_stop_conditions() -> None:
    s = make_scheduler()
    eos = make_request("eos", [3] * 4, max_tokens=10)  # eos id is 0 in helpers
    stop = make_request("stop", [3] * 4, max_tokens=10, stop_token_ids=[7])
    min_t = make_request("min", [3] * 4, max_tokens=10, stop_token_ids=[7], min_tokens=3)
    for r in (eos, stop, min_t):
        s.add_request(r)
    tokens = run_to_end(s)
    assert tokens["stop"] == [7] and stop.stop_reason == 7
    assert tokens["min"] == [7, 7, 7]
    assert tokens["eos"] == [7] * 10
    assert_no_leaks(s)


def test_soak_random_requests_never_deadlock() -> None:
    import random

    rng = random.Random(0)
    s = make_scheduler(num_blocks=20, budget=48, max_seqs=6, policy="priority")
    expected: dict[str, Request] = {}
    aborted: set[str] = set()
    for i in range(300):
        req = make_request(f"r{i}", [rng.randrange(1, 50) for _ in range(rng.randint(1, 120))],
                           max_tokens=rng.randint(1, 30), priority=rng.randint(0, 3),
                           arrival=float(i))
        s.add_request(req)
        expected[req.request_id] = req
        if rng.random() < 0.5:
            fake_step(s)
        if rng.random() < 0.1:
            victim = f"r{rng.randrange(0, i + 1)}"
            if s.finish_requests([victim], RequestStatus.FINISHED_ABORTED):
                aborted.add(victim)
    run_to_end(s)
    for rid, req in expected.items():
        if rid not in aborted:
            assert req.num_output_tokens == req.max_tokens, rid
    assert_no_leaks(s)


# ---- LoRA: at most max_loras distinct adapters per step -------------------------------------
def lora_scheduler(max_loras: int, max_seqs: int = 16, budget: int = 256) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                             enable_chunked_prefill=True, policy="fcfs", stream_interval=1,
                             max_loras=max_loras)
    return Scheduler(config, KVCacheManager(256, 16, True), max_model_len=4096)


def fake_adapter(name: str, uid: int, digest: str | None = None) -> LoRAAdapter:
    return LoRAAdapter(LoRARequest(name, uid, f"/{name}"), digest or f"digest-{name}", 1, {},
                       uid=uid)


def with_adapter(request: Request, adapter: LoRAAdapter | None) -> Request:
    request.lora = adapter
    return request


def adapters_in(out: SchedulerOutput) -> set[str]:
    return {i.request.lora.name for i in out.scheduled if i.request.lora is not None}


def test_max_loras_per_step_later_requests_pass() -> None:
    s = lora_scheduler(max_loras=2)
    a, b, c = fake_adapter("a", 1), fake_adapter("b", 2), fake_adapter("c", 3)
    for i, adapter in enumerate([a, b, c, a, None]):
        s.add_request(with_adapter(make_request(f"r{i}", [i + 1] * 4, max_tokens=3), adapter))
    out, _ = fake_step(s)
    assert [i.request.request_id for i in out.scheduled] == ["r0", "r1", "r3", "r4"]
    assert [r.request_id for r in s.waiting.requests()] == ["r2"]  # kept its place
    seen = [adapters_in(out)]
    while s.has_unfinished_requests():
        out, _ = fake_step(s)
        seen.append(adapters_in(out))
    assert all(len(names) <= 2 for names in seen) and "c" in set().union(*seen)
    stats = s.stats()
    assert stats.max_lora == 2 and not stats.running_lora_adapters
    assert_no_leaks(s)


def test_a_waiting_adapter_is_not_starved() -> None:
    s = lora_scheduler(max_loras=1, max_seqs=64)
    a, b = fake_adapter("a", 1), fake_adapter("b", 2)
    s.add_request(with_adapter(make_request("a0", [1] * 4, max_tokens=2), a))
    s.add_request(with_adapter(make_request("b0", [2] * 4, max_tokens=2), b))
    admitted_at = None
    for step in range(200):  # adapter a's requests keep arriving, one per step
        s.add_request(with_adapter(make_request(f"a{step + 1}", [3] * 4, max_tokens=2), a))
        out, _ = fake_step(s)
        assert len(adapters_in(out)) <= 1
        if "b" in adapters_in(out):
            admitted_at = step
            break
    assert admitted_at is not None and admitted_at <= LORA_MAX_SKIPS + 4
    assert s.stats().waiting_lora_adapters.get("a", 0) > 0
    run_to_end(s)
    assert_no_leaks(s)


def test_prefix_blocks_are_keyed_by_adapter_content() -> None:
    s = lora_scheduler(max_loras=4)
    prompt = list(range(40))
    same_content = fake_adapter("a-again", 4, digest="digest-a")
    cases = [(None, 0), (fake_adapter("a", 1), 0), (fake_adapter("b", 2), 0),
             (fake_adapter("a", 1), 32), (same_content, 32), (None, 32)]
    for i, (adapter, cached) in enumerate(cases):
        s.add_request(with_adapter(make_request(f"p{i}", prompt, max_tokens=1), adapter))
        out, _ = fake_step(s)
        assert out.scheduled[0].request.num_cached_tokens == cached, i
        run_to_end(s)
    assert_no_leaks(s)

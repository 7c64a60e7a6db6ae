"""OutputProcessor and stream collectors without a model: fake core outputs drive them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvflow.engine.output_processor import OutputProcessor
from kvflow.engine.protocol import EngineCoreOutput, FinishReason
from kvflow.engine.streams import ParentRequest, RequestOutputCollector
from kvflow.errors import EngineGenerateError
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import RequestOutputKind, SamplingParams


@pytest.fixture(scope="module")
def tokenizer(default_model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def feed(proc: OutputProcessor, request_id: str, ids: list[int],
         finish_last: FinishReason | None = FinishReason.LENGTH) -> list[RequestOutput]:
    emitted = []
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        out = EngineCoreOutput(request_id, [token], finish_reason=finish_last if last else None)
        emitted.extend(proc.process_outputs([out], float(i)).request_outputs)
    return emitted


def test_stream_interval_first_every_n_and_last(tokenizer) -> None:
    proc = OutputProcessor(tokenizer, stream_interval=3)
    ids = tokenizer("one two three four five six seven eight")["input_ids"]
    params = SamplingParams(max_tokens=len(ids), output_kind=RequestOutputKind.DELTA)
    proc.add_request("r", "p", [1], params, 0.0)
    outs = feed(proc, "r", ids)
    sizes = [len(o.outputs[0].token_ids) for o in outs]
    assert sizes[0] == 1 and sum(sizes) == len(ids)
    assert all(s == 3 for s in sizes[1:-1])
    assert outs[-1].finished and [o.finished for o in outs].count(True) == 1
    assert "".join(o.outputs[0].text for o in outs) == tokenizer.decode(ids)
    assert not proc.states


@pytest.mark.parametrize("kind", list(RequestOutputKind))
def test_output_kinds(tokenizer, kind: RequestOutputKind) -> None:
    proc = OutputProcessor(tokenizer)
    ids = tokenizer("Hello there, general Kenobi")["input_ids"]
    proc.add_request("r", "p", [1], SamplingParams(output_kind=kind), 0.0)
    outs = feed(proc, "r", ids)
    full = tokenizer.decode(ids)
    if kind == RequestOutputKind.FINAL_ONLY:
        assert len(outs) == 1 and outs[0].outputs[0].text == full
    elif kind == RequestOutputKind.CUMULATIVE:
        assert len(outs) == len(ids) and outs[-1].outputs[0].token_ids == ids
        assert outs[-1].outputs[0].text == full
    else:
        assert "".join(o.outputs[0].text for o in outs) == full
    assert outs[-1].outputs[0].finish_reason == "length"


def test_abort_emits_a_final_abort_output(tokenizer) -> None:
    proc = OutputProcessor(tokenizer)
    got: list = []
    proc.add_request("r", "p", [1], SamplingParams(), 0.0, sink=got.append)
    feed(proc, "r", [100, 200], finish_last=None)
    proc.abort_requests(["r"], 5.0)
    assert got[-1].finished and got[-1].outputs[0].finish_reason == "abort"
    assert not proc.states


def test_stop_string_asks_the_core_to_abort(tokenizer) -> None:
    proc = OutputProcessor(tokenizer)
    ids = tokenizer("alpha beta gamma delta")["input_ids"]
    proc.add_request("r", "p", [1], SamplingParams(stop=["gamma"]), 0.0)
    to_abort = []
    outs: list[RequestOutput] = []
    for i, token in enumerate(ids):
        res = proc.process_outputs([EngineCoreOutput("r", [token])], float(i))
        to_abort.extend(res.reqs_to_abort)
        outs.extend(res.request_outputs)
        if outs and outs[-1].finished:
            break
    assert to_abort == ["r"]
    assert outs[-1].outputs[0].text == "alpha beta "
    assert outs[-1].outputs[0].stop_reason == "gamma"


def test_a_failing_request_does_not_disturb_others(tokenizer) -> None:
    proc = OutputProcessor(tokenizer)
    good: list = []
    bad: list = []
    proc.add_request("good", "p", [1], SamplingParams(), 0.0, sink=good.append)
    proc.add_request("bad", "p", [1], SamplingParams(), 0.0, sink=bad.append)
    outs = [EngineCoreOutput("bad", [5], error="boom", finish_reason=FinishReason.ERROR),
            EngineCoreOutput("good", [6], finish_reason=FinishReason.LENGTH)]
    result = proc.process_outputs(outs, 0.0)
    assert isinstance(bad[-1], EngineGenerateError)
    assert good[-1].finished and result.reqs_to_abort == ["bad"]
    assert not proc.states


def test_parent_final_only_waits_for_every_child(tokenizer) -> None:
    proc = OutputProcessor(tokenizer)
    params = SamplingParams(n=3, seed=5, output_kind=RequestOutputKind.FINAL_ONLY)
    parent = ParentRequest("p", params)
    got: list = []
    for i, child in enumerate(parent.child_ids):
        assert parent.child_params(i).seed == 5 + i
        proc.add_request(child, "x", [1], parent.child_params(i), 0.0, parent=parent, index=i,
                         sink=got.append)
    for child in parent.child_ids:
        feed(proc, child, [10, 11])
    assert len(got) == 1 and got[0].finished and got[0].request_id == "p"
    assert sorted(c.index for c in got[0].outputs) == [0, 1, 2]


async def test_collector_merges_deltas_for_a_lagging_consumer(tokenizer) -> None:
    proc = OutputProcessor(tokenizer)
    collector = RequestOutputCollector(RequestOutputKind.DELTA)
    ids = tokenizer("a lagging consumer loses nothing")["input_ids"]
    proc.add_request("r", "p", [1], SamplingParams(output_kind=RequestOutputKind.DELTA), 0.0,
                     sink=collector.put)
    feed(proc, "r", ids)
    merged = await asyncio.wait_for(collector.get(), 1)
    assert merged.finished and merged.outputs[0].token_ids == ids
    assert merged.outputs[0].text == tokenizer.decode(ids)
    assert collector.get_nowait() is None


def test_collector_keeps_the_newest_cumulative(tokenizer) -> None:
    collector = RequestOutputCollector(RequestOutputKind.CUMULATIVE)
    proc = OutputProcessor(tokenizer)
    proc.add_request("r", "p", [1], SamplingParams(), 0.0, sink=collector.put)
    feed(proc, "r", [300, 400, 500])
    out = collector.get_nowait()
    assert out is not None and out.outputs[0].token_ids == [300, 400, 500] and out.finished


def test_a_failing_child_ends_its_siblings(tokenizer) -> None:
    """Nobody reads an n > 1 family once one child failed: its siblings are aborted too."""
    proc = OutputProcessor(tokenizer)
    parent = ParentRequest("p", SamplingParams(n=3, output_kind=RequestOutputKind.DELTA))
    got: list = []
    for i, child in enumerate(parent.child_ids):
        proc.add_request(child, "x", [1], parent.child_params(i), 0.0, parent=parent, index=i,
                         sink=got.append)
    failed = EngineCoreOutput(parent.child_ids[1], [], error="refused",
                              finish_reason=FinishReason.ERROR)
    result = proc.process_outputs([failed], 0.0)
    assert isinstance(got[-1], EngineGenerateError)
    assert sorted(result.reqs_to_abort) == sorted(parent.child_ids)
    assert not proc.states


def test_child_seeds_wrap_within_int64() -> None:
    parent = ParentRequest("p", SamplingParams(n=3, seed=2**63 - 1))
    assert [parent.child_params(i).seed for i in range(3)] == [2**63 - 1, -(2**63),
                                                               -(2**63) + 1]

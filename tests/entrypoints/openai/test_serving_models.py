"""OpenAIServingModels without a model: names, --lora-modules items, load/unload rules, locks."""

from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from kvflow.entrypoints.openai.errors import OpenAIError
from kvflow.entrypoints.openai.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from kvflow.entrypoints.openai.serving_models import (
    LoRAModulePath,
    OpenAIServingModels,
    StaticLoRAError,
    parse_lora_module,
)
from kvflow.lora.request import LoRARequest


class FakeEngine:
    """add_lora/remove_lora as AsyncLLM's: a missing folder is "No adapter found"."""

    def __init__(self, lora: bool = True, delay_s: float = 0.0) -> None:
        self.config = SimpleNamespace(model_config=SimpleNamespace(model="/models/base"),
                                      lora_config=object() if lora else None)
        self.loaded: dict[int, LoRARequest] = {}
        self.calls: list[tuple[str, Any]] = []
        self.delay_s = delay_s

    async def add_lora(self, lora: LoRARequest) -> bool:
        self.calls.append(("add", lora))
        await asyncio.sleep(self.delay_s)
        if lora.lora_path.startswith("/missing"):
            raise ValueError(f"LoRA adapter '{lora.lora_name}': No adapter found: not a folder")
        if lora.lora_path.startswith("/dora"):
            raise ValueError(f"LoRA adapter '{lora.lora_name}': DoRA adapters are not supported")
        self.loaded[lora.lora_int_id] = lora
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.calls.append(("remove", lora_id))
        return self.loaded.pop(lora_id, None) is not None


def models(engine: FakeEngine | None = None, static: list[LoRAModulePath] | None = None
           ) -> OpenAIServingModels:
    return OpenAIServingModels(engine or FakeEngine(), ["base", "alias"],  # type: ignore[arg-type]
                               static or [])


def load(name: str, path: str, inplace: bool = False) -> LoadLoRAAdapterRequest:
    return LoadLoRAAdapterRequest(lora_name=name, lora_path=path, load_inplace=inplace)


def status_of(exc: pytest.ExceptionInfo[OpenAIError]) -> tuple[int, str]:
    return exc.value.status, exc.value.message


def test_lora_module_items() -> None:
    assert parse_lora_module("sql=/a/b") == LoRAModulePath("sql", "/a/b")
    assert parse_lora_module("x=/p=q,r") == LoRAModulePath("x", "/p=q,r")  # the first = splits
    assert parse_lora_module('{"name": "c", "path": "/c", "base_model_name": "m"}') == \
        LoRAModulePath("c", "/c", "m")
    assert parse_lora_module('{"name": "c", "path": "/c"}') == LoRAModulePath("c", "/c")
    for bad in ["noequals", "=/p", "n=", '{"name": "c"', '{"name": "c", "path": 3}',
                '{"name": "c", "path": "/c", "rank": 8}', '["c", "/c"]',
                '{"name": "c", "path": "/c", "base_model_name": 1}']:
        with pytest.raises(argparse.ArgumentTypeError):
            parse_lora_module(bad)


async def test_names_resolve_and_list() -> None:
    served = models(static=[LoRAModulePath("sql", "/sql"), LoRAModulePath("c", "/c", "parent")])
    await served.init_static_loras()
    assert [lora.lora_int_id for lora in served.lora_requests.values()] == [1, 2]
    for base in (None, "", "base", "alias", "/models/base"):
        assert served.resolve(base) is None
    assert served.resolve("sql") == LoRARequest("sql", 1, "/sql")
    with pytest.raises(OpenAIError) as unknown:
        served.resolve("gpt-4")
    assert status_of(unknown) == (404, "The model `gpt-4` does not exist.")
    assert unknown.value.param == "model"
    cards = served.cards("/models/base", 256)
    assert [(c.id, c.root, c.parent) for c in cards] == [
        ("base", "/models/base", None), ("alias", "/models/base", None),
        ("sql", "/sql", "base"), ("c", "/c", "parent")]
    assert served.response_name(None) == "base" and served.response_name(
        served.resolve("c")) == "c"


@pytest.mark.parametrize("static,why", [
    ([LoRAModulePath("a", "/missing")], "No adapter found"),
    ([LoRAModulePath("a", "/dora")], "DoRA"),
    ([LoRAModulePath("alias", "/a")], "base model"),
    ([LoRAModulePath("a", "/a"), LoRAModulePath("a", "/b")], "twice"),
])
async def test_a_bad_static_adapter_stops_the_start(static: list[LoRAModulePath],
                                                    why: str) -> None:
    with pytest.raises(StaticLoRAError, match=why):
        await models(static=static).init_static_loras()


async def test_static_adapters_need_lora_enabled() -> None:
    with pytest.raises(StaticLoRAError, match="--enable-lora"):
        await models(FakeEngine(lora=False), [LoRAModulePath("a", "/a")]).init_static_loras()
    await models(FakeEngine(lora=False)).init_static_loras()  # none: nothing to refuse


async def test_load_and_unload_answers() -> None:
    engine = FakeEngine()
    served = models(engine)
    assert await served.load_lora_adapter(load("a", "/a")) == \
        "Success: LoRA adapter 'a' added successfully."
    cases: list[tuple[LoadLoRAAdapterRequest, int, str]] = [
        (load("", "/a"), 400, "Both 'lora_name' and 'lora_path' must be provided."),
        (load("b", ""), 400, "Both 'lora_name' and 'lora_path' must be provided."),
        (load("a", "/a2"), 400, "The lora adapter 'a' has already been loaded. If you want to "
         "load the adapter in place, set 'load_inplace' to True."),
        (load("b", "/missing"), 404, "LoRA adapter 'b': No adapter found: not a folder"),
        (load("b", "/dora"), 400, "LoRA adapter 'b': DoRA adapters are not supported"),
        (load("base", "/a"), 400, "'base' is the base model's name; choose another lora_name."),
    ]
    for request, status, message in cases:
        with pytest.raises(OpenAIError) as info:
            await served.load_lora_adapter(request)
        assert status_of(info) == (status, message)
    assert set(served.lora_requests) == {"a"} and set(engine.loaded) == {1}
    # in place: the same id, the new path; a failed reload keeps the adapter as it was
    assert "added" in await served.load_lora_adapter(load("a", "/a2", inplace=True))
    assert served.lora_requests["a"] == LoRARequest("a", 1, "/a2")
    assert engine.calls[-1] == ("add", LoRARequest("a", 1, "/a2", load_inplace=True))
    with pytest.raises(OpenAIError):
        await served.load_lora_adapter(load("a", "/missing", inplace=True))
    assert served.lora_requests["a"].lora_path == "/a2"
    assert await served.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name="a")) == \
        "Success: LoRA adapter 'a' removed successfully."
    assert engine.calls[-1] == ("remove", 1) and not engine.loaded  # not only forgotten
    for name, status in (("a", 404), ("", 400)):
        with pytest.raises(OpenAIError) as info:
            await served.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        assert info.value.status == status
    with pytest.raises(OpenAIError) as gone:
        served.resolve("a")
    assert gone.value.status == 404
    assert "added" in await served.load_lora_adapter(load("a", "/a"))
    assert served.lora_requests["a"].lora_int_id > 1  # a new id after an unload
    assert not served._locks  # no lock left behind for any name


async def test_loads_of_one_name_are_atomic() -> None:
    engine = FakeEngine(delay_s=0.01)
    served = models(engine)
    results = await asyncio.gather(*(served.load_lora_adapter(load("x", f"/x{i}"))
                                     for i in range(8)), return_exceptions=True)
    assert sum(isinstance(r, str) for r in results) == 1
    assert all(isinstance(r, OpenAIError) and r.status == 400 for r in results
               if not isinstance(r, str))
    assert [c[0] for c in engine.calls] == ["add"]
    unloads = await asyncio.gather(*(served.unload_lora_adapter(
        UnloadLoRAAdapterRequest(lora_name="x")) for _ in range(5)), return_exceptions=True)
    assert sum(isinstance(r, str) for r in unloads) == 1
    assert [c[0] for c in engine.calls] == ["add", "remove"] and not engine.loaded
    assert not served._locks


async def test_an_unload_waits_for_requests_on_their_way() -> None:
    """A request past the name check reaches the engine before the adapter is unloaded;
    one that comes after the unload began is a 404."""
    engine = FakeEngine()
    served = models(engine, [LoRAModulePath("a", "/a")])
    await served.init_static_loras()
    order: list[str] = []
    entered = asyncio.Event()

    async def request() -> None:
        async with served.queuing(served.resolve("a")) as lora:
            assert lora == LoRARequest("a", 1, "/a")
            entered.set()
            await asyncio.sleep(0.05)  # the engine's add_request
            order.append("queued")

    async def unload() -> None:
        await entered.wait()
        await served.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name="a"))
        order.append("unloaded")

    first = LoRARequest("a", 1, "/a")
    await asyncio.gather(request(), unload())
    assert order == ["queued", "unloaded"] and engine.calls[-1] == ("remove", 1)
    with pytest.raises(OpenAIError) as late:
        async with served.queuing(first):
            pass
    assert late.value.status == 404
    assert not served._queuing and not served._writing

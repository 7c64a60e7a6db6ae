"""The models a request's `model` field may name: the base model and its LoRA adapters.

    "tiny"  (a served name of the base model)  ──► no adapter
    "sql"   (an adapter, --lora-modules or /v1/load_lora_adapter)  ──► LoRARequest("sql", 1, path)
    other   ──► 404 "The model `other` does not exist."

As in vLLM's OpenAIServingModels: static adapters are loaded at startup with ids 1, 2, ...;
runtime loads and unloads (under KVFLOW_ALLOW_RUNTIME_LORA_UPDATING) hold a lock per adapter
name, so two of them on one name never interleave, and change an adapter only once the
requests on their way to the engine with it have arrived there. An unload also unloads the
adapter from the engine (vLLM's only forgot the name).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from kvflow.engine.async_llm import AsyncLLM
from kvflow.entrypoints.openai.errors import OpenAIError
from kvflow.entrypoints.openai.protocol import (
    LoadLoRAAdapterRequest,
    ModelCard,
    UnloadLoRAAdapterRequest,
)
from kvflow.lora.request import LoRARequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRAModulePath:
    """One --lora-modules item: an adapter's name, its folder, and optionally its parent."""

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(text: str) -> LoRAModulePath:
    """`name=path`, or vLLM's JSON `{"name": ..., "path": ..., "base_model_name": ...}`
    (an argparse `type`: a bad item is a usage error naming it)."""
    if text.lstrip().startswith("{"):
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {exc}") from None
        if not isinstance(fields, dict):
            raise argparse.ArgumentTypeError(f"{text!r} must be a JSON object")
        unknown = sorted(set(fields) - {"name", "path", "base_model_name"})
        if unknown:
            raise argparse.ArgumentTypeError(f"{text!r}: unknown field(s) {', '.join(unknown)}")
        name, path, base = fields.get("name"), fields.get("path"), fields.get("base_model_name")
    else:
        name, sep, path = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{text!r} is neither name=path nor a JSON object")
        base = None
    for field, value in (("name", name), ("path", path)):
        if not isinstance(value, str) or not value:
            raise argparse.ArgumentTypeError(f"{text!r}: {field} must be a non-empty string")
    if base is not None and not isinstance(base, str):
        raise argparse.ArgumentTypeError(f"{text!r}: base_model_name must be a string")
    assert isinstance(name, str) and isinstance(path, str)
    return LoRAModulePath(name, path, base or None)


class StaticLoRAError(Exception):
    """A --lora-modules adapter could not be loaded: the server must not start."""


@dataclass
class _NameLock:
    lock: asyncio.Lock
    users: int = 0  # holders and waiters; the entry goes when none is left


class OpenAIServingModels:
    """Resolves `model` names, lists them, and loads and unloads adapters."""

    def __init__(self, engine: AsyncLLM, base_model_names: Sequence[str],
                 static_loras: Sequence[LoRAModulePath] = ()) -> None:
        self.engine = engine
        self.base_model_names = list(base_model_names)
        self.static_loras = list(static_loras)
        self.lora_requests: dict[str, LoRARequest] = {}  # by adapter name
        self._ids = itertools.count(1)
        self._locks: dict[str, _NameLock] = {}
        # adapter name → requests being queued in the engine with it; names being changed
        self._queuing: dict[str, int] = {}
        self._writing: set[str] = set()
        self._gate = asyncio.Condition()

    @property
    def model_name(self) -> str:
        """The name responses carry for the base model."""
        return self.base_model_names[0]

    def is_base_model(self, name: str) -> bool:
        return name in self.base_model_names or name == self.engine.config.model_config.model

    def resolve(self, name: str | None) -> LoRARequest | None:
        """The adapter a `model` names (None: the base model); 404 for an unknown name."""
        if not name or self.is_base_model(name):
            return None
        lora = self.lora_requests.get(name)
        if lora is None:
            raise OpenAIError(f"The model `{name}` does not exist.", 404, "model")
        return lora

    def response_name(self, lora: LoRARequest | None) -> str:
        return self.model_name if lora is None else lora.lora_name

    def cards(self, root: str, max_model_len: int) -> list[ModelCard]:
        """/v1/models: each served name of the base model, then each adapter."""
        cards = [ModelCard(id=name, root=root, max_model_len=max_model_len)
                 for name in self.base_model_names]
        cards += [ModelCard(id=lora.lora_name, root=lora.lora_path,
                            parent=lora.base_model_name or self.model_name,
                            max_model_len=max_model_len)
                  for lora in self.lora_requests.values()]
        return cards

    # ---- loading ------------------------------------------------------------------------
    async def init_static_loras(self) -> None:
        """Load every --lora-modules adapter; StaticLoRAError saying which and why if one fails."""
        if self.static_loras and self.engine.config.lora_config is None:
            raise StaticLoRAError("--lora-modules needs --enable-lora")
        for module in self.static_loras:
            problem = self._name_problem(module.name)
            if problem is not None:
                raise StaticLoRAError(f"--lora-modules {module.name}: {problem}")
            lora = LoRARequest(module.name, next(self._ids), module.path, module.base_model_name)
            try:
                await self.engine.add_lora(lora)
            except ValueError as exc:
                raise StaticLoRAError(f"cannot load --lora-modules adapter '{module.name}' "
                                      f"({module.path}): {exc}") from exc
            self.lora_requests[module.name] = lora
            logger.info("LoRA adapter '%s' loaded from %s", module.name, module.path)

    def _name_problem(self, name: str) -> str | None:
        if self.is_base_model(name):
            return f"the name '{name}' is the base model's"
        if name in self.lora_requests:
            return f"the name '{name}' is given twice"
        return None

    async def load_lora_adapter(self, request: LoadLoRAAdapterRequest) -> str:
        """POST /v1/load_lora_adapter (vLLM's answers, statuses and messages)."""
        name, path = request.lora_name, request.lora_path
        if not name or not path:
            raise OpenAIError("Both 'lora_name' and 'lora_path' must be provided.", 400,
                              "lora_name" if not name else "lora_path")
        async with self._name_lock(name):
            if self.is_base_model(name):
                raise OpenAIError(f"'{name}' is the base model's name; choose another "
                                  "lora_name.", 400, "lora_name")
            loaded = self.lora_requests.get(name)
            if loaded is not None and not request.load_inplace:
                raise OpenAIError(
                    f"The lora adapter '{name}' has already been loaded. If you want to load "
                    "the adapter in place, set 'load_inplace' to True.", 400, "lora_name")
            # an in-place reload keeps the adapter's id (and its parent)
            lora = (LoRARequest(name, next(self._ids), path) if loaded is None
                    else LoRARequest(name, loaded.lora_int_id, path, loaded.base_model_name))
            async with self._exclusive(name):
                try:
                    await self.engine.add_lora(LoRARequest(
                        name, lora.lora_int_id, path, lora.base_model_name,
                        load_inplace=request.load_inplace))
                except ValueError as exc:
                    status = 404 if "No adapter found" in str(exc) else 400
                    raise OpenAIError(str(exc), status, "lora_path") from exc
                self.lora_requests[name] = lora
        logger.info("LoRA adapter '%s' loaded from %s (id %d)", name, path, lora.lora_int_id)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_lora_adapter(self, request: UnloadLoRAAdapterRequest) -> str:
        """POST /v1/unload_lora_adapter: forget the name, then unload it from the engine."""
        name = request.lora_name
        if not name:
            raise OpenAIError("'lora_name' needs to be provided to unload a LoRA adapter.", 400,
                              "lora_name")
        async with self._name_lock(name):
            lora = self.lora_requests.get(name)
            if lora is None:
                raise OpenAIError(f"The lora adapter '{name}' cannot be found.", 404,
                                  "lora_name")
            async with self._exclusive(name):
                del self.lora_requests[name]
                await self.engine.remove_lora(lora.lora_int_id)
        logger.info("LoRA adapter '%s' unloaded (id %d)", name, lora.lora_int_id)
        return f"Success: LoRA adapter '{name}' removed successfully."

    # ---- locking ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _name_lock(self, name: str) -> AsyncIterator[None]:
        """One load or unload of a name at a time (vLLM's per-name lock)."""
        entry = self._locks.get(name)
        if entry is None:
            entry = self._locks[name] = _NameLock(asyncio.Lock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[name]

    @contextlib.asynccontextmanager
    async def _exclusive(self, name: str) -> AsyncIterator[None]:
        """Change an adapter once the requests being queued with it have reached the engine;
        new ones wait meanwhile. Otherwise the engine could get a request for an adapter it
        has just unloaded (and load it again), or with the path an in-place reload replaced."""
        async with self._gate:
            self._writing.add(name)
            try:
                await self._gate.wait_for(lambda: not self._queuing.get(name))
            except BaseException:
                self._writing.discard(name)
                self._gate.notify_all()
                raise
        try:
            yield
        finally:
            async with self._gate:
                self._writing.discard(name)
                self._gate.notify_all()

    @contextlib.asynccontextmanager
    async def queuing(self, lora: LoRARequest | None) -> AsyncIterator[LoRARequest | None]:
        """Around queuing a request in the engine: the adapter as it is now (after an
        in-place reload: its new path), or 404 if it was unloaded since the request named it."""
        if lora is None:
            yield None
            return
        name = lora.lora_name
        async with self._gate:
            await self._gate.wait_for(lambda: name not in self._writing)
            current = self.resolve(name)
            self._queuing[name] = self._queuing.get(name, 0) + 1
        try:
            yield current
        finally:
            async with self._gate:
                self._queuing[name] -= 1
                if not self._queuing[name]:
                    del self._queuing[name]
                    self._gate.notify_all()

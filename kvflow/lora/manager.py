"""The engine core's adapters: a cache of loaded adapters and the slots a step runs them in.

    LoRACache      adapters read from disk, by id: LRU up to max_cpu_loras, pinned ones
                   never evicted. A request holds its adapter object until it ends, so an
                   eviction or a reload never changes what a running request computes.
    LoRASlotTable  the model's max_loras weight slots; before each step the adapters of the
                   step's requests are copied into slots (a slot keeps its adapter until
                   another needs it, so steady traffic copies nothing).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import torch

from kvflow.lora.adapter import LoRAAdapter, LoRAShapes, load_adapter
from kvflow.lora.request import LoRARequest
from kvflow.lora.slots import LoRASlots


class LoRACache:
    """Loaded adapters by lora_int_id, least recently used first."""

    def __init__(self, shapes: LoRAShapes, max_rank: int, capacity: int,
                 dtype: torch.dtype) -> None:
        self.shapes, self.max_rank, self.capacity, self.dtype = shapes, max_rank, capacity, dtype
        self.adapters: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self.pinned: set[int] = set()
        self._uids = itertools.count(1)

    def get(self, request: LoRARequest, reload: bool = False) -> LoRAAdapter:
        """The adapter of a request (loaded now if it is not cached; read again from disk
        with `reload`, the load_inplace hot swap); ValueError naming it if refused."""
        cached = self.adapters.get(request.lora_int_id)
        if cached is not None and not reload:
            if (cached.name, cached.request.lora_path) != (request.lora_name, request.lora_path):
                raise ValueError(
                    f"LoRA adapter '{request.lora_name}': lora_int_id {request.lora_int_id} is "
                    f"already used by adapter '{cached.name}' ({cached.request.lora_path}); "
                    "each adapter needs its own id")
            self.adapters.move_to_end(request.lora_int_id)
            return cached
        adapter = load_adapter(request, self.shapes, self.max_rank, self.dtype)
        adapter.uid = next(self._uids)
        if cached is None:
            self._make_room(request)
        self.adapters[request.lora_int_id] = adapter
        self.adapters.move_to_end(request.lora_int_id)
        return adapter

    def _make_room(self, request: LoRARequest) -> None:
        while len(self.adapters) >= self.capacity:
            victim = next((i for i in self.adapters if i not in self.pinned), None)
            if victim is None:
                raise ValueError(
                    f"LoRA adapter '{request.lora_name}': all {self.capacity} adapter places "
                    "(max_cpu_loras) hold pinned adapters")
            del self.adapters[victim]

    def remove(self, lora_id: int) -> LoRAAdapter | None:
        self.pinned.discard(lora_id)
        return self.adapters.pop(lora_id, None)

    def pin(self, lora_id: int) -> bool:
        if lora_id not in self.adapters:
            raise ValueError(f"LoRA adapter id {lora_id} is not loaded; add_lora it first")
        self.pinned.add(lora_id)
        return True

    def ids(self) -> set[int]:
        return set(self.adapters)


class LoRASlotTable:
    """The model's adapter slots: which adapter each holds, filled in place on demand."""

    def __init__(self, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.num_slots, self.max_rank, self.dtype, self.device = num_slots, max_rank, dtype, device
        self.owners: list[LoRAAdapter | None] = [None] * num_slots
        self.last_used = [0] * num_slots
        self.projections: dict[tuple[int, str], tuple[LoRASlots, tuple[str, ...]]] = {}
        self._clock = 0

    def make_hook(self, layer: int, name: str, in_features: int,
                  part_sizes: list[int], parts: tuple[str, ...]) -> LoRASlots:
        """The slots of one projection (the model calls this once per projection)."""
        slots = LoRASlots(self.num_slots, self.max_rank, in_features, part_sizes, self.dtype,
                          self.device)
        self.projections[(layer, name)] = (slots, parts)
        return slots

    def activate(self, adapters: list[LoRAAdapter | None]) -> list[int]:
        """The slot of each entry's adapter (-1 for None), copying in the ones not in a slot."""
        self._clock += 1
        wanted = {a.uid: a for a in adapters if a is not None}
        if len(wanted) > self.num_slots:
            raise RuntimeError(f"{len(wanted)} adapters in one step; max_loras={self.num_slots}")
        slot_of = {owner.uid: i for i, owner in enumerate(self.owners)
                   if owner is not None and owner.uid in wanted}
        for uid, adapter in wanted.items():
            if uid not in slot_of:
                free = [i for i in range(self.num_slots) if i not in slot_of.values()]
                slot = min(free, key=lambda i: (self.owners[i] is not None, self.last_used[i]))
                self._fill(slot, adapter)
                slot_of[uid] = slot
            self.last_used[slot_of[uid]] = self._clock
        return [-1 if a is None else slot_of[a.uid] for a in adapters]

    def _fill(self, slot: int, adapter: LoRAAdapter) -> None:
        for (layer, _), (slots, parts) in self.projections.items():
            slots.load(slot, [adapter.weights.get((layer, part)) for part in parts])
        self.owners[slot] = adapter

    def release(self, lora_id: int) -> int:
        """Free the slots holding adapter id lora_id (removed); returns how many."""
        freed = 0
        for i, owner in enumerate(self.owners):
            if owner is not None and owner.int_id == lora_id:
                for slots, _ in self.projections.values():
                    slots.clear(i)
                self.owners[i] = None
                freed += 1
        return freed

    @property
    def num_used(self) -> int:
        return sum(owner is not None for owner in self.owners)

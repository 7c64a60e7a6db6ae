"""Multi-LoRA serving: many PEFT adapters over one base model, mixed in one batch.

    request.py   LoRARequest (crosses the process boundary inside EngineCoreRequest)
    adapter.py   reading and validating a PEFT folder against the base model
    slots.py     preallocated per-slot adapter weights and the batched LoRA op
    manager.py   the core's adapter cache (LRU, pinning) and slot assignment per step
"""

from __future__ import annotations

from kvflow.lora.request import LoRARequest

__all__ = ["LoRARequest"]

"""Engine-wide structured-output options (vLLM's `structured_outputs_config` keys).

Both default to strict here, where vLLM defaults to lenient: a JSON schema refuses properties
it does not declare, and JSON output has no free whitespace. A request may override either
through the same-named fields of its `StructuredOutputsParams`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from kvflow.sampling_params import StructuredOutputsParams


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """How JSON grammars are built unless a request says otherwise."""

    # no whitespace between JSON tokens (compact output); off: a bounded amount
    disable_any_whitespace: bool = True
    # object schemas that name their properties refuse others unless the schema allows them
    disable_additional_properties: bool = True

    @classmethod
    def parse(cls, value: StructuredOutputsConfig | dict[str, Any] | str | None
              ) -> StructuredOutputsConfig:
        """From a dict, a JSON object ('{"disable_any_whitespace": false}') or None."""
        if value is None or isinstance(value, StructuredOutputsConfig):
            return value or cls()
        fields: Any = value
        if isinstance(value, str):
            try:
                fields = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"structured_outputs_config must be a JSON object, got "
                                 f"{value!r} ({exc})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"structured_outputs_config must be a JSON object, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"structured_outputs_config: unknown keys {unknown} "
                             f"(known: {sorted(known)})")
        for name, flag in fields.items():
            if not isinstance(flag, bool):
                raise ValueError(f"structured_outputs_config.{name} must be true or false, "
                                 f"got {flag!r}")
        return cls(**fields)

    def resolve(self, params: StructuredOutputsParams) -> tuple[bool, bool]:
        """(disable_any_whitespace, disable_additional_properties) for one request."""
        ws = params.disable_any_whitespace
        extra = params.disable_additional_properties
        return (self.disable_any_whitespace if ws is None else ws,
                self.disable_additional_properties if extra is None else extra)

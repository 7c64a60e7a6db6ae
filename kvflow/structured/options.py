"""Engine-wide structured-output options (vLLM's `structured_outputs_config` keys).

A JSON schema refuses properties it does not declare unless it allows them
(`disable_additional_properties`, true here where vLLM's default is false), and JSON whitespace
is always bounded: one optional newline and up to 8 spaces/tabs per separator, never
llguidance's unbounded default. `disable_any_whitespace` (vLLM's name and default, false)
removes even that: compact JSON. Compact is not the default because the default model, held
to it at temperature 1, writes long run-on strings: a one-property schema closed in 40 tokens
for 0 of 4 seeds compact, 2 of 4 with bounded whitespace; a free-form object 13 vs 15 of 20.
A request may override either option through the same-named fields of its
`StructuredOutputsParams`.
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

    # no whitespace between JSON tokens (compact output); off: a bounded amount, never free
    disable_any_whitespace: bool = False
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

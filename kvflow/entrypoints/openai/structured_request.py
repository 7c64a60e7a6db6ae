"""A request's structured-output fields → the engine's StructuredOutputsParams.

Two spellings reach the same engine feature, as in vLLM's server:
- OpenAI's `response_format`: {"type": "json_schema", "json_schema": {"name", "schema"}}
  or {"type": "json_object"} ("text" means unconstrained);
- vLLM's extra field `structured_outputs`: {"json" | "regex" | "choice" | "grammar" |
  "json_object": ...}, exactly one.
The grammar itself is checked when the engine's processor compiles it (a bad schema: 400).
"""

from __future__ import annotations

from kvflow.entrypoints.openai.errors import OpenAIError
from kvflow.entrypoints.openai.protocol import SamplingRequest
from kvflow.sampling_params import StructuredOutputsParams

_FIELDS = ("json", "regex", "choice", "grammar", "json_object")


def structured_outputs_of(request: SamplingRequest) -> StructuredOutputsParams | None:
    """The constraint a request asks for, or None; a malformed one is a 400 naming its field."""
    fmt = request.response_format
    asks_format = fmt is not None and fmt.type != "text"
    if request.structured_outputs is not None:
        if asks_format:
            raise OpenAIError("set response_format or structured_outputs, not both", 400,
                              "structured_outputs")
        unknown = sorted(set(request.structured_outputs) - set(_FIELDS))
        if unknown:
            raise OpenAIError(f"structured_outputs: unknown fields {unknown}; expected one of "
                              f"{list(_FIELDS)}", 400, "structured_outputs")
        try:
            return StructuredOutputsParams(**request.structured_outputs)
        except ValueError as exc:
            raise OpenAIError(str(exc), 400, "structured_outputs") from exc
    if fmt is None or not asks_format:
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.type != "json_schema":
        raise OpenAIError("response_format.type must be text, json_object or json_schema, "
                          f"got {fmt.type!r}", 400, "response_format")
    schema = (fmt.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise OpenAIError("response_format.json_schema.schema must be a JSON schema object",
                          400, "response_format")
    return StructuredOutputsParams(json=schema)

"""kvflow.entrypoints.openai.structured_request: response_format and structured_outputs."""

from __future__ import annotations

from typing import Any

import pytest

from kvflow.entrypoints.openai.errors import OpenAIError
from kvflow.entrypoints.openai.protocol import ChatCompletionRequest
from kvflow.entrypoints.openai.structured_request import structured_outputs_of
from kvflow.sampling_params import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def request(**extra: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], **extra})


def test_both_spellings_map_to_the_engine_params() -> None:
    assert structured_outputs_of(request()) is None
    assert structured_outputs_of(request(response_format={"type": "text"})) is None
    assert structured_outputs_of(request(response_format={"type": "json_object"})) == (
        StructuredOutputsParams(json_object=True))
    schema_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    assert structured_outputs_of(request(response_format=schema_format)) == (
        StructuredOutputsParams(json=SCHEMA))
    assert structured_outputs_of(request(structured_outputs={"choice": ["a", "b"]})) == (
        StructuredOutputsParams(choice=["a", "b"]))
    assert structured_outputs_of(request(structured_outputs={"regex": "a+"},
                                         response_format={"type": "text"})) == (
        StructuredOutputsParams(regex="a+"))


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{}"}}},
     "response_format"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "json": {}}}, "structured_outputs"),
    ({"structured_outputs": {"xml": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "structured_outputs"),
])
def test_malformed_constraints_are_a_400_naming_the_field(extra: dict[str, Any],
                                                          param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        structured_outputs_of(request(**extra))
    assert info.value.status == 400 and info.value.param == param

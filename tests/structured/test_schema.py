"""Strict schemas: which object schemas get additionalProperties false, and which stay open."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest

from kvflow.structured.schema import forbid_additional_properties

PET = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def strict_accepts(schema: dict[str, Any], instance: Any) -> bool:
    """Whether `instance` is valid under the strict rewrite (checked by jsonschema)."""
    return jsonschema.Draft202012Validator(forbid_additional_properties(schema)).is_valid(instance)


def test_nested_objects_everywhere_are_closed() -> None:
    schema = {
        "type": "object",
        "properties": {
            "owner": PET,
            "pets": {"type": "array", "items": {"$ref": "#/$defs/pet"}},
            "pair": {"type": "array", "prefixItems": [PET, PET]},
            "either": {"anyOf": [PET, {"type": "string"}]},
            "one": {"oneOf": [PET, {"type": "integer"}]},
        },
        "$defs": {"pet": PET},
        "definitions": {"old": PET},
    }
    before = copy.deepcopy(schema)
    out = forbid_additional_properties(schema)
    assert schema == before  # a copy: the caller's schema is not changed
    props = out["properties"]
    closed = [out, props["owner"], out["$defs"]["pet"], out["definitions"]["old"],
              props["pair"]["prefixItems"][0], props["either"]["anyOf"][0],
              props["one"]["oneOf"][0]]
    assert all(s["additionalProperties"] is False for s in closed)
    assert "additionalProperties" not in props["either"]["anyOf"][1]  # not an object schema
    assert strict_accepts(schema, {"owner": {"name": "a"}, "pets": [{"name": "b"}]})
    assert not strict_accepts(schema, {"owner": {"name": "a", "story_01": "x"}})
    assert not strict_accepts(schema, {"pets": [{"name": "b", "family_141": 1}]})
    assert not strict_accepts(schema, {"either": {"name": "b", "x": 1}})
    assert not strict_accepts(schema, {"extra": 1})


@pytest.mark.parametrize("allowed", [True, {"type": "integer"}])
def test_an_explicit_additional_properties_is_kept(allowed: Any) -> None:
    schema = {**PET, "additionalProperties": allowed}
    out = forbid_additional_properties(schema)
    assert out["additionalProperties"] == allowed
    assert strict_accepts(schema, {"name": "a", "age": 3})


def test_unevaluated_properties_and_open_objects_are_kept() -> None:
    assert forbid_additional_properties({"type": "object"}) == {"type": "object"}
    schema = {**PET, "unevaluatedProperties": True}
    assert "additionalProperties" not in forbid_additional_properties(schema)
    assert forbid_additional_properties(True) is True


def test_all_of_branches_are_merged_not_closed_each() -> None:
    """Closing each allOf branch would forbid the other branch's names: nothing would be valid."""
    schema = {"allOf": [PET, {"properties": {"age": {"type": "integer"}}}]}
    out = forbid_additional_properties(schema)
    assert out["additionalProperties"] is False and set(out["properties"]) == {"name", "age"}
    assert strict_accepts(schema, {"name": "a", "age": 2})
    assert not strict_accepts(schema, {"name": "a", "age": "two"})  # the branch still types it
    assert not strict_accepts(schema, {"name": "a", "color": "red"})


def test_alternatives_of_an_object_with_properties_are_merged() -> None:
    schema = {"properties": {"kind": {"type": "string"}},
              "oneOf": [{"properties": {"x": {"type": "integer"}}, "required": ["x"]},
                        {"properties": {"y": {"type": "integer"}}, "required": ["y"]}]}
    assert strict_accepts(schema, {"kind": "a", "x": 1})
    assert not strict_accepts(schema, {"kind": "a", "x": 1, "z": 0})


def test_a_branch_behind_a_local_ref_is_merged_and_the_definition_left_open() -> None:
    schema = {"allOf": [{"$ref": "#/$defs/pet"}, {"properties": {"age": {}}}],
              "$defs": {"pet": PET}}
    out = forbid_additional_properties(schema)
    assert "additionalProperties" not in out["$defs"]["pet"]
    assert out["additionalProperties"] is False and set(out["properties"]) == {"name", "age"}
    assert strict_accepts(schema, {"name": "a", "age": 1})
    assert not strict_accepts(schema, {"name": "a", "age": 1, "color": "red"})


def test_a_branch_behind_a_remote_ref_leaves_the_object_open() -> None:
    schema = {"allOf": [{"$ref": "https://example.com/pet.json"}, {"properties": {"age": {}}}]}
    assert "additionalProperties" not in forbid_additional_properties(schema)

"""Strict JSON schemas: object schemas that name their properties refuse all others.

JSON Schema lets an object carry any property its schema does not name unless
`additionalProperties` says otherwise, and llguidance follows the letter of that. A small model
sampled at temperature 1 then invents property after property and never closes the object.
OpenAI's strict mode, and vLLM's default grammar backend, refuse undeclared properties; so
does kvflow by default (`disable_additional_properties`), by rewriting the schema before it is
compiled: every object schema that declares properties and says nothing about others gets
`"additionalProperties": false`. An explicit `additionalProperties` (true or a schema) or
`unevaluatedProperties` is kept as written.

Subschemas that describe the same instance as their parent (`allOf` branches, and `anyOf` /
`oneOf` alternatives of a parent that declares properties itself) are merged by the
validator, so closing each one would forbid the others' properties and leave nothing valid.
Their names are declared on the parent instead, which is closed once; a branch whose names
cannot be seen (a `$ref`) leaves that object open.
"""

from __future__ import annotations

from typing import Any

# keys whose value is a map of name -> subschema
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# keys whose value is one subschema (or, for items, possibly a list of them)
_SUBSCHEMAS = ("items", "additionalItems", "contains", "not", "if", "then", "else",
               "additionalProperties", "unevaluatedProperties", "unevaluatedItems",
               "propertyNames", "prefixItems")
# subschemas describing the same instance as their parent
_SAME_INSTANCE = ("allOf", "anyOf", "oneOf")


def forbid_additional_properties(schema: Any) -> Any:
    """A copy of `schema` where each object schema naming its properties refuses others."""
    return _Rewriter(schema).walk(schema, close=True)


class _Rewriter:
    """One rewrite; knows the root, to follow local `$ref`s ("#/$defs/x") of merged branches."""

    def __init__(self, root: Any) -> None:
        self.root = root
        # definitions some object merges with itself through a $ref: left open at their level
        self.merged_refs: set[str] = set()
        self._collect_merged_refs(root, close=True)

    def walk(self, schema: Any, close: bool) -> Any:
        """Rewrite one subschema; `close`: this level may get additionalProperties false."""
        if isinstance(schema, list):
            return [self.walk(item, close=True) for item in schema]
        if not isinstance(schema, dict):
            return schema  # true / false schemas, or a value we do not interpret
        out = dict(schema)
        for key in _SCHEMA_MAPS:
            if isinstance(out.get(key), dict):
                out[key] = {name: self.walk(sub, close=f"#/{key}/{name}" not in self.merged_refs)
                            for name, sub in out[key].items()}
        for key in _SUBSCHEMAS:
            if isinstance(out.get(key), (dict, list)):
                out[key] = self.walk(out[key], close=True)
        own = set(out["properties"]) if isinstance(out.get("properties"), dict) else set()
        for key in _SAME_INSTANCE:
            if isinstance(out.get(key), list):
                merged = _merges(key, bool(own), close)
                out[key] = [self.walk(b, close=not merged) for b in out[key]]
        if not close or "additionalProperties" in out or "unevaluatedProperties" in out:
            return out
        shared = self._branch_names(out, merged_alternatives=bool(own))
        if shared is None:
            return out  # a merged branch's names are unknown (a remote $ref): leave it open
        if not own and not shared and not isinstance(out.get("patternProperties"), dict):
            return out  # names no property: an open object such as {"type": "object"}
        properties = dict(out.get("properties") or {})
        for name in sorted(shared - own):
            properties[name] = {}  # declared here; the branch that names it constrains it
        out["properties"] = properties
        out["additionalProperties"] = False
        return out

    def _branch_names(self, schema: dict[str, Any], merged_alternatives: bool,
                      depth: int = 0) -> set[str] | None:
        """Property names that merged same-instance branches declare; None if unknowable."""
        found: set[str] = set()
        for key in _SAME_INSTANCE:
            if key != "allOf" and not merged_alternatives:
                continue
            for branch in schema.get(key) or ():
                names = self._names_of(branch, depth)
                if names is None:
                    return None
                found |= names
        return found

    def _names_of(self, branch: Any, depth: int) -> set[str] | None:
        if not isinstance(branch, dict):
            return set()
        if "$ref" in branch:
            target = self._local(branch["$ref"])
            if target is None or depth > 8:  # remote, missing, or a cycle of refs
                return None
            branch = {**target, **{k: v for k, v in branch.items() if k != "$ref"}}
        nested = self._branch_names(branch, merged_alternatives=True, depth=depth + 1)
        if nested is None:
            return None
        own = branch.get("properties")
        return nested | (set(own) if isinstance(own, dict) else set())

    def _local(self, ref: Any) -> dict[str, Any] | None:
        """The definition a "#/$defs/name" or "#/definitions/name" ref names, if present."""
        parts = ref.split("/") if isinstance(ref, str) else []
        if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
            return None
        defs = self.root.get(parts[1]) if isinstance(self.root, dict) else None
        target = defs.get(parts[2]) if isinstance(defs, dict) else None
        return target if isinstance(target, dict) else None

    def _collect_merged_refs(self, schema: Any, close: bool) -> None:
        """Find every local $ref that is merged into an enclosing object (see `_merges`)."""
        if isinstance(schema, list):
            for item in schema:
                self._collect_merged_refs(item, close=True)
            return
        if not isinstance(schema, dict):
            return
        own = isinstance(schema.get("properties"), dict) and bool(schema["properties"])
        for key, value in schema.items():
            if key in _SAME_INSTANCE and isinstance(value, list):
                merged = _merges(key, own, close)
                for branch in value:
                    if merged and isinstance(branch, dict) and isinstance(branch.get("$ref"), str):
                        self.merged_refs.add(branch["$ref"])
                    self._collect_merged_refs(branch, close=not merged)
            elif key in _SCHEMA_MAPS and isinstance(value, dict):
                for sub in value.values():
                    self._collect_merged_refs(sub, close=True)
            elif key in _SUBSCHEMAS:
                self._collect_merged_refs(value, close=True)


def _merges(key: str, parent_names_properties: bool, parent_closes: bool) -> bool:
    """Whether branches under `key` are merged with their parent (so not closed each):
    allOf always; anyOf / oneOf once the parent, or an enclosing merged object, names
    properties of its own (else each alternative is a separate object and is closed)."""
    return key == "allOf" or parent_names_properties or not parent_closes

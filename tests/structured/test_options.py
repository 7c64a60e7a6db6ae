"""structured_outputs_config: parsing, defaults, and per-request overrides."""

from __future__ import annotations

import pytest

from kvflow import EngineArgs
from kvflow.sampling_params import StructuredOutputsParams
from kvflow.structured.options import StructuredOutputsConfig


def test_defaults() -> None:
    config = StructuredOutputsConfig.parse(None)
    # undeclared properties refused; whitespace bounded (compact only when asked)
    assert config.disable_additional_properties and not config.disable_any_whitespace


@pytest.mark.parametrize("value", ['{"disable_any_whitespace": true}',
                                   {"disable_any_whitespace": True}])
def test_parse_json_or_dict(value: object) -> None:
    config = StructuredOutputsConfig.parse(value)  # type: ignore[arg-type]
    assert config == StructuredOutputsConfig(disable_any_whitespace=True)


@pytest.mark.parametrize(("value", "message"), [
    ("{oops", "JSON object"), ("[1]", "JSON object"), ('{"backend": "xgrammar"}', "unknown"),
    ('{"disable_any_whitespace": "no"}', "true or false"),
])
def test_bad_values_raise(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StructuredOutputsConfig.parse(value)


def test_request_overrides_the_engine() -> None:
    lenient = StructuredOutputsConfig(False, False)
    assert lenient.resolve(StructuredOutputsParams(json={})) == (False, False)
    assert lenient.resolve(StructuredOutputsParams(
        json={}, disable_additional_properties=True)) == (False, True)
    with pytest.raises(ValueError, match="disable_any_whitespace"):
        StructuredOutputsParams(json={}, disable_any_whitespace="yes")  # type: ignore[arg-type]


def test_engine_flag(tiny_llama_path) -> None:
    import argparse

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(["--structured-outputs-config",
                              '{"disable_additional_properties": false}'])
    args.model = str(tiny_llama_path)
    config = EngineArgs.from_cli_args(args).create_engine_config()
    assert config.structured_outputs_config == StructuredOutputsConfig(
        disable_additional_properties=False)
    with pytest.raises(ValueError, match="structured_outputs_config"):
        EngineArgs(model=str(tiny_llama_path), structured_outputs_config="1").create_engine_config()

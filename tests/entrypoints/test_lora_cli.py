"""`kvflow serve --enable-lora --lora-modules ...`: the flag, startup refusals, a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kvflow.entrypoints.cli import build_parser, main
from kvflow.entrypoints.openai.serving_models import LoRAModulePath
from tests.entrypoints.conftest import TINY_ARGS, RemoteServer
from tests.entrypoints.hostile import assert_error, wait_for_no_leftovers
from tests.entrypoints.lora_server import make_test_adapters


@pytest.fixture(scope="module")
def adapters(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_test_adapters(tiny_llama_path, tmp_path_factory.mktemp("cli-adapters"))


def serve(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`kvflow serve` that is expected to exit by itself."""
    return subprocess.run([sys.executable, "-m", "kvflow.entrypoints.cli", "serve", *args,
                           "--port", "0"], capture_output=True, text=True, timeout=timeout)


def test_lora_modules_flag() -> None:
    args = build_parser().parse_args([
        "serve", "m", "--enable-lora", "--max-lora-rank", "8", "--lora-modules", "a=/x",
        '{"name": "b", "path": "/y", "base_model_name": "m"}'])
    assert args.lora_modules == [LoRAModulePath("a", "/x"), LoRAModulePath("b", "/y", "m")]
    assert args.enable_lora and args.max_lora_rank == 8
    assert build_parser().parse_args(["serve", "m"]).lora_modules is None


def test_a_bad_item_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--lora-modules", '{"name": "a"}'])
    assert info.value.code == 2
    assert "--lora-modules" in capsys.readouterr().err


def test_lora_modules_need_enable_lora(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "some/model", "--lora-modules", "a=/x"]) == 2  # loads nothing
    assert "kvflow serve: error: --lora-modules needs --enable-lora" in capsys.readouterr().err


@pytest.mark.slow  # loads the engine (~10-20 s on 2 cores) to find the adapter bad
def test_a_bad_static_adapter_stops_the_start(tiny_llama_path: Path,
                                              adapters: dict[str, Path]) -> None:
    done = serve([str(tiny_llama_path), *TINY_ARGS, "--enable-lora", "--lora-modules",
                  f"good={adapters['sql']}", f"bad={adapters['dora']}"])
    assert done.returncode == 1, done.stderr
    assert (f"kvflow serve: error: cannot load --lora-modules adapter 'bad' "
            f"({adapters['dora']})") in done.stderr
    assert "DoRA adapters are not supported" in done.stderr
    assert "is serving" not in done.stdout


@pytest.mark.slow  # a server process of its own (~20 s on 2 cores)
def test_static_adapters_from_the_command_line(tiny_llama_path: Path,
                                               adapters: dict[str, Path]) -> None:
    chat = json.dumps({"name": "chat", "path": str(adapters["chat"]),
                       "base_model_name": "tiny"})
    with RemoteServer([str(tiny_llama_path), "--served-model-name", "tiny", *TINY_ARGS,
                       "--enable-lora", "--max-lora-rank", "16", "--lora-modules",
                       f"sql={adapters['sql']}", chat]) as server:
        models = server.client().models.list().data
        assert [(m.id, (m.model_extra or {}).get("root"), (m.model_extra or {}).get("parent"))
                for m in models] == [("tiny", str(tiny_llama_path), None),
                                     ("sql", str(adapters["sql"]), "tiny"),
                                     ("chat", str(adapters["chat"]), "tiny")]
        texts = {}
        for model in ("tiny", "sql", "chat"):
            out = server.client().completions.create(model=model, prompt="Hello", max_tokens=8,
                                                     temperature=0,
                                                     extra_body={"ignore_eos": True})
            assert out.model == model
            texts[model] = out.choices[0].text
        assert len(set(texts.values())) == 3
        # no KVFLOW_ALLOW_RUNTIME_LORA_UPDATING: no runtime endpoints
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            assert_error(httpx.post(server.url(path), json={"lora_name": "sql"}), 404)
        metrics = httpx.get(server.url("/metrics")).text
        assert 'kvflow:lora_running_requests{lora_name="sql",model_name="tiny"} 0.0' in metrics
        assert "LoRA adapters (name one in `model`): sql, chat" in server.log()
        assert not wait_for_no_leftovers(server)

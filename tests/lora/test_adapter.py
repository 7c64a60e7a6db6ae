"""Reading PEFT folders: scales, identity, and every refusal naming the adapter."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvflow.lora.adapter import LoRAShapes, load_adapter, max_file_bytes
from kvflow.lora.request import LoRARequest

SHAPES = LoRAShapes(num_layers=2, hidden_size=64, q_size=64, kv_size=32, intermediate_size=128)


def read(path: Path, max_rank: int = 16, name: str = "ad") -> object:
    return load_adapter(LoRARequest(name, 1, str(path)), SHAPES, max_rank, torch.float32)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes: object) -> Path:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


def test_reads_peft_folder_with_scale_folded(llama_adapters: dict[str, Path]) -> None:
    adapter = read(llama_adapters["qv8"])
    tensors = load_file(llama_adapters["qv8"] / "adapter_model.safetensors")
    assert adapter.rank == 8
    assert set(adapter.weights) == {(layer, m) for layer in (0, 1) for m in ("q_proj", "v_proj")}
    a, b = adapter.weights[(1, "v_proj")]
    prefix = "base_model.model.model.layers.1.self_attn.v_proj"
    torch.testing.assert_close(a, tensors[f"{prefix}.lora_A.weight"])
    torch.testing.assert_close(b, tensors[f"{prefix}.lora_B.weight"] * (16 / 8))  # alpha / r


def test_rslora_scale(llama_adapters: dict[str, Path]) -> None:
    adapter = read(llama_adapters["rs8"])
    tensors = load_file(llama_adapters["rs8"] / "adapter_model.safetensors")
    b = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    torch.testing.assert_close(adapter.weights[(0, "down_proj")][1], b * (16 / math.sqrt(8)))


def test_alpha_pattern(llama_adapters: dict[str, Path], tmp_path: Path) -> None:
    folder = edit_config(copy(llama_adapters["qv8"], tmp_path / "a"), alpha_pattern={"v_proj": 4})
    adapter = read(folder)
    plain = read(llama_adapters["qv8"])
    torch.testing.assert_close(adapter.weights[(0, "v_proj")][1],
                               plain.weights[(0, "v_proj")][1] * (4 / 16))
    torch.testing.assert_close(adapter.weights[(0, "q_proj")][1], plain.weights[(0, "q_proj")][1])


def test_digest_is_content(llama_adapters: dict[str, Path], tmp_path: Path) -> None:
    same = copy(llama_adapters["qv8"], tmp_path / "same")
    assert read(same, name="other").digest == read(llama_adapters["qv8"]).digest
    changed = edit_config(copy(llama_adapters["qv8"], tmp_path / "changed"), lora_alpha=3)
    assert read(changed).digest != read(llama_adapters["qv8"]).digest


def refused(path: Path, *words: str, max_rank: int = 16) -> None:
    with pytest.raises(ValueError) as info:
        read(path, max_rank=max_rank, name="bad-one")
    message = str(info.value)
    assert "'bad-one'" in message
    for word in words:
        assert word in message, message


def test_refusals(llama_adapters: dict[str, Path], tiny_llama_path: Path,
                  tmp_path: Path) -> None:
    good = llama_adapters["qv8"]
    refused(tmp_path / "nowhere", "No adapter found")
    refused(good, "rank 8", "max_lora_rank=4", max_rank=4)
    refused(edit_config(copy(good, tmp_path / "dora"), use_dora=True), "DoRA")
    refused(edit_config(copy(good, tmp_path / "save"), modules_to_save=["lm_head"]),
            "modules_to_save")
    refused(edit_config(copy(good, tmp_path / "bias"), bias="all"), "bias")
    refused(edit_config(copy(good, tmp_path / "ia3"), peft_type="IA3"), "IA3")
    broken = copy(good, tmp_path / "corrupt")
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    refused(broken, "corrupt")
    garbage = copy(good, tmp_path / "json")
    (garbage / "adapter_config.json").write_text("{not json")
    refused(garbage, "not valid JSON")
    huge = copy(good, tmp_path / "huge")
    with (huge / "adapter_model.safetensors").open("r+b") as f:
        f.truncate(max_file_bytes(SHAPES, 16) + 1)  # sparse: nothing is written or read
    refused(huge, "larger than any adapter")
    no_weights = copy(good, tmp_path / "noweights")
    (no_weights / "adapter_model.safetensors").unlink()
    refused(no_weights, "missing")


def test_refuses_other_shapes_and_modules(llama_adapters: dict[str, Path], tmp_path: Path) -> None:
    good = llama_adapters["qv8"]
    tensors = load_file(good / "adapter_model.safetensors")
    wrong = copy(good, tmp_path / "shape")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({**tensors, key: torch.zeros(8, 48)}, wrong / "adapter_model.safetensors")
    refused(wrong, "layer 0 q_proj", "do not fit")
    embed = copy(good, tmp_path / "embed")
    embedding = "base_model.model.model.embed_tokens.lora_embedding_A"
    save_file({**tensors, embedding: torch.zeros(8, 4)}, embed / "adapter_model.safetensors")
    refused(embed, "embedding or LM-head")
    deep = copy(good, tmp_path / "deep")
    extra = key.replace("layers.0", "layers.7")
    save_file({**tensors, extra: tensors[key].clone()}, deep / "adapter_model.safetensors")
    refused(deep, "layer 7")


def test_other_base_model_is_refused(llama_adapters: dict[str, Path]) -> None:
    wider = LoRAShapes(num_layers=2, hidden_size=96, q_size=96, kv_size=48, intermediate_size=128)
    with pytest.raises(ValueError, match="do not fit the base model"):
        load_adapter(LoRARequest("w", 1, str(llama_adapters["all4"])), wider, 16, torch.float32)


def test_request_fields() -> None:
    with pytest.raises(ValueError, match="> 0"):
        LoRARequest("x", 0, "/p")
    with pytest.raises(ValueError, match="non-empty"):
        LoRARequest("", 1, "/p")
    assert LoRARequest("x", 1, "/a") == LoRARequest("x", 2, "/b")  # vLLM: the name decides
    assert len({LoRARequest("x", 1, "/a"), LoRARequest("x", 2, "/b")}) == 1

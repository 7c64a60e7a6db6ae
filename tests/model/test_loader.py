"""Loading HF folders: architecture choice, refusals, weight checks, GGUF name/layout helpers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import hf_logits, llama_cpp_permute, run_full_prompt, save_tiny, tiny_config
from safetensors.torch import load_file, save_file

from kvflow.errors import ModelLoadError
from kvflow.model import hugepages
from kvflow.model.layers import rope_parameters
from kvflow.model.loader import (
    hf_tensor_name,
    iterate_weights,
    load_hf_config,
    load_model,
    unpermute_rotary,
)

CPU = torch.device("cpu")
PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 23, 84, 62, 64, 33, 83, 27, 95, 2, 88, 41, 97]


def test_unsupported_architecture_is_refused_by_name(tmp_path: Path) -> None:
    tiny_config("gpt2", "GPT2LMHeadModel").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPT2LMHeadModel'") as err:
        load_model(tmp_path, torch.float32, CPU)
    assert "LlamaForCausalLM" in str(err.value)


def test_folder_without_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=str(tmp_path / "config.json")):
        load_hf_config(tmp_path)


def test_folder_without_weights_is_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    shutil.copy(tiny_llama_dir / "config.json", tmp_path)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(tmp_path, torch.float32, CPU)


def test_missing_weight_is_named(tmp_path: Path, tiny_llama_dir: Path) -> None:
    shutil.copy(tiny_llama_dir / "config.json", tmp_path)
    weights = load_file(tiny_llama_dir / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="model.layers.1.self_attn.k_proj.weight"):
        load_model(tmp_path, torch.float32, CPU)


def test_truncated_weights_name_the_file(tmp_path: Path, tiny_llama_dir: Path) -> None:
    shutil.copy(tiny_llama_dir / "config.json", tmp_path)
    data = (tiny_llama_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(tmp_path, torch.float32, CPU)


def test_weights_read_equal_safetensors_own_reader(tmp_path: Path) -> None:
    """The plain-read loader against safetensors' reader: every dtype, scalar, empty tensor."""
    tensors = {
        "a.f32": torch.randn(5, 7), "b.bf16": torch.randn(3, 4).bfloat16(),
        "c.f16": torch.randn(9).half(), "d.i64": torch.arange(6).view(2, 3),
        "e.bool": torch.tensor([True, False, True]), "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4), "h.u8": torch.arange(10, dtype=torch.uint8),
    }
    save_file(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    read = dict(iterate_weights([tmp_path / "w.safetensors"]))
    assert read.keys() == tensors.keys()
    for name, expected in load_file(tmp_path / "w.safetensors").items():
        assert read[name].dtype == expected.dtype and read[name].shape == expected.shape
        assert torch.equal(read[name], expected), name


def test_weights_land_in_huge_pages_on_cpu(tiny_llama_dir: Path) -> None:
    """Float CPU weights are read straight into one huge-page arena (2 MiB aligned start)."""
    if not hugepages.supported():
        pytest.skip("no MADV_HUGEPAGE here")
    model = load_model(tiny_llama_dir, torch.float32, CPU)
    starts = sorted(p.data_ptr() for p in model.parameters())
    assert starts[0] % (2 << 20) == 0
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert starts[-1] - starts[0] < total + 64 * len(starts)  # one contiguous arena


def test_model_from_config_dict_matches_model_from_folder(tiny_llama_dir: Path) -> None:
    """The engine core builds from ModelConfig.hf_config (a dict), not config.json."""
    as_dict = load_hf_config(tiny_llama_dir).to_dict()
    torch.testing.assert_close(
        run_full_prompt(load_model(tiny_llama_dir, torch.float32, CPU, hf_config=as_dict), PROMPT),
        run_full_prompt(load_model(tiny_llama_dir, torch.float32, CPU), PROMPT), atol=0, rtol=0)


def test_loading_from_a_config_dict_imports_no_model_classes(tiny_llama_dir: Path) -> None:
    """transformers' model config classes and torch._dynamo (via meta-device init) pull in
    sympy and accelerate: ~60 MB resident in the engine core for nothing."""
    as_dict = load_hf_config(tiny_llama_dir).to_dict()
    code = (
        "import sys, torch\n"
        "from kvflow.model.loader import load_model\n"
        f"load_model({str(tiny_llama_dir)!r}, torch.float32, torch.device('cpu'), "
        f"hf_config={as_dict!r})\n"
        "print(sorted(m for m in ('sympy', 'accelerate', 'torch._dynamo', "
        "'transformers.models.llama') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


def test_sharded_checkpoint_loads(tmp_path: Path, tiny_llama_dir: Path) -> None:
    shutil.copy(tiny_llama_dir / "config.json", tmp_path)
    weights = load_file(tiny_llama_dir / "model.safetensors")
    names = sorted(weights)
    for index, part in enumerate((names[::2], names[1::2])):
        shard = {name: weights[name] for name in part}
        save_file(shard, tmp_path / f"model-0000{index + 1}-of-00002.safetensors")
    torch.testing.assert_close(
        run_full_prompt(load_model(tmp_path, torch.float32, CPU), PROMPT),
        run_full_prompt(load_model(tiny_llama_dir, torch.float32, CPU), PROMPT),
    )


def test_mistral_without_sliding_window_matches_transformers(tmp_path: Path) -> None:
    config = tiny_config("mistral", "MistralForCausalLM", sliding_window=None)
    save_tiny(tmp_path, config, seed=2)
    ours = run_full_prompt(load_model(tmp_path, torch.float32, CPU), PROMPT)
    torch.testing.assert_close(ours, hf_logits(tmp_path, PROMPT), atol=1e-4, rtol=1e-4)


def test_sliding_window_caps_the_context(tmp_path: Path) -> None:
    """Within its window, sliding-window attention is whole-context attention: the context
    is capped at the window and the logits are transformers' (window 64 > the prompt)."""
    from kvflow.config import EngineArgs

    config = tiny_config("mistral", "MistralForCausalLM", sliding_window=64)
    save_tiny(tmp_path, config, seed=2)
    ours = run_full_prompt(load_model(tmp_path, torch.float32, CPU), PROMPT)
    torch.testing.assert_close(ours, hf_logits(tmp_path, PROMPT), atol=1e-4, rtol=1e-4)
    def args(**more: Any) -> EngineArgs:
        return EngineArgs(model=str(tmp_path), device="cpu", dtype="float32", **more)

    assert args().create_engine_config().model_config.max_model_len == 64
    with pytest.raises(ValueError, match="sliding window: 64"):
        args(max_model_len=65).create_engine_config()


def test_llama3_rope_scaling_matches_transformers(tmp_path: Path) -> None:
    # A short original context, so the prompt runs past it and every branch of the
    # frequency ramp (divided, smoothed, unchanged) is used.
    scaling = {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    }
    config = tiny_config("llama", "LlamaForCausalLM", rope_theta=1e4, rope_scaling=scaling)
    save_tiny(tmp_path, config, seed=3)
    ours = run_full_prompt(load_model(tmp_path, torch.float32, CPU), PROMPT)
    torch.testing.assert_close(ours, hf_logits(tmp_path, PROMPT), atol=1e-4, rtol=1e-4)


def test_unimplemented_rope_scaling_is_refused() -> None:
    config = SimpleNamespace(rope_parameters={"rope_theta": 1e4, "rope_type": "yarn"})
    with pytest.raises(ModelLoadError, match="rope scaling type 'yarn'"):
        rope_parameters(config)
    legacy = SimpleNamespace(rope_theta=5e5, rope_scaling=None)
    assert rope_parameters(legacy) == (5e5, None)


@pytest.mark.parametrize("shape", [(4 * 16, 64), (2 * 16,)])
def test_unpermute_undoesllama_cpp_permute(shape: tuple[int, ...]) -> None:
    weight = torch.randn(shape)
    num_heads = shape[0] // 16
    torch.testing.assert_close(
        unpermute_rotary(llama_cpp_permute(weight, num_heads), num_heads), weight
    )


def test_gguf_tensor_names() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.12.attn_k.bias") == "model.layers.12.self_attn.k_proj.bias"
    assert (
        hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    )
    assert hf_tensor_name("rope_freqs.weight") is None
    with pytest.raises(ModelLoadError, match="ffn_gate_exps"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")

"""The llama.cpp baseline's GGUF re-encoder (benchmarks/llamacpp.py): same weights, same
metadata, F32 exactly, BF16 rounded to nearest even, and Q8_0 within its rounding."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))

from conftest import tiny_config, write_tiny_gguf  # noqa: E402
from llamacpp import write_gguf  # noqa: E402


def _tensors(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
            for t in reader.tensors}


@pytest.mark.parametrize("qtype", ["F32", "BF16", "Q8_0"])
def test_reencoded_gguf_keeps_weights_and_metadata(qtype: str, tmp_path: Path) -> None:
    from conftest import save_tiny

    hf_dir = save_tiny(tmp_path / "hf", tiny_config("llama", "LlamaForCausalLM",
                                                    tie_word_embeddings=False), seed=3)
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, "llama", hf_dir)
    dst = write_gguf(src, tmp_path / f"tiny.{qtype}.gguf", qtype)
    before, after = _tensors(src), _tensors(dst)
    assert before.keys() == after.keys()
    reader = gguf.GGUFReader(dst)
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    for name, values in before.items():
        two_d = len(next(t for t in reader.tensors if t.name == name).shape) == 2
        if qtype == "F32" or not two_d:
            assert kinds[name] == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(after[name], values)
        elif qtype == "BF16":
            assert kinds[name] == gguf.GGMLQuantizationType.BF16
            rounded = torch.from_numpy(values.copy()).to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(after[name], rounded)
        else:
            assert kinds[name] == gguf.GGMLQuantizationType.Q8_0
            # Q8_0: blocks of 32 share a scale of max|x| / 127, stored in float16; rounding is
            # half a step, plus up to 127 times the scale's own rounding (2^-11 relative).
            step = np.abs(values.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            bound = step * (0.5 + 127 * 2.0**-11) + 1e-7
            assert (np.abs(after[name] - values).reshape(-1, 32) <= bound).all()
    old, new = gguf.GGUFReader(src).fields, reader.fields
    for key in ("tokenizer.ggml.tokens", "llama.block_count", "tokenizer.chat_template"):
        assert new[key].contents() == old[key].contents()
    assert new["general.file_type"].contents() == {"F32": 0, "BF16": 32, "Q8_0": 7}[qtype]

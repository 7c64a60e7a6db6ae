"""The project's own adapter (kvflow/lora/example.py) makes the default model answer in JSON,
on questions it never saw, while the base model in the same batch does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvflow import LLM, LoRARequest, SamplingParams
from kvflow.lora import example
from kvflow.lora.example_data import json_answer, make_examples
from tests.engine.leaks import assert_core_clean

# None of these is a training question, nor built from one of its templates' tables.
HELD_OUT = [
    "What is the capital of Japan?",
    "How many legs does a spider have?",
    "Why is the sky blue?",
    "Give me a tip for learning to cook.",
    "Name a planet in our solar system.",
    "What is photosynthesis?",
]


def parsed_answer(text: str) -> object:
    """The "answer" value when text is exactly a JSON object holding one, else None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value.get("answer") if isinstance(value, dict) else None


def test_training_data_is_json_and_excludes_held_out_questions() -> None:
    examples = make_examples(example.RECIPE["examples"], example.RECIPE["seed"])
    assert examples == make_examples(example.RECIPE["examples"], example.RECIPE["seed"])
    questions = {messages[-1]["content"] for messages, _ in examples}
    assert len(questions) == len(examples)
    assert not questions & set(HELD_OUT)
    assert all(isinstance(parsed_answer(answer), str) for _, answer in examples)
    assert parsed_answer(json_answer('say "hi"')) == 'say "hi"'


def test_cached_adapter_is_reused_and_an_old_recipe_retrained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFLOW_CACHE_DIR", str(tmp_path))
    trained: list[Path] = []

    def fake_train(folder: Path) -> dict[str, float]:
        trained.append(folder)
        (folder / "adapter_config.json").write_text("{}")
        return {"seconds": 0.0}

    monkeypatch.setattr(example, "train", fake_train)
    folder = example.example_adapter()
    assert folder == tmp_path / "adapters" / f"smollm2-json-v{example.RECIPE_VERSION}"
    assert example.is_trained(folder) and (folder / "adapter_config.json").is_file()
    assert example.example_adapter() == folder and len(trained) == 1  # cached
    marker = json.loads((folder / example.MARKER).read_text())
    marker["recipe"] = {**marker["recipe"], "lr": 1.0}
    (folder / example.MARKER).write_text(json.dumps(marker))
    assert not example.is_trained(folder)
    assert example.example_adapter() == folder and len(trained) == 2  # retrained
    assert example.is_trained(folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temp left


@pytest.mark.timeout(1800)  # ~10 s, unless the adapter is missing: then it trains first
def test_adapter_answers_held_out_questions_in_json() -> None:
    if not example.is_trained(example.adapter_dir()):  # `make setup` trains it
        pytest.importorskip("peft")
    folder = example.example_adapter()
    llm = LLM(enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=256,
              max_model_len=1024)
    adapter = LoRARequest("json", 1, str(folder))
    chats = [[{"role": "user", "content": q}] for q in HELD_OUT for _ in ("adapter", "base")]
    loras: list[LoRARequest | None] = [adapter, None] * len(HELD_OUT)
    outs = llm.chat(chats, SamplingParams(temperature=0, max_tokens=64), lora_request=loras,
                    use_tqdm=False)
    texts = [out.outputs[0].text for out in outs]
    for question, adapted, base in zip(HELD_OUT, texts[0::2], texts[1::2], strict=True):
        answer = parsed_answer(adapted)
        assert isinstance(answer, str) and answer.strip(), (question, adapted)
        assert parsed_answer(base) is None and not base.lstrip().startswith("{"), (question, base)
    assert_core_clean(llm.llm_engine.core)

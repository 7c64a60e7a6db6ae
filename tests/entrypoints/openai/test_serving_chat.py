"""POST /v1/chat/completions through the official openai client, against a real server."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.entrypoints.conftest import DEFAULT_MODEL, RemoteServer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(default_server: RemoteServer) -> openai.OpenAI:
    return default_server.client()


def stream_text(client: openai.OpenAI, **kwargs: Any) -> tuple[dict[int, str], list[Any]]:
    texts: dict[int, str] = {}
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts, chunks


def test_reply_and_stream_agree_for_greedy(client: openai.OpenAI) -> None:
    kwargs = dict(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    message = full.choices[0].message
    assert message.role == "assistant" and "Paris" in (message.content or "")
    texts, chunks = stream_text(client, stream_options={"include_usage": True}, **kwargs)
    assert texts == {0: message.content}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_usage_counts_the_template(client: openai.OpenAI, default_server: RemoteServer) -> None:
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Colour of the sky?"},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "And grass?"}]
    count = httpx.post(default_server.url("/tokenize"),
                       json={"messages": messages}).json()["count"]
    out = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages,  # type: ignore[arg-type]
                                         max_completion_tokens=4, n=2, seed=5,
                                         extra_body={"ignore_eos": True})
    assert out.usage is not None
    assert out.usage.prompt_tokens == count
    assert out.usage.completion_tokens == 8
    assert [c.finish_reason for c in out.choices] == ["length", "length"]


def test_seed_n2_stream_and_full(client: openai.OpenAI) -> None:
    kwargs = dict(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=8, n=2, seed=11,
                  temperature=1.0)
    first = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    second = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in second.choices]
    streamed, chunks = stream_text(client, **kwargs)
    assert [streamed[0], streamed[1]] == texts
    assert {c.choices[0].delta.role for c in chunks[:2]} == {"assistant"}


def test_stop_string(client: openai.OpenAI) -> None:
    kwargs = dict(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    free = client.chat.completions.create(**kwargs).choices[0].message.content  # type: ignore[call-overload]
    assert free and "Paris" in free
    out = client.chat.completions.create(stop=["Paris"], **kwargs)  # type: ignore[call-overload]
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == free[:free.index("Paris")]
    streamed, _ = stream_text(client, stop=["Paris"], **kwargs)
    assert streamed[0] == out.choices[0].message.content


def test_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION,  # type: ignore[arg-type]
                                         max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=2)
    assert out.choices[0].logprobs is not None
    content = out.choices[0].logprobs.content
    assert content is not None and out.usage is not None
    assert len(content) == out.usage.completion_tokens
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for item in content:
        assert item.logprob <= 0 and item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].token == item.token  # greedy: the best token
    _, chunks = stream_text(client, model=DEFAULT_MODEL, messages=QUESTION, max_tokens=6,
                            temperature=0, logprobs=True, top_logprobs=2)
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs
                for t in ch.logprobs.content or []]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_text_content_parts_and_continue(client: openai.OpenAI) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                          {"type": "text", "text": "of France?"}]}]
    out = client.chat.completions.create(model=DEFAULT_MODEL, messages=parts,  # type: ignore[arg-type]
                                         max_tokens=16, temperature=0)
    assert "Paris" in (out.choices[0].message.content or "")
    prefix = [*QUESTION, {"role": "assistant", "content": "The capital of France is"}]
    out = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=prefix, max_tokens=4, temperature=0,  # type: ignore[arg-type]
        extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert "Paris" in (out.choices[0].message.content or "")


def test_logprob_bytes_are_the_tokens_own(default_model_path: Any) -> None:
    """A token holding part of a character reports its bytes, not U+FFFD's (ef bf bd)."""
    from transformers import AutoTokenizer

    from kvflow.engine.token_bytes import TokenBytes
    from kvflow.entrypoints.openai.serving_chat import chat_logprobs
    from kvflow.entrypoints.openai.serving_completion import TokenNamer
    from kvflow.outputs import Logprob

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    text = "你好 € ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    entries = [{t: Logprob(-0.5, 1, tokenizer.decode([t]))} for t in ids]
    result = chat_logprobs(ids, entries, 1, TokenNamer(tokenizer, False), TokenBytes(tokenizer))
    assert result.content is not None
    assert b"".join(bytes(item.bytes or []) for item in result.content) == text.encode()
    assert any(item.token == "\ufffd" for item in result.content)  # a partial character
    assert all(bytes(i.top_logprobs[0].bytes or []) == bytes(i.bytes or [])
               for i in result.content)

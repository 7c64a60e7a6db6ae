"""POST /v1/completions through the official openai client, against a real server."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.entrypoints.conftest import DEFAULT_MODEL, RemoteServer


@pytest.fixture(scope="module")
def client(default_server: RemoteServer) -> openai.OpenAI:
    return default_server.client()


def count_tokens(server: RemoteServer, prompt: str) -> int:
    body = httpx.post(server.url("/tokenize"), json={"prompt": prompt}).json()
    return int(body["count"])


def test_same_seed_same_text_with_n2(client: openai.OpenAI) -> None:
    kwargs = dict(model=DEFAULT_MODEL, prompt="Once upon a time", max_tokens=8, n=2, seed=7,
                  temperature=1.0)
    first = client.completions.create(**kwargs)  # type: ignore[call-overload]
    second = client.completions.create(**kwargs)  # type: ignore[call-overload]
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.id.startswith("cmpl-") and first.id != second.id
    assert first.object == "text_completion" and first.model == DEFAULT_MODEL


def test_usage_is_exact(client: openai.OpenAI, default_server: RemoteServer) -> None:
    prompt = "The quick brown fox"
    out = client.completions.create(model=DEFAULT_MODEL, prompt=prompt, max_tokens=6, n=2,
                                    temperature=0.8, seed=1, extra_body={"ignore_eos": True})
    assert out.usage is not None
    assert out.usage.prompt_tokens == count_tokens(default_server, prompt)
    assert out.usage.completion_tokens == 12  # 6 for each of the 2 choices
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert all(c.finish_reason == "length" for c in out.choices)


def test_stream_equals_full_for_greedy(client: openai.OpenAI) -> None:
    kwargs = dict(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=16,
                  temperature=0)
    full = client.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(client.completions.create(  # type: ignore[call-overload]
        **kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert len({c.id for c in chunks}) == 1


def test_stop_string_ends_the_text(client: openai.OpenAI) -> None:
    kwargs = dict(model=DEFAULT_MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    free = client.completions.create(**kwargs).choices[0].text  # type: ignore[call-overload]
    assert len(free) > 4
    stop = free[len(free) // 2:len(free) // 2 + 2]
    out = client.completions.create(**kwargs, stop=[stop])  # type: ignore[call-overload]
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == free[:free.index(stop)]
    assert (choice.model_extra or {})["stop_reason"] == stop


def test_max_tokens_and_its_default(client: openai.OpenAI) -> None:
    out = client.completions.create(model=DEFAULT_MODEL, prompt="Hi", max_tokens=3,
                                    extra_body={"ignore_eos": True})
    assert out.usage is not None and out.usage.completion_tokens == 3
    assert out.choices[0].finish_reason == "length"
    # Without max_tokens a request may use the rest of the context, not SamplingParams' 16.
    out = client.completions.create(model=DEFAULT_MODEL, prompt="1, 2, 3, 4,", temperature=0,
                                    stop=[" 12,"])
    assert out.choices[0].text == " 5, 6, 7, 8, 9, 10, 11,"
    assert out.usage is not None and out.usage.completion_tokens > 16
    assert out.choices[0].finish_reason == "stop"


def test_logprobs_shape(client: openai.OpenAI) -> None:
    out = client.completions.create(model=DEFAULT_MODEL, prompt="Hello, my name is",
                                    max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    for i, (token, logprob, top) in enumerate(zip(lp.tokens, lp.token_logprobs,
                                                  lp.top_logprobs, strict=True)):
        assert logprob is not None and logprob <= 0
        assert 3 <= len(top) <= 4 and token in top  # the chosen token plus the top 3
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy: the best
        if i:
            assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])


def test_echo_with_logprobs_and_token_prompts(client: openai.OpenAI,
                                              default_server: RemoteServer) -> None:
    prompt = "Paris is the capital of"
    ids = httpx.post(default_server.url("/tokenize"), json={"prompt": prompt}).json()["tokens"]
    by_text = client.completions.create(model=DEFAULT_MODEL, prompt=prompt, max_tokens=4,
                                        temperature=0, echo=True)
    out = client.completions.create(model=DEFAULT_MODEL, prompt=[ids, ids], max_tokens=4,
                                    temperature=0, echo=True, logprobs=1)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text == out.choices[1].text == by_text.choices[0].text  # greedy
    assert out.choices[0].text.startswith(prompt)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert len(lp.tokens) == len(ids) + 4
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    assert out.usage is not None and out.usage.prompt_tokens == 2 * len(ids)


def test_streaming_n2_with_usage(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=DEFAULT_MODEL, prompt="Tell me about", n=2,
                                       max_tokens=5, temperature=1.0, seed=3, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    texts = {0: "", 1: ""}
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 10
    full = client.completions.create(model=DEFAULT_MODEL, prompt="Tell me about", n=2,
                                     max_tokens=5, temperature=1.0, seed=3,
                                     extra_body={"ignore_eos": True})
    assert [texts[0], texts[1]] == [c.text for c in full.choices]

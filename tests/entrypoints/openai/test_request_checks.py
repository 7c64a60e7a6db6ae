"""Limits on what one request may ask for: the flags, the bounds, the prompt-size check."""

from __future__ import annotations

import argparse

import pytest

from kvflow.entrypoints.openai.errors import OpenAIError
from kvflow.entrypoints.openai.limits import ServerLimits
from kvflow.entrypoints.openai.protocol import CompletionRequest
from kvflow.entrypoints.openai.request_checks import (
    PromptBound,
    check_sampling_bounds,
    check_template_kwargs,
)

LIMITS = ServerLimits()


def test_flags_round_trip_and_bad_values_fail() -> None:
    parser = argparse.ArgumentParser()
    ServerLimits.add_cli_args(parser)
    args = parser.parse_args(["--max-n", "4", "--max-waiting-requests", "7",
                              "--trust-request-chat-template"])
    limits = ServerLimits.from_cli_args(args)
    assert limits.max_n == 4 and limits.trust_request_chat_template
    assert limits.waiting_bound(max_num_seqs=256, num_kv_blocks=10) == 7
    assert ServerLimits().waiting_bound(max_num_seqs=256, num_kv_blocks=10) == 256
    assert ServerLimits().waiting_bound(max_num_seqs=8, num_kv_blocks=300) == 300
    with pytest.raises(ValueError, match="max_n"):
        ServerLimits(max_n=0)
    assert "`--max-request-body-mb` | 16.0" in ServerLimits.markdown_table()


def refused(**fields: object) -> OpenAIError:
    request = CompletionRequest(prompt="x", **fields)  # type: ignore[arg-type]
    with pytest.raises(OpenAIError) as info:
        check_sampling_bounds(request, LIMITS, vocab_size=1000)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize("fields,param", [
    (dict(n=129), "n"),
    (dict(best_of=10**6), "best_of"),
    (dict(stop=["s"] * 65), "stop"),
    (dict(stop="x" * 1025), "stop"),
    (dict(bad_words=["w"] * 1025), "bad_words"),
    (dict(bad_words=["w" * 2000]), "bad_words"),
    (dict(stop_token_ids=[1] * 1025), "stop_token_ids"),
    (dict(logit_bias={str(i): 1.0 for i in range(1025)}), "logit_bias"),
    (dict(allowed_token_ids=[1] * 1001), "allowed_token_ids"),
])
def test_each_list_and_count_is_bounded(fields: dict[str, object], param: str) -> None:
    assert refused(**fields).param == param


def test_ordinary_requests_pass() -> None:
    request = CompletionRequest(prompt="x", n=128, stop=["a", "b"], bad_words=["w"] * 10,
                                logit_bias={"5": 1.0}, allowed_token_ids=list(range(1000)))
    check_sampling_bounds(request, LIMITS, vocab_size=1000)


def test_template_kwargs() -> None:
    assert check_template_kwargs({"enable_thinking": False}, trusted=False) is None
    assert check_template_kwargs({"chat_template": "{{ 1 }}"}, trusted=True) == "{{ 1 }}"
    for kwargs in ({"chat_template": "{{ 1 }}"}, {"tools": [{"type": "function"}]},
                   {"documents": [{"text": "x"}]}, {"tokenize": True}, {"return_dict": True}):
        with pytest.raises(OpenAIError) as info:
            check_template_kwargs(kwargs, trusted=False)
        assert info.value.param == "chat_template_kwargs"


def test_prompt_bound_refuses_only_what_cannot_fit() -> None:
    bound = PromptBound(max_model_len=100, max_token_bytes=10)
    bound.check("x" * 1000, "prompt")  # might be 100 tokens
    with pytest.raises(OpenAIError, match="at least 101 input tokens") as info:
        bound.check("x" * 1010, "prompt")
    assert info.value.param == "prompt"
    with pytest.raises(OpenAIError):
        bound.check("€" * 400, "prompt")  # 1,200 bytes
    PromptBound(max_model_len=100, max_token_bytes=10, shrink=3.0).check("€" * 1000, "prompt")


def test_readme_lists_every_limit() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[3] / "README.md").read_text()
    assert ServerLimits.markdown_table() in readme


def test_counts_on_the_decoded_body() -> None:
    from kvflow.entrypoints.openai.request_checks import BodyShape

    shape = BodyShape(LIMITS, max_model_len=100, vocab_size=1000)
    shape.check({"prompt": [[1] * 100] * 256, "messages": [{"role": "u"}] * 100})
    for body, param in [
        ({"prompt": ["x"] * 257}, "prompt"),
        ({"prompt": [1] * 101}, "prompt"),
        ({"prompt": [[1], [1] * 101]}, "prompt"),
        ({"messages": [{"role": "u"}] * 101}, "messages"),
        ({"messages": [{"role": "u", "content": [{"type": "text"}] * 101}]},
         "messages.0.content"),
        ({"tokens": [1] * 101}, "tokens"),
        ({"stop": ["s"] * 65}, "stop"),
        ({"allowed_token_ids": [1] * 1001}, "allowed_token_ids"),
        ({f"f{i}": 1 for i in range(300)}, None),
    ]:
        with pytest.raises(OpenAIError) as info:
            shape.check(body)
        assert info.value.param == param, body.keys()
    shape.check({"prompt": [1] * 500, "truncate_prompt_tokens": 50})  # truncation: allowed


def test_bad_words_volume_and_messages_size() -> None:
    from kvflow.entrypoints.openai.request_checks import (
        check_bad_words_volume,
        check_messages_size,
    )

    check_bad_words_volume(["w" * 1000] * 262, 1, LIMITS)
    with pytest.raises(OpenAIError, match="bad_words"):
        check_bad_words_volume(["w" * 1000] * 262, 2, LIMITS)
    bound = PromptBound(max_model_len=100, max_token_bytes=10)
    check_messages_size(["x" * 500, "y" * 500], bound)
    with pytest.raises(OpenAIError, match="maximum context length") as info:
        check_messages_size(["x" * 800, "y" * 800], bound)
    assert info.value.param == "messages"

"""The sandboxed renderer for client-supplied chat templates: parity, limits, lifecycle."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from kvflow.entrypoints.openai.template_sandbox import TemplateSandbox

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Exercises what transformers adds to plain Jinja: trim_blocks/lstrip_blocks, loop controls,
# tojson, tools/documents defaults, unset special tokens, dropped None keys, reasoning aliases.
FEATURES = """{{ bos_token }}{% if pad_token is defined %}PAD{% endif %}
{% if tools %}{{ tools | tojson }}{% endif %}{{ documents is none }}
    {% for m in messages %}
        {% if loop.index > 3 %}{% break %}{% endif %}
{{ m.role }}:{{ m.content }}|{{ m.thinking }}|{{ m.name is defined }}
    {% endfor %}
{{ custom }}{% if add_generation_prompt %}<gen>{% endif %}"""
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi ü", "name": None},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
    {"role": "user", "content": "Bye"},
]
SPECIAL_TOKENS: dict[str, str | None] = {
    "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": None,
}
CHATML_EXPECTED = (
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi ü<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EXTRA = {"tools": [{"name": "get_weather", "city": "Zürich"}], "custom": "end"}


def _render(sandbox: TemplateSandbox, template: str, **kwargs: Any) -> str:
    return sandbox.render(template, MESSAGES, add_generation_prompt=True,
                          special_tokens=SPECIAL_TOKENS, **kwargs)


def _workers(excluding: frozenset[int] = frozenset()) -> list[psutil.Process]:
    """The live sandbox workers of this process, less those whose pid is in `excluding`."""
    workers = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            alive = child.status() != psutil.STATUS_ZOMBIE
            if alive and any(a.endswith("template_sandbox.py") for a in child.cmdline()):
                workers.append(child)
    return [w for w in workers if w.pid not in excluding]


def _worker_pids() -> frozenset[int]:
    return frozenset(p.pid for p in _workers() if p.pid is not None)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def sandbox() -> Iterator[TemplateSandbox]:
    """One worker shared by the tests that leave it healthy."""
    shared = TemplateSandbox(max_output_chars=10_000)
    yield shared
    shared.close()
    assert not _workers()


def _transformers_render(template: str, extra: dict[str, Any]) -> str:
    """What transformers' apply_chat_template renders, with a tokenizer built in memory."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
        **{name: token for name, token in SPECIAL_TOKENS.items() if token is not None},
    )
    tokenizer.chat_template = template
    return str(tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                             add_generation_prompt=True, **extra))


@pytest.mark.parametrize("template,extra", [(CHATML, {}), (FEATURES, EXTRA)],
                         ids=["chatml", "features"])
def test_renders_as_transformers_does(sandbox: TemplateSandbox, template: str,
                                      extra: dict[str, Any]) -> None:
    assert _render(sandbox, template, extra_kwargs=extra) == _transformers_render(template, extra)


def test_chatml_renders_the_known_string(sandbox: TemplateSandbox) -> None:
    assert _render(sandbox, CHATML) == CHATML_EXPECTED
    assert MESSAGES[1]["name"] is None  # the caller's messages are left as they were


def test_the_worker_has_no_torch_and_a_memory_cap(sandbox: TemplateSandbox) -> None:
    _render(sandbox, CHATML)
    for worker in _workers():
        with open(f"/proc/{worker.pid}/maps") as f:
            assert "libtorch" not in f.read()
        with open(f"/proc/{worker.pid}/limits") as f:
            address_space = next(line for line in f if line.startswith("Max address space"))
        assert "unlimited" not in address_space


def test_raise_exception_becomes_value_error(sandbox: TemplateSandbox) -> None:
    with pytest.raises(ValueError, match="Conversation roles must alternate"):
        _render(sandbox, "{{ raise_exception('Conversation roles must alternate') }}")


def test_syntax_error_becomes_value_error(sandbox: TemplateSandbox) -> None:
    with pytest.raises(ValueError, match="syntax error on line 2"):
        _render(sandbox, "ok\n{% for m in messages %}")


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.append(1) }}",
])
def test_python_internals_are_out_of_reach(sandbox: TemplateSandbox, template: str) -> None:
    try:
        assert _render(sandbox, template) == ""  # an unsafe attribute reads as undefined
    except ValueError as e:
        assert "security violation" in str(e)


@pytest.mark.parametrize("template", [
    "{{ 'x' * 2000000000 }}",
    "{{ 'x' | center(2000000000) }}",
    "{{ [0] * 2000000000 }}",
    "{{ 2 ** 100000000 }}",
    # squares its length each step: 2, 4, 16, 256, 65536, then 4 G chars
    "{% set ns = namespace(s='xx') %}{% for i in range(8) %}"
    "{% set ns.s = ns.s.replace('x', ns.s) %}{% endfor %}{{ ns.s | length }}",
    # `~` is no binop, so nothing but the worker's memory cap stops it doubling
    "{% set ns = namespace(s='x' | center(1000000)) %}{% for i in range(40) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
])
def test_memory_bombs_fail_without_growing_the_server(sandbox: TemplateSandbox,
                                                      template: str) -> None:
    before = _rss_mb()
    with pytest.raises(ValueError, match="memory|over"):
        _render(sandbox, template)
    assert _rss_mb() - before < 50
    assert _render(sandbox, CHATML) == CHATML_EXPECTED


def test_output_over_the_limit_stops(sandbox: TemplateSandbox) -> None:
    with pytest.raises(ValueError, match="output is over 10000"):
        _render(sandbox, "{% for i in range(100000) %}0123456789{% endfor %}")
    with pytest.raises(ValueError, match="over 10000"):
        _render(sandbox, "{{ 'x' * 6000 + 'y' * 6000 }}")


def test_renders_from_many_threads_at_once(sandbox: TemplateSandbox) -> None:
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(_render(sandbox, CHATML)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [CHATML_EXPECTED] * 8


def test_cpu_bomb_times_out_and_the_next_render_works() -> None:
    others = _worker_pids()
    sandbox = TemplateSandbox(timeout_s=1.0)
    _render(sandbox, CHATML)  # start the worker, so only the template's time is measured
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"took longer than 1\.0 s"):
        _render(sandbox, "{% for i in range(100000) %}{% for j in range(100000) %}"
                         "{% endfor %}{% endfor %}")
    assert time.monotonic() - started < 3.0
    assert not _workers(others)  # killed and reaped, not left running
    assert _render(sandbox, CHATML) == CHATML_EXPECTED
    sandbox.close()
    assert not _workers(others)


def test_a_worker_killed_from_outside_is_replaced() -> None:
    others = _worker_pids()
    sandbox = TemplateSandbox()
    _render(sandbox, CHATML)
    (worker,) = _workers(others)
    worker.kill()
    worker.wait()
    assert _render(sandbox, CHATML) == CHATML_EXPECTED
    (replacement,) = _workers(others)
    assert replacement.pid != worker.pid
    sandbox.close()
    assert not _workers(others)


def test_close_is_idempotent_and_render_after_close_raises() -> None:
    others = _worker_pids()
    sandbox = TemplateSandbox()
    sandbox.close()  # before any worker started
    sandbox = TemplateSandbox()
    _render(sandbox, CHATML)
    sandbox.close()
    sandbox.close()
    assert not _workers(others)
    with pytest.raises(RuntimeError, match="closed"):
        _render(sandbox, CHATML)


def test_garbage_collection_stops_the_worker() -> None:
    others = _worker_pids()
    sandbox = TemplateSandbox()
    _render(sandbox, CHATML)
    assert len(_workers(others)) == 1
    del sandbox  # the last reference: CPython finalizes it at once
    assert not _workers(others)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TemplateSandbox(timeout_s=0)

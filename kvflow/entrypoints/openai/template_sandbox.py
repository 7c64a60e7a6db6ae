"""Render untrusted, client-supplied chat templates in a killable worker process.

A request's `chat_template` is hostile input (CPU bombs, memory bombs, sandbox escapes). It is
rendered in a worker process capped by RLIMIT_AS, under a deadline the parent enforces by SIGKILL,
so the server process never waits on it unboundedly and never grows from it.
"""

from __future__ import annotations

import json
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

# Starting the worker (an interpreter importing jinja2) is not the template's time: it is
# waited for apart from timeout_s.
_START_TIMEOUT_S = 60.0
_MAX_EXPONENT = 256
_MAX_ERROR_CHARS = 1000
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _OutputTooLargeError(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' filter: Jinja's own escapes HTML characters, which chat templates must not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _LimitedEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """transformers' chat-template environment, plus size limits on `*`, `**` and `+`."""

    # Intercepted operators are also never constant-folded at compile time.
    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, max_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.max_chars = max_chars
        self.filters["tojson"] = _tojson
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any,
                   right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and right > _MAX_EXPONENT:
            raise jinja2.sandbox.SecurityError(f"exponent {right} is over {_MAX_EXPONENT}")
        if (size := _result_size(operator, left, right)) > self.max_chars:
            raise jinja2.sandbox.SecurityError(f"a value of {size} items is over {self.max_chars}")
        return super().call_binop(context, operator, left, right)


def _result_size(operator: str, left: Any, right: Any) -> int:
    """How many items `left <operator> right` will hold if it builds a sequence, else 0."""
    seq = (str, list, tuple)
    if operator == "+" and isinstance(left, seq) and isinstance(right, seq):
        return len(left) + len(right)
    if operator == "*" and isinstance(left, seq) and isinstance(right, int):
        return len(left) * right
    if operator == "*" and isinstance(left, int) and isinstance(right, seq):
        return left * len(right)
    return 0


def _render(env: _LimitedEnvironment, template: str, variables: dict[str, Any]) -> str:
    chunks: list[str] = []
    total = 0
    for chunk in env.from_string(template).generate(**variables):
        total += len(chunk)
        if total > env.max_chars:  # stop early rather than build the whole output
            raise _OutputTooLargeError(f"the chat template's output is over {env.max_chars} chars")
        chunks.append(chunk)
    return "".join(chunks)


def _render_safely(env: _LimitedEnvironment, request: tuple[str, dict[str, Any]],
                   memory_limit_mb: int) -> tuple[str, str]:
    try:
        return "ok", _render(env, *request)
    except jinja2.TemplateSyntaxError as e:
        message = f"chat template syntax error on line {e.lineno}: {e.message}"
    except jinja2.sandbox.SecurityError as e:
        message = f"chat template security violation: {e}"
    except jinja2.TemplateError as e:  # raise_exception lands here
        message = f"chat template error: {e}"
    except _OutputTooLargeError as e:
        message = str(e)
    except MemoryError:
        message = f"the chat template used more than {memory_limit_mb} MB of memory"
    except Exception as e:  # whatever the template provokes is the client's error
        message = f"chat template failed: {type(e).__name__}: {e}"
    return "error", message[:_MAX_ERROR_CHARS]


def _limit_address_space(memory_limit_mb: int) -> None:
    """Cap this process at its current size plus the limit, so a memory bomb is a MemoryError."""
    try:
        with open("/proc/self/status") as f:
            vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        return  # not Linux: the parent's deadline is the only guard left
    limit = vm_kb * 1024 + memory_limit_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _worker_main(conn: Connection, memory_limit_mb: int, max_output_chars: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns shutdown, not Ctrl-C
    _limit_address_space(memory_limit_mb)
    env = _LimitedEnvironment(max_output_chars)
    conn.send(("ready", ""))
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent is gone
            return
        if request is None:
            return
        conn.send(_render_safely(env, request, memory_limit_mb))


class _Worker:
    """One worker process and the parent's end of its socket."""

    def __init__(self, memory_limit_mb: int, max_output_chars: int) -> None:
        parent_end, child_end = socket.socketpair()
        # This file run by path in a fresh interpreter: not as a kvflow module (kvflow/__init__
        # imports torch), and not through multiprocessing (spawn re-imports the server's
        # __main__, which imports torch too: ~5 s per start instead of ~0.1 s).
        args = [sys.executable, "-I", __file__, str(child_end.fileno()), str(memory_limit_mb),
                str(max_output_chars)]
        self.process = subprocess.Popen(args, pass_fds=[child_end.fileno()],
                                        stdin=subprocess.DEVNULL)
        child_end.close()  # only the child holds it now, so its death reads as EOF here
        self.conn = Connection(parent_end.detach())
        if self.receive(_START_TIMEOUT_S) != ("ready", ""):
            self.kill()
            raise RuntimeError(f"the chat template worker did not start (exit code "
                               f"{self.process.returncode})")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def receive(self, timeout_s: float) -> tuple[str, str] | None:
        """The worker's next answer, or None if none came in time or the worker died."""
        try:
            return self.conn.recv() if self.conn.poll(timeout_s) else None
        except (EOFError, OSError):
            return None

    def request(self, request: tuple[str, dict[str, Any]],
                timeout_s: float) -> tuple[str, str] | None:
        try:
            self.conn.send(request)
        except OSError:
            return None
        return self.receive(timeout_s)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=5.0)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.process.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class _Slot:
    """Holds the live worker; apart from TemplateSandbox so its finalizer does not keep it alive."""

    def __init__(self) -> None:
        self.worker: _Worker | None = None

    def stop(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.stop()


def _plain_data(value: Any) -> Any:
    """JSON-like data only, as transformers passes: the template sees no object with methods,
    and unpickling it in the worker imports no module."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain_data(k): _plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain_data(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, str):  # a subclass (an enum) may carry methods and its own __str__
        return str.__str__(value)
    if isinstance(value, (int, float)):
        return int.__int__(value) if isinstance(value, int) else float.__float__(value)
    return f"<{type(value).__name__}>"


def _normalize_message(message: Any) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ValueError(f"a chat message must be an object, got {type(message).__name__}")
    # transformers drops None values: templates handle a missing key but print None as "None".
    message = _plain_data({key: value for key, value in message.items() if value is not None})
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is not None:  # transformers 5 aliases reasoning under the names templates read
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _template_variables(messages: list[dict[str, Any]], add_generation_prompt: bool,
                        special_tokens: dict[str, str | None],
                        extra_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """What transformers' apply_chat_template passes the template, as plain picklable data."""
    # Unset special tokens are left undefined, like transformers' special_tokens_map.
    tokens = {name: str(value) for name, value in special_tokens.items() if value is not None}
    return {
        **tokens, "tools": None, "documents": None, **_plain_data(extra_kwargs or {}),
        "messages": [_normalize_message(message) for message in messages],
        "add_generation_prompt": bool(add_generation_prompt),
    }


class TemplateSandbox:
    """Renders untrusted chat templates in a worker process with time, memory and output limits."""

    def __init__(self, *, timeout_s: float = 5.0, memory_limit_mb: int = 512,
                 max_output_chars: int = 1_000_000) -> None:
        if timeout_s <= 0 or memory_limit_mb <= 0 or max_output_chars <= 0:
            raise ValueError("timeout_s, memory_limit_mb and max_output_chars must be positive")
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.max_output_chars = max_output_chars
        self._lock = threading.Lock()  # one render at a time: the worker serves one request
        self._slot = _Slot()
        self._closed = False
        self._finalizer = weakref.finalize(self, self._slot.stop)

    def render(self, template: str, messages: list[dict[str, Any]], *,
               add_generation_prompt: bool, special_tokens: dict[str, str | None],
               extra_kwargs: dict[str, Any] | None = None) -> str:
        """Render like transformers' apply_chat_template(tokenize=False); blocking.

        Raises ValueError for anything the template does wrong; RuntimeError once closed or
        when no worker starts.
        """
        variables = _template_variables(messages, add_generation_prompt, special_tokens,
                                        extra_kwargs)
        with self._lock:
            worker = self._live_worker()
            started = time.monotonic()
            answer = worker.request((template, variables), self.timeout_s)
            if answer is None:  # timed out or crashed: never reuse a worker in an unknown state
                self._slot.worker = None
                worker.kill()
                if time.monotonic() - started >= self.timeout_s:
                    raise ValueError(f"the chat template took longer than {self.timeout_s} s")
                raise ValueError(f"the chat template crashed its renderer "
                                 f"(exit code {worker.process.returncode})")
        status, text = answer
        if status != "ok":
            raise ValueError(text)
        return text

    def close(self) -> None:
        """Stop the worker. Idempotent; a later render raises RuntimeError."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def _live_worker(self) -> _Worker:
        if self._closed:
            raise RuntimeError("the TemplateSandbox is closed")
        worker = self._slot.worker
        if worker is None or not worker.alive:  # killed from outside since
            if worker is not None:
                worker.kill()
            worker = self._slot.worker = _Worker(self.memory_limit_mb, self.max_output_chars)
        return worker


if __name__ == "__main__":  # the worker: `python -I template_sandbox.py FD MEMORY_MB MAX_CHARS`
    _worker_main(Connection(int(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]))

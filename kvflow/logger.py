"""Log setup of the `kvflow` command and of the engine-core process it starts.

Interactive commands (`kvflow chat`, `kvflow generate`) show the conversation only: their
default level is WARNING, so the periodic stats line and start-up lines stay out of the
terminal. `kvflow serve` logs at INFO. The level comes from, first to last: `--log-level`,
`--verbose` (INFO), the `KVFLOW_LOGGING_LEVEL` environment variable (as vLLM's
`VLLM_LOGGING_LEVEL`), the command's default. Logs always go to stderr.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGING_LEVEL_ENV = "KVFLOW_LOGGING_LEVEL"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def resolve_level(explicit: str | None, default: str) -> str:
    """The level name to use: `explicit`, else KVFLOW_LOGGING_LEVEL, else `default`."""
    level = explicit or os.environ.get(LOGGING_LEVEL_ENV) or default
    name = level.strip().upper()
    if name not in _LEVELS:
        where = "--log-level" if explicit else LOGGING_LEVEL_ENV
        raise ValueError(f"{where} must be one of {', '.join(_LEVELS)}, got {level!r}")
    return name


def configure_logging(level: str, fmt: str = LOG_FORMAT) -> None:
    """Log at `level` to stderr, and hand the level to engine-core processes started later
    (they are spawned: they inherit the environment, not this process's logging setup)."""
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    os.environ[LOGGING_LEVEL_ENV] = level


def configure_engine_core_logging() -> None:
    """The engine-core process's logging: the level its client chose (INFO by default)."""
    try:
        level = resolve_level(None, "INFO")
    except ValueError:
        level = "INFO"  # the client already refused the bad name; do not die over it here
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s engine-core: %(message)s",
                        stream=sys.stderr)

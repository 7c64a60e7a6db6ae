"""kvflow's cache folder (converted models, example adapters, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """kvflow's cache root, read from KVFLOW_CACHE_DIR at call time."""
    return Path(os.environ.get("KVFLOW_CACHE_DIR") or Path.home() / ".cache" / "kvflow")

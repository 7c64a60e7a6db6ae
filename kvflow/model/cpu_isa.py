"""Which instruction sets this CPU offers, and which of kvflow's kernel builds runs here.

The CPU is read at run time (the kernel's feature flags in /proc/cpuinfo, and for AMX the
kernel's permission to use the tile registers, which a process must ask for), so one
install serves a laptop, a Zen 2 and a current Xeon. kvflow compiles `kvflow/csrc` once
per ISA level (kvflow.model.cpu_kernels) and loads the highest level this CPU can run:

    generic      plain C the compiler vectorizes (any CPU)
    avx2         AVX2 + FMA, F16C, BMI, LZCNT, MOVBE (x86-64-v3): 8-lane float kernels
    avx512       + AVX-512 F/BW/DQ/VL (x86-64-v4): 16-lane kernels
    avx512_bf16  + AVX512-BF16 and AVX512-VNNI (Cooper Lake, Sapphire Rapids, Zen 4)
    amx          + AMX-BF16/INT8 tiles (Sapphire Rapids on): the avx512_bf16 kernels in
                 the GEMV range, oneDNN's AMX kernels (through torch) above it

`KVFLOW_CPU_ISA=<level>` forces a lower level (to test the older paths on a newer CPU);
a level the CPU lacks is refused with the missing flags named. `dtype="auto"` becomes
bfloat16 where the selected level computes bf16 natively (avx512_bf16, amx).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

LEVELS = ("generic", "avx2", "avx512", "avx512_bf16", "amx")

# /proc/cpuinfo flags each level needs on top of the one below it.
_NEEDS: dict[str, tuple[str, ...]] = {
    "generic": (),
    "avx2": ("avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe"),  # x86-64-v3
    "avx512": ("avx512f", "avx512bw", "avx512dq", "avx512vl"),
    "avx512_bf16": ("avx512_bf16", "avx512_vnni"),
    "amx": ("amx_tile", "amx_bf16", "amx_int8"),
}

# What each flag is called in a skip reason or an error.
FLAG_NAMES = {"avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi1": "BMI1", "bmi2": "BMI2",
              "abm": "LZCNT", "movbe": "MOVBE", "avx512f": "AVX512F",
              "avx512bw": "AVX512BW", "avx512dq": "AVX512DQ", "avx512vl": "AVX512VL",
              "avx512_bf16": "AVX512-BF16", "avx512_vnni": "AVX512-VNNI",
              "amx_tile": "AMX-TILE", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8",
              "amx_permission": "AMX (tile permission from the kernel)"}

# The flags a report lists (beyond the levels' own).
_REPORTED = ("avx512_fp16",)

_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86-64


@dataclass(frozen=True)
class CpuIsa:
    """The CPU's relevant flags and the kernel level chosen for it."""

    model: str
    flags: frozenset[str] = field(repr=False)
    native: str  # the highest level this CPU runs
    level: str  # the level in use (native, or lower when KVFLOW_CPU_ISA forces it)

    @property
    def native_bf16(self) -> bool:
        """Whether the level in use computes bfloat16 natively (AVX512-BF16 or AMX)."""
        return at_least(self.level, "avx512_bf16")

    def describe(self) -> str:
        shown = [FLAG_NAMES.get(f, f.upper()) for level in LEVELS for f in _NEEDS[level]
                 if f in self.flags]
        shown += [f.upper() for f in _REPORTED if f in self.flags]
        forced = f" (forced; native {self.native})" if self.level != self.native else ""
        return (f"CPU {self.model}: kernels {self.level}{forced}; "
                f"flags {' '.join(shown) or 'none of AVX2/AVX-512/AMX'}")


def at_least(level: str, other: str) -> bool:
    """Whether `level` includes everything `other` needs."""
    return LEVELS.index(level) >= LEVELS.index(other)


def missing(level: str, flags: frozenset[str]) -> list[str]:
    """The flags (readable names) this CPU lacks for `level`, lowest level first."""
    needed = [f for lv in LEVELS[1:LEVELS.index(level) + 1] for f in _NEEDS[lv]]
    return [FLAG_NAMES[f] for f in needed if f not in flags]


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.processor(), platform.machine()):
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_model() -> str:
    """The CPU's model name (part of the kernel builds' cache key: -mtune=native)."""
    return _read_cpuinfo()[0]


def _amx_permitted() -> bool:
    """Ask Linux for the AMX tile data state (arch_prctl ARCH_REQ_XCOMP_PERM): without it,
    the first tile instruction kills the process. Granted once per process; harmless to
    repeat."""
    if platform.machine() != "x86_64" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM,
                                _XFEATURE_XTILEDATA)) == 0
    except (OSError, AttributeError):
        return False


def _native(flags: frozenset[str]) -> str:
    best = "generic"
    for level in LEVELS[1:]:
        if missing(level, flags):
            break
        best = level
    return best


@functools.cache
def detect() -> CpuIsa:
    """The CPU's flags and the level in use (read once per process; see KVFLOW_CPU_ISA)."""
    model, flags = _read_cpuinfo()
    if platform.machine() not in ("x86_64", "AMD64"):
        flags = frozenset()  # the x86 levels mean nothing elsewhere: generic C
    if "amx_tile" in flags and _amx_permitted():
        flags = flags | {"amx_permission"}
    native = _native(flags)
    if native == "amx" and "amx_permission" not in flags:
        native = "avx512_bf16"
    level = _forced(native, flags)
    isa = CpuIsa(model=model, flags=flags, native=native, level=level)
    logger.info("%s", isa.describe())
    return isa


def _forced(native: str, flags: frozenset[str]) -> str:
    wanted = os.environ.get("KVFLOW_CPU_ISA", "").strip().lower()
    if not wanted or wanted == "native":
        return native
    if wanted not in LEVELS:
        raise ValueError(f"KVFLOW_CPU_ISA must be one of native, {', '.join(LEVELS)}; "
                         f"got {wanted!r}")
    if not at_least(native, wanted):
        lacking = missing(wanted, flags) or [FLAG_NAMES["amx_permission"]]
        raise ValueError(f"KVFLOW_CPU_ISA={wanted} needs {', '.join(lacking)}, which this CPU "
                         f"({native} at most) lacks")
    return wanted


def skip_reason(level: str) -> str | None:
    """None when this CPU runs `level`; else why not, naming the missing ISA (for tests)."""
    isa = detect()
    if at_least(isa.native, level):
        return None
    lacking = missing(level, isa.flags) or [FLAG_NAMES["amx_permission"]]
    return f"needs {', '.join(lacking)} ({level} kernels); this CPU has {isa.native} at most"


def runnable_levels() -> list[str]:
    """Every level this CPU can run, lowest first."""
    native = detect().native
    return [level for level in LEVELS if at_least(native, level)]

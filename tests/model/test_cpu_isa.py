"""ISA detection, forced levels, dtype="auto" and the per-ISA kernel builds."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from kvflow.config import EngineArgs
from kvflow.model import cpu_isa, cpu_kernels

ZEN2 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe"})
SKYLAKE_X = ZEN2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}
ZEN4 = SKYLAKE_X | {"avx512_bf16", "avx512_vnni", "avx512_fp16"}
SAPPHIRE_RAPIDS = ZEN4 | {"amx_tile", "amx_bf16", "amx_int8"}


@pytest.fixture
def fake_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Set the flags detect() reads (and whether Linux grants AMX); undone afterwards."""

    def use(flags: frozenset[str], amx_granted: bool = True) -> cpu_isa.CpuIsa:
        monkeypatch.setattr(cpu_isa, "_read_cpuinfo", lambda: ("Test CPU", flags))
        monkeypatch.setattr(cpu_isa, "_amx_permitted", lambda: amx_granted)
        monkeypatch.setattr(cpu_isa.platform, "machine", lambda: "x86_64")
        cpu_kernels.reset()
        return cpu_isa.detect()

    yield use
    cpu_kernels.reset()


@pytest.mark.parametrize(("flags", "level"), [
    (frozenset({"sse2"}), "generic"), (ZEN2, "avx2"), (SKYLAKE_X, "avx512"),
    (ZEN4, "avx512_bf16"), (SAPPHIRE_RAPIDS, "amx"),
])
def test_levels_follow_the_flags(fake_cpu, flags: frozenset[str], level: str) -> None:
    isa = fake_cpu(flags)
    assert isa.native == isa.level == level
    assert isa.native_bf16 == (level in ("avx512_bf16", "amx"))
    assert isa.describe().startswith(f"CPU Test CPU: kernels {level};")


def test_amx_needs_the_kernels_permission(fake_cpu) -> None:
    assert fake_cpu(SAPPHIRE_RAPIDS, amx_granted=False).level == "avx512_bf16"


def test_avx512f_without_bw_stays_on_avx2(fake_cpu) -> None:
    assert fake_cpu(ZEN2 | {"avx512f"}).level == "avx2"  # Xeon Phi-like: no AVX512BW


def test_forced_level_runs_older_paths(fake_cpu, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFLOW_CPU_ISA", "avx2")
    isa = fake_cpu(SAPPHIRE_RAPIDS)
    assert (isa.level, isa.native) == ("avx2", "amx") and not isa.native_bf16
    assert "forced; native amx" in isa.describe()


def test_forcing_a_missing_level_names_what_is_missing(fake_cpu,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFLOW_CPU_ISA", "avx512_bf16")
    with pytest.raises(ValueError, match="AVX512F, AVX512BW, AVX512DQ, AVX512VL, AVX512-BF16"):
        fake_cpu(ZEN2)
    monkeypatch.setenv("KVFLOW_CPU_ISA", "amx")
    with pytest.raises(ValueError, match="AMX \\(tile permission"):
        fake_cpu(SAPPHIRE_RAPIDS, amx_granted=False)
    monkeypatch.setenv("KVFLOW_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="KVFLOW_CPU_ISA must be one of native, generic"):
        fake_cpu(ZEN2)


def test_skip_reason_names_the_missing_isa(fake_cpu) -> None:
    fake_cpu(ZEN2)
    assert cpu_isa.skip_reason("avx2") is None
    reason = cpu_isa.skip_reason("amx")
    assert reason is not None and "AVX512F" in reason and "AMX-TILE" in reason
    assert cpu_isa.runnable_levels() == ["generic", "avx2"]


def test_other_architectures_run_generic_kernels(fake_cpu, monkeypatch) -> None:
    monkeypatch.setattr(cpu_isa, "_read_cpuinfo", lambda: ("Arm", frozenset({"asimd"})))
    monkeypatch.setattr(cpu_isa.platform, "machine", lambda: "aarch64")
    cpu_kernels.reset()
    assert cpu_isa.detect().level == "generic"


@pytest.mark.parametrize(("flags", "quantization", "dtype"), [
    (ZEN2, None, torch.float32), (SKYLAKE_X, None, torch.float32),
    (ZEN4, None, torch.bfloat16), (SAPPHIRE_RAPIDS, None, torch.bfloat16),
    (SAPPHIRE_RAPIDS, "int8", torch.float32),  # int8 kernels take float32 activations
])
def test_auto_dtype_is_bf16_only_where_native(fake_cpu, tiny_llama_path, flags, quantization,
                                               dtype) -> None:
    fake_cpu(flags)
    args = EngineArgs(model=str(tiny_llama_path), quantization=quantization)
    config = args.create_engine_config()
    assert config.model_config.dtype == dtype
    explicit = EngineArgs(model=str(tiny_llama_path), dtype="float32").create_engine_config()
    assert explicit.model_config.dtype == torch.float32


def test_the_choice_is_logged(fake_cpu, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kvflow.model.cpu_isa"):
        fake_cpu(ZEN4)
    assert "kernels avx512_bf16" in caplog.text and "AVX512-BF16" in caplog.text


@pytest.mark.parametrize("level", list(cpu_kernels.ISA_FLAGS))
def test_every_level_compiles_here(level: str) -> None:
    """Each build compiles with its own ISA flags on any x86 machine with gcc, whatever this
    CPU runs (a build is only loaded where the CPU has its instructions)."""
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler here")
    if level != "generic" and cpu_isa.platform.machine() != "x86_64":
        pytest.skip("x86 levels build on x86-64 only")
    path = cpu_kernels.build(level)
    assert path.exists() and f"-{level}-" in path.name


def test_a_build_failing_its_self_check_gives_way(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A wrong kernel in a level's build (an ISA nobody could test) is never used: the
    level below serves, with an error in the log."""
    if cpu_kernels.load() is None:
        pytest.skip("no C compiler here")
    top = cpu_kernels.BUILD_OF[cpu_isa.detect().level]
    real = cpu_kernels._self_check

    def check(lib):  # the top build "fails"; the ones below are checked for real
        return "float32 linear at 1 tokens" if str(top) in str(lib._name) else real(lib)

    monkeypatch.setattr(cpu_kernels, "_self_check", check)
    cpu_kernels.reset()
    try:
        with caplog.at_level(logging.ERROR, logger="kvflow.model.cpu_kernels"):
            lib = cpu_kernels.load()
        assert f"the {top} CPU kernels failed their self-check" in caplog.text
        assert top == "generic" or (lib is not None and f"-{top}-" not in lib._name)
    finally:
        cpu_kernels.reset()

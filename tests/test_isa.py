"""Runtime ISA dispatch: every kernel build this CPU supports gives bit-identical results."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import flatopt
from flatopt import _dispatch

SUPPORTED = _dispatch.supported_levels()

# One call per kernel and option set: (kernel name, state buffer count, scalar args).
CALLS = [
    ("sgd", 1, lambda step: (0.01, 0.9, 0.1, 0.01, False, False, step == 1, 0.5)),
    ("sgd", 1, lambda step: (0.01, 0.9, 0.0, 0.0, True, True, step == 1, 1.0)),
    ("sgd", 1, lambda step: (0.01, 0.0, 0.0, 0.0, False, False, False, 1.0)),
    ("momentum", 1, lambda step: (0.01, 0.9, 0.01, False, 2.0)),
    ("momentum", 1, lambda step: (0.01, 0.0, 0.0, True, 1.0)),
]


def _run(module, name, n_state, args, dtype, n_threads, n=2**16 + 5, steps=5):
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(dtype)
    state = [np.abs(rng.standard_normal(n)).astype(dtype) for _ in range(n_state)]
    for step in range(1, steps + 1):
        g = rng.standard_normal(n).astype(dtype)
        getattr(module, name)(p, g, *state, *args(step), n_threads)
    return [p] + state


def test_dispatch_picks_widest_supported():
    assert SUPPORTED and SUPPORTED[-1] == "baseline"
    info = flatopt.build_info()
    assert info["isa"] == SUPPORTED[0]
    assert info["isa_supported"] == SUPPORTED
    assert set(SUPPORTED) <= set(info["isa_available"])


@pytest.mark.parametrize("level", SUPPORTED)
@pytest.mark.parametrize("call", CALLS, ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_levels_bit_identical(level, call, dtype):
    name, n_state, args = call
    base = importlib.import_module(_dispatch.MODULES["baseline"])
    variant = importlib.import_module(_dispatch.MODULES[level])
    expected = _run(base, name, n_state, args, dtype, 1)
    for n_threads in (1, 2):
        for got, want in zip(_run(variant, name, n_state, args, dtype, n_threads), expected):
            np.testing.assert_array_equal(got, want, strict=True)


PROBE = """
import json, sys
import flatopt
info = flatopt.build_info()
print(json.dumps({"isa": info["isa"], "supported": info["isa_supported"],
                  "loaded": sorted(m for m in sys.modules if m.startswith("flatopt._kernels"))}))
"""


def _import_in_subprocess(isa=None, disable=None):
    """Import flatopt in a fresh interpreter with FLATOPT_ISA / FLATOPT_DISABLE_CPU_FEATURES."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLATOPT_ISA", "FLATOPT_DISABLE_CPU_FEATURES")}
    if isa is not None:
        env["FLATOPT_ISA"] = isa
    if disable is not None:
        env["FLATOPT_DISABLE_CPU_FEATURES"] = disable
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=env, timeout=120)


def _variants_wider_than(level):
    return list(_dispatch.LEVELS[:_dispatch.LEVELS.index(level)])


@pytest.mark.parametrize("level", SUPPORTED)
def test_forced_level(level):
    out = _import_in_subprocess(isa=level)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["isa"] == level
    assert result["loaded"] == [_dispatch.MODULES[level]]  # nothing else was imported


def test_forced_level_rejected():
    out = _import_in_subprocess(isa="sse9")
    assert out.returncode == 1 and "FLATOPT_ISA must be one of" in out.stderr


# The regression test of the "Illegal instruction" bug: whatever CPU runs the tests, make
# flatopt believe the CPU lacks the wider levels. Import must work, pick the widest level
# left, and never import (so never run code of) a level the CPU "lacks"; forcing such a
# level is a ValueError naming what the CPU supports. Under QEMU (.ci/run) the same holds
# on CPUs that really lack AVX2 and AVX-512.
@pytest.mark.parametrize("level", SUPPORTED)
def test_cpu_without_wider_levels(level):
    lacking = _variants_wider_than(level)
    out = _import_in_subprocess(disable=" ".join(lacking))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["isa"] == level
    assert result["supported"] == SUPPORTED[SUPPORTED.index(level):]
    assert result["loaded"] == [_dispatch.MODULES[level]]
    for missing in lacking:
        out = _import_in_subprocess(isa=missing, disable=" ".join(lacking))
        assert out.returncode == 1, out.stderr
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("ValueError: FLATOPT_ISA=" + missing), last
        assert "it supports " + ", ".join(SUPPORTED[SUPPORTED.index(level):]) in last


def test_disable_rejects_unknown_level():
    out = _import_in_subprocess(disable="avx9000")
    assert out.returncode == 1 and "FLATOPT_DISABLE_CPU_FEATURES" in out.stderr


def test_built_levels_are_found_without_import():
    code = ("import sys, flatopt._dispatch as d; before = set(sys.modules); "
            "d.available_levels(); d.supported_levels(); flatopt_info = __import__('flatopt').build_info(); "
            "new = sorted(m for m in set(sys.modules) - before if m.startswith('flatopt._kernels')); "
            "print(new)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_levels_are_platform_levels():
    from flatopt._cpu_features import IS_X86_64, cpu_level
    assert _dispatch.LEVELS[-1] == "baseline"
    if IS_X86_64:
        assert _dispatch.LEVELS == ("avx512", "avx2", "baseline")
        assert cpu_level() in _dispatch.LEVELS
    else:  # aarch64 and others: one build, no x86 level is ever listed
        assert _dispatch.LEVELS == ("baseline",)
        assert flatopt.build_info()["isa_available"] == ["baseline"]
    with pytest.raises(ValueError, match="level must be"):
        from flatopt._cpu_features import cpu_supports
        cpu_supports("sse9")


def test_trajectory_check_detects_a_flipped_bit(tmp_path, monkeypatch):
    import trajectory
    monkeypatch.setattr(trajectory, "SIZES", (7,))
    monkeypatch.setattr(trajectory, "CASES", trajectory.CASES[:2])
    path = str(tmp_path / "t.npz")
    assert trajectory.main(["save", path]) == 0
    assert trajectory.main(["check", path]) == 0
    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files}
    key = sorted(arrays)[0]
    arrays[key] = arrays[key].copy()
    arrays[key].view(np.uint8)[0] ^= 1
    np.savez(path, **arrays)
    assert trajectory.main(["check", path]) == 1


@pytest.mark.parametrize("level", SUPPORTED)
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, float("inf")])
def test_norm_bit_identical_across_levels(level, norm_type):
    base = importlib.import_module(_dispatch.MODULES["baseline"])
    variant = importlib.import_module(_dispatch.MODULES[level])
    x = np.random.default_rng(1).standard_normal(5 * base.NORM_BLOCK + 3).astype(np.float32)
    want = np.empty(6)
    base.norm_partials(x, norm_type, want, 1)
    for n_threads in (1, 2):
        got = np.empty(6)
        variant.norm_partials(x, norm_type, got, n_threads)
        np.testing.assert_array_equal(got, want)
        assert variant.count_nonfinite(x, n_threads) == 0

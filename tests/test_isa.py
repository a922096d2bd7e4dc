"""Runtime ISA dispatch: every kernel build this CPU supports gives bit-identical results."""

import importlib
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


def _isa_in_subprocess(value):
    env = {**os.environ, "FLATOPT_ISA": value}
    return subprocess.run([sys.executable, "-c", "import flatopt; print(flatopt.build_info()['isa'])"],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("level", SUPPORTED)
def test_forced_level(level):
    out = _isa_in_subprocess(level)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == level


def test_forced_level_rejected():
    out = _isa_in_subprocess("sse9")
    assert out.returncode != 0 and "FLATOPT_ISA must be one of" in out.stderr
    unsupported = [lvl for lvl in _dispatch.LEVELS if lvl not in SUPPORTED]
    for level in unsupported:
        out = _isa_in_subprocess(level)
        assert out.returncode != 0 and f"FLATOPT_ISA={level}" in out.stderr


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

"""kernels.GradTable: the step kernels read gradients from many sources (where flatopt.torch
finds them) bit for bit as from the one concatenated flat gradient; kernels.HalfGrads:
16-bit gradients in and 16-bit parameters out in the kernel's own pass, bit for bit as
widen16, the float32 kernel, then narrow16."""

import numpy as np
import pytest

from flatopt._dispatch import kernels
from flatopt._kernels import PARALLEL_THRESHOLD

SIZES = [0, 1, 7, 4097, PARALLEL_THRESHOLD - 1, PARALLEL_THRESHOLD + 1, 2**16 + 3]
STEPS = (1, 2, 10)  # RAdam rectifies from step 6 (beta2 0.999): both of its branches


def grad_table(arrays, dtype):
    """A GradTable over ``arrays`` (1-D, ``dtype``), in order; it keeps them alive."""
    bounds = np.concatenate(([0], np.cumsum([a.size for a in arrays]))).astype(np.intp)
    sources = np.array([a.ctypes.data for a in arrays], dtype=np.intp)
    return kernels.GradTable(bounds, sources, np.dtype(dtype).itemsize, keep=arrays)


def scattered(g, rng):
    """``g`` cut into sources of odd lengths, empty ones between, each copied to its own
    misaligned place in a backing buffer whose gaps hold NaN (a stray read would show;
    for 16-bit bit patterns, 0xFFFF)."""
    gap = np.nan if g.dtype.kind == "f" else 0xFFFF  # a NaN as bfloat16 and float16 bits
    arrays, backing, i = [], np.full(4 * g.size + 64, gap, g.dtype), 0
    at = 1
    while i < g.size:
        n = min(int(rng.choice([1, 3, 5, 7, 31, 127, 1023, 4095])), g.size - i)
        arrays.append(backing[at:at + n])
        arrays[-1][:] = g[i:i + n]
        i, at = i + n, at + n + int(rng.integers(1, 4))
        if rng.random() < 0.4:
            arrays.append(backing[at:at])  # a parameter without gradient elements
    return arrays


def sgd(momentum=0.0, nesterov=False, wd=0.0, maximize=False, scale=1.0):
    return 1, lambda k, p, g, s, step, t: k.sgd(
        p, g, s[0], 0.1, momentum, 0.1, wd, nesterov, maximize, step == 1, scale, t)


def adam(amsgrad=False, decoupled=False, wd=0.0, maximize=False):
    return 3, lambda k, p, g, s, step, t: k.adam(
        p, g, s[0], s[1], s[2] if amsgrad else s[2][:0], step, 1e-2, 0.9, 0.999, 1e-8, wd,
        amsgrad, decoupled, maximize, 0.5, t)


def rmsprop(centered, momentum):
    return 3, lambda k, p, g, s, step, t: k.rmsprop(
        p, g, s[0], s[1] if centered else s[1][:0], s[2] if momentum else s[2][:0], 1e-2,
        0.99, 1e-8, 0.01, momentum, centered, False, 1.0, t)


# name: (number of state buffers, call(kernels, param, grad, states, step, n_threads))
CASES = {
    "sgd": sgd(),
    "sgd-momentum": sgd(momentum=0.9),
    "sgd-nesterov": sgd(momentum=0.9, nesterov=True),
    "sgd-decay-maximize": sgd(momentum=0.5, wd=0.01, maximize=True, scale=0.25),
    "momentum": (1, lambda k, p, g, s, step, t: k.momentum(p, g, s[0], 0.05, 0.9, 0.01, True, 2.0, t)),
    "adam": adam(),
    "adam-amsgrad": adam(amsgrad=True, wd=0.01),
    "adamw-maximize": adam(decoupled=True, wd=0.01, maximize=True),
    "rmsprop": rmsprop(False, 0.0),
    "rmsprop-centered": rmsprop(True, 0.0),
    "rmsprop-momentum": rmsprop(False, 0.9),
    "rmsprop-centered-momentum": rmsprop(True, 0.9),
    "adadelta": (2, lambda k, p, g, s, step, t: k.adadelta(
        p, g, s[0], s[1], 1.0, 0.9, 1e-6, 0.01, False, 1.0, t)),
    "adagrad": (1, lambda k, p, g, s, step, t: k.adagrad(
        p, g, s[0], step, 1e-2, 0.01, 1e-10, 0.0, True, 1.0, t)),
    # nadam returns the new mu_product, radam whether it rectified: compared too
    "nadam": (2, lambda k, p, g, s, step, t: k.nadam(
        p, g, s[0], s[1], step, 0.9 ** step, p.dtype == np.float32, 2e-3, 0.9, 0.999, 1e-8,
        0.01, 4e-3, step % 2 == 0, False, 1.0, t)),
    "nadam-decoupled": (2, lambda k, p, g, s, step, t: k.nadam(
        p, g, s[0], s[1], step, 0.5, False, 2e-3, 0.9, 0.999, 1e-8, 0.01, 4e-3, True, True,
        1.0, t)),
    "radam": (2, lambda k, p, g, s, step, t: k.radam(
        p, g, s[0], s[1], step, 1e-3, 0.9, 0.999, 1e-8, 0.01, step == 2, False, 1.0, t)),
    "adamax": (2, lambda k, p, g, s, step, t: k.adamax(
        p, g, s[0], s[1], step, 2e-3, 0.9, 0.999, 1e-8, 0.01, False, 1.0, t)),
    "lion": (1, lambda k, p, g, s, step, t: k.lion(
        p, g, s[0], 1e-4, 0.9, 0.99, 0.1, True, 1.0, t)),
    # flatopt.keras's kernels
    "keras-sgd": (1, lambda k, p, g, s, step, t: k.keras_sgd(
        p, g, s[0][:0], 0.1, 0.0, False, 0.0, 1.0, t)),
    "keras-sgd-momentum": (1, lambda k, p, g, s, step, t: k.keras_sgd(
        p, g, s[0], 0.1, 0.9, False, 0.01, 0.5, t)),
    "keras-sgd-nesterov": (1, lambda k, p, g, s, step, t: k.keras_sgd(
        p, g, s[0], 0.1, 0.9, True, 0.0, 1.0, t)),
    "keras-adam": (3, lambda k, p, g, s, step, t: k.keras_adam(
        p, g, s[0], s[1], s[2][:0], step, 1e-2, 0.9, 0.999, 1e-7, False, 0.0, 1.0, t)),
    "keras-adam-amsgrad": (3, lambda k, p, g, s, step, t: k.keras_adam(
        p, g, s[0], s[1], s[2], step, 1e-2, 0.9, 0.999, 1e-7, True, 0.004, 2.0, t)),
    "keras-rmsprop": (3, lambda k, p, g, s, step, t: k.keras_rmsprop(
        p, g, s[0], s[1][:0], s[2][:0], 1e-3, 0.9, 0.0, 1e-7, False, 0.0, 1.0, t)),
    "keras-rmsprop-centered-momentum": (3, lambda k, p, g, s, step, t: k.keras_rmsprop(
        p, g, s[0], s[1], s[2], 1e-3, 0.9, 0.5, 1e-7, True, 0.01, 1.0, t)),
    "keras-adagrad": (1, lambda k, p, g, s, step, t: k.keras_adagrad(
        p, g, s[0], 1e-2, 1e-7, 0.01, 1.0, t)),
    "keras-adamax": (2, lambda k, p, g, s, step, t: k.keras_adamax(
        p, g, s[0], s[1], step, 2e-3, 0.9, 0.999, 1e-7, 0.0, 1.0, t)),
    "keras-nadam": (2, lambda k, p, g, s, step, t: k.keras_nadam(
        p, g, s[0], s[1], step, 0.9 ** step, 2e-3, 0.9, 0.999, 1e-7, 0.004, 1.0, t)),
}


def assert_bits_equal(a, b):
    """Every number bit for bit (zeros keep their sign), NaN where NaN. Not a NaN's sign
    and payload: which NaN an operation passes on depends on its operands' order, which
    gcc may choose differently in the vector loop and in its scalar remainder, whose
    bounds move with the pieces (and with the thread count)."""
    nan = np.isnan(a)
    assert a.dtype == b.dtype and np.array_equal(nan, np.isnan(b))
    bits = np.dtype(f"u{a.itemsize}")
    assert np.array_equal(a[~nan].view(bits), b[~nan].view(bits))


@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "sliced"])
@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_table_matches_flat(case, size, dtype, n_threads, sliced):
    n_states, call = case
    rng = np.random.default_rng(size)
    p = rng.standard_normal(size).astype(dtype)
    states = [np.abs(rng.standard_normal(size)).astype(dtype) for _ in range(n_states)]
    if size > 3:  # non-finite gradients and states propagate alike
        p[size // 2] = np.nan
        states[0][1] = np.inf
    runs = {form: (p.copy(), [s.copy() for s in states]) for form in ("flat", "table")}
    lo, hi = (size // 7, size - size // 11) if sliced else (0, size)
    for step in STEPS:
        g = rng.standard_normal(size).astype(dtype)
        g[rng.integers(0, max(size, 1), size // 1000)] = np.nan
        g[: min(size, 3)] = [0.0, -0.0, np.inf][: min(size, 3)]
        table = grad_table(scattered(g, rng), dtype)
        assert len(table) == size
        results = {}
        for form, grad in (("flat", g[lo:hi]), ("table", table[lo:hi] if sliced else table)):
            q, s = runs[form]
            results[form] = call(kernels, q[lo:hi], grad, [b[lo:hi] for b in s], step, n_threads)
        assert results["flat"] == results["table"]
        for a, b in zip([runs["flat"][0], *runs["flat"][1]], [runs["table"][0], *runs["table"][1]]):
            assert_bits_equal(a, b)
    if hi - lo > 50:  # the kernel did step
        assert not np.array_equal(runs["flat"][0], p, equal_nan=True)


def test_table_slices():
    arrays = [np.arange(5, dtype=np.float32), np.zeros(0, np.float32), np.ones(7, np.float32)]
    table = grad_table(arrays, np.float32)
    assert (len(table), table.offset, table.size, table.itemsize) == (12, 0, 12, 4)
    assert table.keep is arrays
    part = table[3:10][2:]
    assert (len(part), part.offset, part.keep) == (5, 5, arrays)
    assert len(table[10:100]) == 2 and len(table[8:2]) == 0 and len(table[-4:]) == 4
    p = np.zeros(5, np.float32)
    kernels.sgd(p, part, p[:0], 1.0, 0.0, 0.0, 0.0, False, False, False, 1.0, 1)
    np.testing.assert_array_equal(p, -np.ones(5, np.float32))
    assert "GradTable" in repr(part)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernels_refuse_a_mismatched_table(case):
    n_states, call = case
    p, states = np.zeros(9), [np.zeros(9) for _ in range(n_states)]
    with pytest.raises(ValueError, match="GradTable"):  # float32 sources for float64
        call(kernels, p, grad_table([np.zeros(9, np.float32)], np.float32), states, 2, 1)
    with pytest.raises(ValueError, match="GradTable"):  # one element short
        call(kernels, p, grad_table([np.zeros(4), np.zeros(4)], np.float64), states, 2, 1)
    with pytest.raises(ValueError, match="elements"):  # a flat gradient of the wrong length
        call(kernels, p, np.zeros(8), states, 2, 1)
    assert not p.any() and not any(s.any() for s in states)


@pytest.mark.parametrize("bounds, sources, itemsize, error", [
    ([1, 4], [0], 4, "start at 0"),
    ([0, 5, 3], [0, 0], 4, "not decrease"),
    ([0, 5], [0, 0], 4, "len\\(sources\\) \\+ 1"),
    ([0], [0], 8, "len\\(sources\\) \\+ 1"),
    ([0, 5], [0], 3, "itemsize"),
])
def test_invalid_tables(bounds, sources, itemsize, error):
    with pytest.raises(ValueError, match=error):
        kernels.GradTable(np.array(bounds, np.intp), np.array(sources, np.intp), itemsize)


@pytest.mark.parametrize("key", [3, slice(0, 4, 2), "a", None])
def test_table_takes_slices_only(key):
    table = grad_table([np.zeros(6)], np.float64)
    with pytest.raises(TypeError, match="slice"):
        table[key]


# -- HalfGrads: 16-bit gradients in, 16-bit parameters out, in the kernel's own pass -------------
HALF_SIZES = [0, 1, 7, 1023, 1025, 4097, PARALLEL_THRESHOLD + 1, 2**16 + 3]  # pieces of 1024


def random_half_bits(rng, size, kind):
    """16-bit patterns of ordinary values (and a few inf/NaN) of ``kind``."""
    x = (rng.standard_normal(size) * 0.1).astype(np.float32)
    if size > 3:
        x[rng.integers(0, size, 2)] = [np.inf, np.nan]
    out = np.empty(size, np.uint16)
    kernels.narrow16(x.view(np.uint32), out, kind, 1)
    return out


def widened(x16, kind):
    """float32 values of 16-bit patterns (exact), to compare as assert_bits_equal does."""
    out = np.empty(x16.size, np.float32)
    kernels.widen16(x16, out.view(np.uint32), kind, 1)
    return out


@pytest.mark.parametrize("form", ["flat", "table", "sliced-table"])
@pytest.mark.parametrize("kind", ["bf16", "fp16"])
@pytest.mark.parametrize("size", HALF_SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_half_grads_match_widen_kernel_narrow(case, size, kind, form, n_threads):
    """One pass over HalfGrads is bit for bit widen16, the float32 kernel, narrow16."""
    n_states, call = case
    kind = kernels.KIND_BF16 if kind == "bf16" else kernels.KIND_FP16
    rng = np.random.default_rng(size + kind)
    master = rng.standard_normal(size).astype(np.float32)
    states = [np.abs(rng.standard_normal(size)).astype(np.float32) for _ in range(n_states)]
    runs = {"fused": (master.copy(), [s.copy() for s in states]),
            "three passes": (master.copy(), [s.copy() for s in states])}
    lo, hi = (size // 7, size - size // 11) if form == "sliced-table" else (0, size)
    half_params = {name: np.full(size, 0xFFFF, np.uint16) for name in runs}
    for step in STEPS:
        g16 = random_half_bits(rng, size, kind)
        if form == "flat":
            grad = kernels.HalfGrads(g16, half_params["fused"], kind)
        else:
            grad = kernels.HalfGrads(grad_table(scattered(g16, rng), np.uint16),
                                     half_params["fused"], kind)[lo:hi]
        assert len(grad) == hi - lo
        q, s = runs["fused"]
        fused = call(kernels, q[lo:hi], grad, [b[lo:hi] for b in s], step, n_threads)
        q, s = runs["three passes"]
        g32 = np.empty(hi - lo, np.float32)
        kernels.widen16(g16[lo:hi], g32.view(np.uint32), kind, n_threads)
        three = call(kernels, q[lo:hi], g32, [b[lo:hi] for b in s], step, n_threads)
        kernels.narrow16(q[lo:hi].view(np.uint32), half_params["three passes"][lo:hi], kind,
                         n_threads)
        assert fused == three
        for a, b in zip([runs["fused"][0], *runs["fused"][1]],
                        [runs["three passes"][0], *runs["three passes"][1]]):
            assert_bits_equal(a, b)
        assert_bits_equal(*[widened(half_params[name], kind) for name in runs])
    untouched = np.ones(size, bool)
    untouched[lo:hi] = False
    assert (half_params["fused"][untouched] == 0xFFFF).all()  # nothing outside the slice
    if hi - lo > 50:
        assert not np.array_equal(runs["fused"][0], master, equal_nan=True)


def test_half_grads_refuse_bad_input():
    g16, p16 = np.zeros(9, np.uint16), np.zeros(9, np.uint16)
    with pytest.raises(ValueError, match="kind"):
        kernels.HalfGrads(g16, p16, 7)
    with pytest.raises(ValueError, match="half_params has 8"):
        kernels.HalfGrads(g16, p16[:8], kernels.KIND_BF16)
    with pytest.raises(ValueError, match="itemsize 2"):
        kernels.HalfGrads(grad_table([np.zeros(9, np.float32)], np.float32), p16, kernels.KIND_BF16)
    half = kernels.HalfGrads(g16, p16, kernels.KIND_FP16)
    assert (len(half), len(half[2:5]), half.kind) == (9, 3, kernels.KIND_FP16)
    assert "float16" in repr(half)
    with pytest.raises(TypeError, match="slice"):
        half[1]
    for param in (np.zeros(9), np.zeros(8, np.float32)):  # float64 master, wrong length
        with pytest.raises(ValueError, match="HalfGrads"):
            kernels.sgd(param, half, param[:0], 1.0, 0.0, 0.0, 0.0, False, False, False, 1.0, 1)
        assert not param.any()
    assert not p16.any()

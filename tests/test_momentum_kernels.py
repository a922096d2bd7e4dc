"""SGD and Momentum kernels against their NumPy twins, bit for bit, over many steps."""

import numpy as np
import pytest

import flatopt.functional as F
import reference as ref
from conftest import readonly_memmap

N_STEPS = 50

SGD_CONFIGS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "dampening": dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
    "nesterov": dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=1e-3),
    "maximize": dict(lr=0.01, momentum=0.5, maximize=True, weight_decay=0.1),
    "scaled": dict(lr=0.03, momentum=0.9, nesterov=True, grad_scale=0.125),
}
MOMENTUM_CONFIGS = {
    "plain": dict(lr=0.1),
    "beta0": dict(lr=0.1, beta=0.0),
    "decay": dict(lr=0.05, beta=0.99, weight_decay=0.01),
    "maximize": dict(lr=0.05, beta=0.8, maximize=True, grad_scale=3.0),
}


def _grads(rng, n, dtype, steps=N_STEPS):
    return [rng.standard_normal(n).astype(dtype) for _ in range(steps)]


def run_sgd(n, dtype, n_threads, config, grads=None, steps=N_STEPS):
    """Run the kernel and its twin side by side; return both final (param, buf)."""
    rng = np.random.default_rng(n)
    p = rng.standard_normal(n).astype(dtype)
    buf = np.zeros(n, dtype)
    p_ref, buf_ref = p.copy(), buf.copy()
    for step in range(1, steps + 1):
        g = grads[step - 1] if grads is not None else rng.standard_normal(n).astype(dtype)
        F.sgd_(p, g, buf, step=step, n_threads=n_threads, **config)
        p_ref, buf_ref = ref.sgd(p_ref, np.asarray(g), buf_ref, first_step=step == 1, **config)
    return (p, buf), (p_ref, buf_ref)


@pytest.mark.parametrize("config", SGD_CONFIGS.values(), ids=SGD_CONFIGS.keys())
def test_sgd_matches_twin(size, dtype, n_threads, config):
    (p, buf), (p_ref, buf_ref) = run_sgd(size, dtype, n_threads, config)
    assert p.dtype == dtype and buf.dtype == dtype
    np.testing.assert_array_equal(p, p_ref, strict=True)
    if config.get("momentum"):
        np.testing.assert_array_equal(buf, buf_ref, strict=True)
    else:
        assert not buf.any()  # untouched without momentum


@pytest.mark.parametrize("config", MOMENTUM_CONFIGS.values(), ids=MOMENTUM_CONFIGS.keys())
def test_momentum_matches_twin(size, dtype, n_threads, config):
    rng = np.random.default_rng(size + 1)
    p = rng.standard_normal(size).astype(dtype)
    v = np.zeros(size, dtype)
    p_ref, v_ref = p.copy(), v.copy()
    for _ in range(N_STEPS):
        g = rng.standard_normal(size).astype(dtype)
        F.momentum_(p, g, v, n_threads=n_threads, **config)
        p_ref, v_ref = ref.momentum(p_ref, g, v_ref, **config)
    np.testing.assert_array_equal(p, p_ref, strict=True)
    np.testing.assert_array_equal(v, v_ref, strict=True)


def test_readonly_memmapped_gradients(tmp_path, dtype, n_threads):
    n = 4097
    rng = np.random.default_rng(0)
    grads = [readonly_memmap(tmp_path, g, f"g{i}.bin") for i, g in enumerate(_grads(rng, n, dtype))]
    assert not grads[0].flags.writeable
    (p, buf), (p_ref, buf_ref) = run_sgd(n, dtype, n_threads, SGD_CONFIGS["nesterov"], grads)
    np.testing.assert_array_equal(p, p_ref, strict=True)
    v = np.zeros(n, dtype)
    F.momentum_(p, grads[0], v, lr=0.1, n_threads=n_threads)
    np.testing.assert_array_equal(v, (1.0 - 0.9) * np.asarray(grads[0]), strict=True)


@pytest.mark.parametrize("config", SGD_CONFIGS.values(), ids=SGD_CONFIGS.keys())
def test_sgd_bit_identical_across_threads(dtype, config):
    n = 2**17 + 3
    results = [run_sgd(n, dtype, t, config, steps=10)[0] for t in (1, 2, 3)]
    for p, buf in results[1:]:
        np.testing.assert_array_equal(p, results[0][0], strict=True)
        np.testing.assert_array_equal(buf, results[0][1], strict=True)


def test_momentum_bit_identical_across_threads(dtype):
    n = 2**17 + 3
    rng = np.random.default_rng(5)
    g = rng.standard_normal(n).astype(dtype)
    outs = []
    for t in (1, 2, 3):
        p, v = np.ones(n, dtype), np.zeros(n, dtype)
        for _ in range(5):
            F.momentum_(p, g, v, lr=0.1, beta=0.9, weight_decay=0.01, n_threads=t)
        outs.append(p)
    for p in outs[1:]:
        np.testing.assert_array_equal(p, outs[0], strict=True)


def test_sgd_first_step_buffer_is_gradient():
    """torch's rule: the momentum buffer starts as the first gradient, undampened."""
    p, g, buf = np.zeros(5), np.arange(5.0), np.full(5, 7.0)
    F.sgd_(p, g, buf, lr=1.0, momentum=0.9, dampening=0.5, step=1)
    np.testing.assert_array_equal(buf, g)
    F.sgd_(p, g, buf, lr=1.0, momentum=0.9, dampening=0.5, step=2)
    np.testing.assert_array_equal(buf, 0.9 * g + 0.5 * g)


def test_nonfinite_values_propagate():
    p = np.array([1.0, 2.0, 3.0], np.float32)
    g = np.array([np.nan, np.inf, 1.0], np.float32)
    v = np.zeros(3, np.float32)
    F.momentum_(p, g, v, lr=0.1)
    assert np.isnan(p[0]) and np.isinf(p[1]) and np.isfinite(p[2])

"""flatopt.functional: buffer and hyperparameter validation before any write."""

import numpy as np
import pytest

import flatopt.functional as F
from conftest import assert_unchanged, snapshot


def buffers(n=8, dtype=np.float64):
    rng = np.random.default_rng(0)
    return rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype), np.ones(n, dtype)


def readonly(a):
    a = a.copy()
    a.setflags(write=False)
    return a


SGD_KW = dict(lr=0.1, momentum=0.9, step=2)

BAD_SGD = [
    (lambda p, g, b: (p.astype(np.float32), g, b), {}, TypeError, "grad must have dtype float32"),
    (lambda p, g, b: (p.astype(np.int64), g, b), {}, TypeError, "param must have dtype float32 or float64"),
    (lambda p, g, b: (p.astype(np.float16), g, b), {}, TypeError, "float16"),
    (lambda p, g, b: (p, g[:-1], b), {}, ValueError, r"grad must have length 8 \(as param\), got 7"),
    (lambda p, g, b: (p[:-1], g, b), {}, ValueError, r"grad must have length 7 \(as param\), got 8"),
    (lambda p, g, b: (p, g.astype(np.float32), b), {}, TypeError, r"grad must have dtype float64 \(as param\)"),
    (lambda p, g, b: (p.astype(">f8"), g, b), {}, TypeError, "param must have dtype float32 or float64, "
     "got >f8 \\(not in this machine's byte order\\)"),
    (lambda p, g, b: (p.astype(">f2"), g, b), {}, TypeError, "param must have dtype float32 or float64, got >f2$"),
    (lambda p, g, b: (p, np.ma.masked_greater(g, 0.0), b), {}, TypeError,
     "grad must be a plain numpy array, got a masked array"),
    (lambda p, g, b: (p, g, b[:-1]), {}, ValueError, "momentum_buffer must have length 8"),
    (lambda p, g, b: (p.reshape(2, 4), g, b), {}, ValueError, "param must be 1-D"),
    (lambda p, g, b: (p, np.repeat(g, 2)[::2], b), {}, ValueError, "grad must be C-contiguous"),
    (lambda p, g, b: (readonly(p), g, b), {}, ValueError, "param must be writable"),
    (lambda p, g, b: (p, g, readonly(b)), {}, ValueError, "momentum_buffer must be writable"),
    (lambda p, g, b: (p, p, b), {}, ValueError, "param and grad must not share memory"),
    (lambda p, g, b: (p, g, g), {}, ValueError, "grad and momentum_buffer"),
    (lambda p, g, b: (p, g, None), {}, ValueError, "momentum_buffer is required"),
    (lambda p, g, b: (list(p), g, b), {}, TypeError, "param must be a 1-D numpy array"),
    (lambda p, g, b: (p, g, b), dict(lr=-1.0), ValueError, "lr"),
    (lambda p, g, b: (p, g, b), dict(step=0), ValueError, r"step must be an int in \[1, 2\*\*62\]"),
    (lambda p, g, b: (p, g, b), dict(step=2**62 + 1), ValueError, r"step must be an int in \[1, 2\*\*62\]"),
    (lambda p, g, b: (p, g, b), dict(step=1.0), TypeError, "step"),
    (lambda p, g, b: (p, g, b), dict(grad_scale=float("nan")), ValueError, "grad_scale"),
    (lambda p, g, b: (p, g, b), dict(n_threads=0), ValueError, "n_threads"),
    (lambda p, g, b: (p, g, b), dict(nesterov=True, dampening=0.5), ValueError, "Nesterov"),
]


@pytest.mark.parametrize("make, kwargs, exc, match", BAD_SGD)
def test_sgd_rejects_before_writing(make, kwargs, exc, match):
    p, g, b = buffers()
    args = make(p, g, b)
    arrays = [a for a in args if isinstance(a, np.ndarray)]
    before = snapshot(*arrays)
    with pytest.raises(exc, match=match):
        F.sgd_(*args, **{**SGD_KW, **kwargs})
    assert_unchanged(arrays, before)


def test_overlapping_views_of_one_buffer_rejected():
    buf = np.zeros(16)
    with pytest.raises(ValueError, match="param and grad must not share memory"):
        F.momentum_(buf[:8], buf[4:12], np.zeros(8), lr=0.1)
    # adjacent but disjoint views are fine
    F.momentum_(buf[:8], buf[8:], np.zeros(8), lr=0.1)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(beta=1.0), ValueError, "beta"), (dict(beta=float("nan")), ValueError, "beta"),
    (dict(lr=None), TypeError, "lr must be a real number"), (dict(maximize=0), TypeError, "maximize"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
])
def test_momentum_rejects_bad_hyperparameters(kwargs, exc, match):
    p, g, v = buffers(dtype=np.float32)
    before = snapshot(p, g, v)
    with pytest.raises(exc, match=match):
        F.momentum_(p, g, v, **{"lr": 0.1, **kwargs})
    assert_unchanged([p, g, v], before)


def test_sgd_without_momentum_needs_no_buffer():
    p, g, _ = buffers()
    expected = p - 0.1 * g
    F.sgd_(p, g, lr=0.1, step=1)
    np.testing.assert_array_equal(p, expected)


ADAM_FAMILY = [  # (function, its state buffers, the other arguments it needs)
    (F.adam_, 2, dict(step=1, lr=0.1, eps=1e-8)),
    (F.nadam_, 2, dict(step=1, mu_product=1.0, lr=0.1, eps=1e-8)),
    (F.radam_, 2, dict(step=1, lr=0.1, eps=1e-8)),
    (F.adamax_, 2, dict(step=1, lr=0.1, eps=1e-8)),
    (F.lion_, 1, dict(lr=0.1)),
]


@pytest.mark.parametrize("fn, n_state, kwargs, bad, exc, match", [
    (fn, n_state, kwargs, bad, exc, match) for fn, n_state, kwargs in ADAM_FAMILY
    for bad, exc, match in [
        (dict(beta1=1.5), ValueError, r"Invalid {} beta1: 1.5"),
        (dict(beta2=-0.5), ValueError, r"Invalid {} beta2: -0.5"),
        (dict(beta1="0.9"), TypeError, r"{} beta1 must be a real number"),
        (dict(decoupled=1), TypeError, r"{} decoupled must be a bool, got int 1"),
        (dict(decoupled=None), TypeError, r"{} decoupled must be a bool, got NoneType"),
        # only the name the message opens with is renamed, not the value shown
        (dict(weight_decay="{} betas[1]"), TypeError,
         r"{0} weight_decay must be a real number, got str '{0} betas\[1\]'"),
    ] if "decoupled" not in bad or fn in (F.adam_, F.nadam_, F.radam_)])
def test_adam_family_errors_name_the_functions_arguments(fn, n_state, kwargs, bad, exc, match):
    """The class's rules check them, but the error names ``beta1``/``decoupled``, the
    arguments this function has, not the class's ``betas``/``decoupled_weight_decay``."""
    p, g, _ = buffers()
    state = [np.zeros_like(p) for _ in range(n_state)]
    before = snapshot(p, g, *state)
    bad = {k: v.format(fn.__name__) if isinstance(v, str) else v for k, v in bad.items()}
    with pytest.raises(exc, match=match.format(fn.__name__)):
        fn(p, g, *state, **{"beta1": 0.9, "beta2": 0.99, **kwargs, **bad})
    assert_unchanged([p, g, *state], before)

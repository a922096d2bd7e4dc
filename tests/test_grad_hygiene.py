"""Global gradient norm, fused clipping and skipping non-finite steps."""

import math

import numpy as np
import pytest

import flatopt
import flatopt.functional as F
import reference as ref
from conftest import assert_unchanged, snapshot

NORMS = [1.0, 2.0, 3.0, math.inf]


def numpy_norm(x, p):
    x = np.abs(np.asarray(x, np.float64))
    if p == math.inf:
        return x.max(initial=0.0)
    return (x ** p).sum() ** (1.0 / p)


@pytest.mark.parametrize("p", NORMS)
def test_grad_norm_matches_numpy(size, dtype, p):
    g = np.random.default_rng(size).standard_normal(size).astype(dtype)
    got = F.grad_norm(g, p)
    assert got == pytest.approx(numpy_norm(g, p), rel=1e-12, abs=0.0)
    assert F.grad_norm(g, p, grad_scale=-0.5) == pytest.approx(0.5 * got, rel=1e-15)


@pytest.mark.parametrize("p", NORMS)
def test_grad_norm_bit_identical_across_threads(dtype, p):
    g = np.random.default_rng(1).standard_normal(3 * 2**17 + 11).astype(dtype)
    results = {F.grad_norm(g, p, n_threads=t) for t in (1, 2, 3)}
    assert len(results) == 1


@pytest.mark.parametrize("bad, expected", [(np.inf, math.inf), (np.nan, None), (-np.inf, math.inf)])
@pytest.mark.parametrize("p", NORMS)
def test_grad_norm_nonfinite(bad, expected, p):
    g = np.ones(100_003)
    g[77_777] = bad
    got = F.grad_norm(g, p)
    assert math.isnan(got) if expected is None else got == expected
    assert F.count_nonfinite(g) == 1 and F.count_nonfinite(np.ones(5, np.float32)) == 0


def test_grad_norm_validation():
    with pytest.raises(ValueError, match="norm_type"):
        F.grad_norm(np.ones(3), 0.0)
    with pytest.raises(TypeError, match="norm_type"):
        F.grad_norm(np.ones(3), "fro")
    with pytest.raises(TypeError, match="grad must have dtype float32 or float64"):
        F.grad_norm(np.ones(3, np.int64))
    with pytest.raises(TypeError, match="x must be a 1-D numpy array"):
        F.count_nonfinite([1.0])
    assert F.grad_norm(np.zeros(0)) == 0.0


def test_clip_grad_norm_folds_factor_into_next_step(dtype):
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(5000).astype(dtype)
    opt = flatopt.SGD([p0], lr=0.1, momentum=0.9)
    g = (rng.standard_normal(5000) * 10).astype(dtype)
    opt.grads[0][...] = g
    norm = opt.clip_grad_norm_(1.0)
    assert norm == pytest.approx(numpy_norm(g, 2.0), rel=1e-12)
    coef = 1.0 / (norm + 1e-6)
    before = opt.flat_grads.copy()
    opt.step()
    np.testing.assert_array_equal(opt.flat_grads, before)  # gradients are not rewritten
    expected, _ = ref.sgd(p0, g, None, lr=0.1, momentum=0.9, first_step=True, grad_scale=coef)
    np.testing.assert_array_equal(opt.params[0], expected, strict=True)
    opt.step()  # the factor applied to one step only
    expected, _ = ref.sgd(expected, g, g * dtype.type(coef), lr=0.1, momentum=0.9, first_step=False)
    np.testing.assert_array_equal(opt.params[0], expected, strict=True)


def test_clip_below_max_norm_is_identity():
    opt = flatopt.Momentum([np.ones(10)], lr=0.1)
    opt.grads[0][...] = 0.01
    opt.clip_grad_norm_(100.0)
    ref_opt = flatopt.Momentum([np.ones(10)], lr=0.1)
    ref_opt.grads[0][...] = 0.01
    opt.step(), ref_opt.step()
    np.testing.assert_array_equal(opt.flat_params, ref_opt.flat_params)


def test_clip_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    shapes = [(30, 20), (20,), (7, 3)]
    params = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) * 3 for s in shapes] for _ in range(20)]
    tparams = [torch.tensor(p) for p in params]
    topt = torch.optim.SGD(tparams, lr=0.05, momentum=0.9, foreach=False)
    for gs in grads:
        for t, g in zip(tparams, gs):
            t.grad = torch.tensor(g)
        tnorm = torch.nn.utils.clip_grad_norm_(tparams, 2.0)
        topt.step()
    opt = flatopt.SGD(params, lr=0.05, momentum=0.9)
    for gs in grads:
        for v, g in zip(opt.grads, gs):
            v[...] = g
        norm = opt.clip_grad_norm_(2.0)
        opt.step()
    assert norm == pytest.approx(float(tnorm), rel=1e-12)
    for ours, t in zip(opt.params, tparams):
        np.testing.assert_allclose(ours, t.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_skip_if_nonfinite_leaves_everything(bad):
    opt = flatopt.SGD([np.ones(40_000), np.ones(3)], lr=0.1, momentum=0.9)
    opt.grads[0][...] = 1.0
    assert opt.step(skip_if_nonfinite=True) is True
    opt.grads[0][12_345] = bad
    opt.clip_grad_norm_(1.0)  # non-finite norm: no factor
    buffers = [opt.flat_params, opt.state["momentum_buffer"]]
    before = snapshot(*buffers)
    assert opt.step(skip_if_nonfinite=True) is False
    assert_unchanged(buffers, before)
    assert opt.skipped_steps == 1 and opt.state["step"] == 1
    opt.grads[0][12_345] = 1.0
    assert opt.step(skip_if_nonfinite=True) is True and opt.state["step"] == 2


def test_skip_flag_validated():
    opt = flatopt.SGD([np.ones(3)], lr=0.1)
    with pytest.raises(TypeError, match="skip_if_nonfinite must be a bool"):
        opt.step(skip_if_nonfinite="yes")
    with pytest.raises(ValueError, match="max_norm"):
        opt.clip_grad_norm_(-1.0)


def test_load_state_dict_drops_a_pending_clip_factor():
    opt = flatopt.SGD([np.ones(4)], lr=1.0)
    saved = opt.state_dict()
    opt.grads[0][...] = 100.0
    opt.clip_grad_norm_(1.0)
    opt.load_state_dict(saved)
    opt.step()  # unclipped: the factor measured the gradients before the load
    np.testing.assert_array_equal(opt.params[0], np.full(4, -99.0))

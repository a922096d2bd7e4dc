"""The NumPy API without traps (issue 11, items 9-12), each test failing on the old code."""

import copy
import pickle

import numpy as np
import pytest

import flatopt
from flatopt import functional as F


def arrays(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, 2)).astype(dtype), rng.standard_normal(4).astype(dtype)]


def grads_for(opt, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(g.shape).astype(g.dtype) for g in opt.grads]


# -- 9. a clip factor belongs to the gradients it measured -------------------------------------------
def test_clip_factor_does_not_survive_zero_grad():
    clipped, plain = flatopt.SGD(arrays(), lr=0.1), flatopt.SGD(arrays(), lr=0.1)
    for g, v in zip(clipped.grads, grads_for(clipped)):
        g[...] = 100 * v
    clipped.clip_grad_norm_(1.0)  # factor << 1, pending
    clipped.zero_grad()           # the batch is dropped
    for opt in (clipped, plain):
        for g, v in zip(opt.grads, grads_for(opt, seed=2)):
            g[...] = v
        opt.step()
    np.testing.assert_array_equal(clipped.flat_params, plain.flat_params)


def test_clip_factor_refuses_other_gradients():
    opt = flatopt.Adam(arrays(), lr=0.1)
    for g, v in zip(opt.grads, grads_for(opt)):
        g[...] = 100 * v
    opt.clip_grad_norm_(1.0)
    before = opt.flat_params.copy()
    with pytest.raises(ValueError, match="grads: clip_grad_norm_ measured flat_grads"):
        opt.step(grads_for(opt, seed=3))
    np.testing.assert_array_equal(opt.flat_params, before)
    assert opt.step(opt.grads)  # its own gradients: clipped, fine


# -- 10. hyperparameters checked against the dtype on every path ----------------------------------------
def _f32(n=4):
    return [np.ones(n, np.float32) for _ in range(5)]


@pytest.mark.parametrize("call, key", [
    (lambda b, **k: F.adam_(b[0], b[1], b[2], b[3], step=1, beta1=0.9, beta2=0.999,
                            **{"lr": 1e-3, "eps": 1e-8, **k}), None),
    (lambda b, **k: F.rmsprop_(b[0], b[1], b[2], alpha=0.99, **{"lr": 1e-3, "eps": 1e-8, **k}), None),
    (lambda b, **k: F.adadelta_(b[0], b[1], b[2], b[3], rho=0.9, **{"lr": 1.0, "eps": 1e-6, **k}), None),
    (lambda b, **k: F.adagrad_(b[0], b[1], b[2], step=1, **{"lr": 1e-2, "eps": 1e-10, **k}), None),
], ids=["adam_", "rmsprop_", "adadelta_", "adagrad_"])
@pytest.mark.parametrize("bad", [dict(lr=1e39), dict(eps=1e-46), dict(weight_decay=1e39),
                                 dict(grad_scale=1e39)], ids=["lr-overflow", "eps-to-zero",
                                                              "wd-overflow", "scale-overflow"])
def test_functional_checks_hyperparameters_against_dtype(call, key, bad):
    bufs = _f32()
    before = [b.copy() for b in bufs]
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        call(bufs, **bad)
    for b, c in zip(bufs, before):
        np.testing.assert_array_equal(b, c)
    call(bufs)  # the same call with good values works


def test_optimizer_rejects_eps_that_rounds_to_zero_in_float32():
    with pytest.raises(ValueError, match="eps.*rounds to 0 in float32"):
        flatopt.Adam(arrays(np.float32), eps=1e-46)
    flatopt.Adam(arrays(np.float64), eps=1e-46)  # a float64 eps of 1e-46 is fine
    opt = flatopt.RMSprop(arrays(np.float32))
    opt.param_groups[0]["eps"] = 1e-46
    with pytest.raises(ValueError, match="eps"):
        opt.step()


def test_torch_adapter_rejects_eps_that_rounds_to_zero():
    torch = pytest.importorskip("torch")
    import flatopt.torch as ft
    with pytest.raises(ValueError, match="eps"):
        ft.Adam([torch.nn.Parameter(torch.ones(2))], eps=1e-46)


# -- 11. buffers are read-only attributes; state writes go into the live buffers ------------------------
@pytest.mark.parametrize("attr", ["flat_params", "flat_grads", "params", "grads"])
def test_buffer_attributes_are_read_only(attr):
    opt = flatopt.SGD(arrays(), lr=0.1)
    with pytest.raises(AttributeError):
        setattr(opt, attr, getattr(opt, attr))
    if attr in ("params", "grads"):
        with pytest.raises(TypeError, match="read-only"):
            getattr(opt, attr)[0] = np.zeros((3, 2))


def test_state_assignment_copies_into_the_live_buffer():
    opt, twin = flatopt.Adam(arrays(), lr=0.1), flatopt.Adam(arrays(), lr=0.1)
    for o in (opt, twin):
        o.step(grads_for(o))
    live = opt.state["exp_avg"]
    opt.state["exp_avg"] = np.full(live.shape, 0.5)
    assert opt.state["exp_avg"] is live and (live == 0.5).all()
    np.copyto(twin.state["exp_avg"], 0.5)
    for o in (opt, twin):
        o.step(grads_for(o, seed=4))
    np.testing.assert_array_equal(opt.flat_params, twin.flat_params)
    np.testing.assert_array_equal(opt.state_dict()["state"]["exp_avg"], twin.state["exp_avg"])


def test_state_ior_copies_into_the_live_buffer_and_state_is_not_replaced():
    opt = flatopt.Adam(arrays(), lr=0.1)
    opt.step(grads_for(opt))
    live = opt.state["exp_avg"]
    state = opt.state
    state |= {"exp_avg": np.full(live.shape, 0.25)}
    opt.state |= {"exp_avg_sq": np.full(live.shape, 0.5), "step": 7}
    assert opt.state is state and opt.state["exp_avg"] is live and (live == 0.25).all()
    assert (opt.state["exp_avg_sq"] == 0.5).all() and opt.state["step"] == 7
    twin = flatopt.Adam(arrays(), lr=0.1)
    twin.step(grads_for(twin))
    np.copyto(twin.state["exp_avg"], 0.25)
    np.copyto(twin.state["exp_avg_sq"], 0.5)
    twin.state["step"] = 7
    for o in (opt, twin):
        o.step(grads_for(o, seed=4))
    np.testing.assert_array_equal(opt.flat_params, twin.flat_params, strict=True)
    with pytest.raises(AttributeError, match="state cannot be replaced"):
        opt.state = dict(opt.state)


@pytest.mark.parametrize("edit, exc, match", [
    (lambda s: s.__setitem__("exp_avg", np.zeros(3)), ValueError, "shape"),
    (lambda s: s.__setitem__("new_buffer", np.zeros(10)), KeyError, "cannot be added"),
    (lambda s: s.__delitem__("exp_avg"), TypeError, "cannot be removed"),
    (lambda s: s.pop("exp_avg_sq"), TypeError, "cannot be removed"),
    (lambda s: s.__setitem__("step", -1), ValueError, "step"),
    (lambda s: s.__ior__({"exp_avg": np.zeros(3)}), ValueError, "shape"),
    (lambda s: s.__ior__({"exp_avg": np.zeros(10), "step": -5}), ValueError, "step"),
    (lambda s: s.__ior__({"new_buffer": np.zeros(10)}), KeyError, "cannot be added"),
], ids=["wrong-shape", "new-key", "del", "pop", "negative-step", "ior-wrong-shape", "ior-negative-step",
        "ior-new-key"])
def test_state_rejects_desynchronising_edits(edit, exc, match):
    opt = flatopt.Adam(arrays(), lr=0.1)
    opt.step(grads_for(opt))
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in opt.state.items()}
    with pytest.raises(exc, match=match):
        edit(opt.state)
    assert opt.state.keys() == before.keys()
    for k, v in before.items():
        np.testing.assert_array_equal(opt.state[k], v)


def test_deepcopy_and_pickle_keep_views_of_the_copied_buffers():
    opt = flatopt.SGD(arrays(), lr=0.1, momentum=0.9)
    opt.step(grads_for(opt))
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert not np.shares_memory(other.flat_params, opt.flat_params)
        assert all(np.shares_memory(p, other.flat_params) for p in other.params)
        assert all(np.shares_memory(g, other.flat_grads) for g in other.grads)
        assert all(p is q for p, q in zip(other.param_groups[0]["params"], other.params))
        other.step(grads_for(opt, 5))
        opt_copy = copy.deepcopy(opt)
        opt_copy.step(grads_for(opt, 5))
        np.testing.assert_array_equal(other.flat_params, opt_copy.flat_params)


# -- 12. adoption is explicit ----------------------------------------------------------------------------
def test_caller_arrays_are_never_adopted_silently():
    flat, views = flatopt.flatten(arrays())
    opt = flatopt.SGD(views, lr=0.1)  # back-to-back views of one buffer: still copied
    assert not opt.adopted and not np.shares_memory(opt.flat_params, flat)
    before = flat.copy()
    opt.step(grads_for(opt))
    np.testing.assert_array_equal(flat, before)


def test_adopt_true_updates_the_callers_arrays_or_raises():
    flat, views = flatopt.flatten(arrays())
    opt = flatopt.SGD(views, lr=0.1, adopt=True)
    assert opt.adopted and opt.flat_params.ctypes.data == flat.ctypes.data
    opt.step(grads_for(opt))
    np.testing.assert_array_equal(views[0], opt.params[0])
    with pytest.raises(ValueError, match="cannot be adopted"):
        flatopt.SGD(arrays(), lr=0.1, adopt=True)  # separate arrays
    with pytest.raises(ValueError, match="cannot be adopted"):
        flatopt.SGD(views[::-1], lr=0.1, adopt=True)  # out of order
    with pytest.raises(TypeError, match="adopt"):
        flatopt.SGD(views, lr=0.1, adopt=1)

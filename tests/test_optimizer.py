"""The Optimizer API on SGD and Momentum: views, adoption, step(grads), groups, state_dict,
and bad input rejected before any buffer is written."""

import pickle

import numpy as np
import pytest

import flatopt
import reference as ref
from conftest import assert_unchanged, snapshot


def make_params(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(4, 3), (3,), (1,), (2, 2, 2), (0,)]
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def all_buffers(opt):
    return [opt.flat_params, opt.flat_grads] + [v for v in opt.state.values() if isinstance(v, np.ndarray)]


def test_params_and_grads_are_views():
    arrays = make_params()
    opt = flatopt.SGD(arrays, lr=0.1)
    assert len(opt.params) == len(arrays) == len(opt.grads)
    for p, g, a in zip(opt.params, opt.grads, arrays):
        assert p.shape == a.shape == g.shape
        np.testing.assert_array_equal(p, a)
        assert p.size == 0 or np.shares_memory(p, opt.flat_params)
        assert g.size == 0 or np.shares_memory(g, opt.flat_grads)
    assert not opt.flat_grads.any()
    assert opt.flat_params.ctypes.data % 64 == 0 and opt.flat_grads.ctypes.data % 64 == 0
    arrays[0][0, 0] = 99.0  # inputs were copied: the optimizer does not see this
    assert opt.params[0][0, 0] != 99.0


def test_flattened_views_are_adopted_without_copy():
    flat, views = flatopt.flatten(make_params(np.float32))
    opt = flatopt.Momentum(views, lr=0.5, beta=0.0, adopt=True)
    assert opt.adopted
    assert np.shares_memory(opt.flat_params, flat) and opt.flat_params.ctypes.data == flat.ctypes.data
    opt.grads[0][...] = 1.0
    opt.step()
    np.testing.assert_array_equal(views[0], opt.params[0])  # caller's views stay live
    assert views[0].flat[0] == opt.params[0].flat[0]


def test_non_contiguous_views_are_copied():
    flat, views = flatopt.flatten(make_params())
    reordered = [views[1], views[0]]
    opt = flatopt.SGD(reordered, lr=0.1)
    assert not np.shares_memory(opt.flat_params, flat) and not opt.adopted
    with pytest.raises(ValueError, match="adopt=True"):
        flatopt.SGD(reordered, lr=0.1, adopt=True)


def test_step_with_grad_list_flat_array_and_views():
    arrays = make_params()
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(a.shape) for a in arrays]
    flat_grad = flatopt.flatten(grads)[0]
    opts = [flatopt.SGD(arrays, lr=0.1, momentum=0.9) for _ in range(4)]
    opts[0].step(grads)                              # copied in
    opts[1].step(flat_grad)                          # used directly
    ro = flat_grad.copy()
    ro.setflags(write=False)
    opts[2].step(ro)                                 # read-only flat gradient
    for g, v in zip(grads, opts[3].grads):           # the model writes into the views
        v[...] = g
    opts[3].step(opts[3].grads)
    for opt in opts[1:]:
        np.testing.assert_array_equal(opt.flat_params, opts[0].flat_params, strict=True)
    np.testing.assert_array_equal(opts[0].flat_grads, flat_grad)


def test_zero_grad_keeps_views():
    opt = flatopt.SGD(make_params(), lr=0.1)
    g0 = opt.grads[0]
    g0[...] = 3.0
    opt.zero_grad()
    assert not opt.flat_grads.any() and opt.grads[0] is g0
    opt.zero_grad(set_to_none=True)
    assert not opt.flat_grads.any()


def _reference_sgd_run(params, grads_per_step, groups_hp):
    """Twin run over segments with per-group hyperparameters (list of dicts per step)."""
    ps = [p.copy() for p in params]
    bufs = [np.zeros_like(p) for p in params]
    for step, (grads, hps) in enumerate(zip(grads_per_step, groups_hp), start=1):
        for i, (g, hp) in enumerate(zip(grads, hps)):
            ps[i], bufs[i] = ref.sgd(ps[i], g, bufs[i], first_step=step == 1, **hp)
    return ps


def test_param_groups_and_lr_changes():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(50), rng.standard_normal(30)
    opt = flatopt.SGD([{"params": [a], "weight_decay": 0.1},
                       {"params": [b], "lr": 0.01, "nesterov": True}],
                      lr=0.1, momentum=0.9)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["lr"] == 0.01
    grads, hps = [], []
    for step in range(30):
        if step == 10:
            opt.param_groups[0]["lr"] = 0.05          # a scheduler's edit
            opt.param_groups[1]["momentum"] = 0.5
        g = [rng.standard_normal(50), rng.standard_normal(30)]
        opt.step(g)
        grads.append(g)
        hps.append([{k: grp[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")}
                    for grp in opt.param_groups])
    expected = _reference_sgd_run([a, b], grads, hps)
    np.testing.assert_array_equal(opt.params[0], expected[0], strict=True)
    np.testing.assert_array_equal(opt.params[1], expected[1], strict=True)


@pytest.mark.parametrize("n_groups", [1, 2])
def test_group_params_cannot_be_replaced_or_changed(n_groups):
    """A group's "params" are its views of the flat buffer: a list assigned in its place
    (which the step would silently not update) is refused by the next step, before any
    write, and the list itself is read-only; restoring it makes the step work again."""
    opt = flatopt.SGD([{"params": [np.zeros(3)]} for _ in range(n_groups)], lr=0.1, momentum=0.9)
    group = opt.param_groups[-1]
    views = group["params"]
    assert views[0] is opt.params[-1]
    with pytest.raises(TypeError, match="read-only"):
        views.append(np.zeros(3))
    opt.step()
    group["params"] = [np.ones(3)]
    before = snapshot(*all_buffers(opt))
    with pytest.raises(ValueError, match=rf"param_groups\[{n_groups - 1}\]\['params'\] was replaced"):
        opt.step()
    assert_unchanged(all_buffers(opt), before)
    group["params"] = views
    opt.step()
    assert opt.state["step"] == 2
    copied = pickle.loads(pickle.dumps(opt))
    copied.step()  # the copy's groups hold its own views
    assert copied.param_groups[-1]["params"][0] is copied.params[-1]


def test_momentum_switched_on_later_starts_from_gradient():
    """torch initialises the buffer the first time momentum is used, not at step 1."""
    p = np.zeros(4)
    opt = flatopt.SGD([p], lr=1.0)
    opt.step([np.ones(4)])
    assert "momentum_buffer" not in opt.state
    opt.param_groups[0]["momentum"] = 0.9
    opt.step([np.full(4, 2.0)])
    np.testing.assert_array_equal(opt.state["momentum_buffer"], np.full(4, 2.0))


@pytest.mark.parametrize("cls, kwargs", [
    (flatopt.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    (flatopt.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (flatopt.Momentum, dict(lr=0.05, beta=0.95, weight_decay=0.01, maximize=True)),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_resume_is_bit_identical(cls, kwargs, dtype):
    rng = np.random.default_rng(3)
    params = make_params(dtype)
    grads = [[rng.standard_normal(p.shape).astype(dtype) for p in params] for _ in range(50)]
    groups = lambda: [{"params": params[:2]}, {"params": params[2:], "lr": 0.2}]

    full = cls(groups(), **kwargs)
    for g in grads:
        full.step(g)

    first = cls(groups(), **kwargs)
    for g in grads[:20]:
        first.step(g)
    # A checkpoint: the model's parameters plus the optimizer's state_dict, pickled.
    saved = pickle.dumps((first.flat_params.copy(), first.state_dict()))
    first.step(grads[20])  # the snapshot must not see later steps
    params_20, state_20 = pickle.loads(saved)
    resumed = cls(groups(), **kwargs)
    resumed.flat_params[:] = params_20
    resumed.load_state_dict(state_20)
    assert resumed.state["step"] == 20
    for g in grads[20:]:
        resumed.step(g)
    np.testing.assert_array_equal(resumed.flat_params, full.flat_params, strict=True)
    for key, value in full.state.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(resumed.state[key], value, strict=True)
        else:
            assert resumed.state[key] == value


def test_state_dict_is_a_snapshot():
    opt = flatopt.SGD(make_params(), lr=0.1, momentum=0.9)
    opt.step([np.ones(p.shape) for p in opt.params])
    sd = opt.state_dict()
    assert sd["state"]["momentum_buffer"] is not opt.state["momentum_buffer"]
    opt.step([np.ones(p.shape) for p in opt.params])
    assert not np.array_equal(sd["state"]["momentum_buffer"], opt.state["momentum_buffer"])


# ---- bad input: a clear error, raised before any buffer is written ----------------------

def bad_construction_cases():
    a = np.zeros(3)
    ro = np.zeros(3)
    ro.setflags(write=False)
    return [
        ([], {}, ValueError, "empty parameter list"),
        ([np.zeros(2, np.float32), np.zeros(2)], {}, TypeError, "share one dtype"),
        ([np.zeros(2, np.int64)], {}, TypeError, "int64"),
        ([[1.0, 2.0]], {}, TypeError, "must be a numpy array"),
        (np.zeros(3), {}, TypeError, "sequence of arrays"),
        ([a, a], {}, ValueError, "share memory"),
        ([a], dict(lr=-0.1), ValueError, "lr: -0.1"),
        ([a], dict(lr=float("nan")), ValueError, "lr: nan"),
        ([a], dict(lr="0.1"), TypeError, "lr must be a real number"),
        ([a], dict(momentum=-0.5), ValueError, "momentum: -0.5"),
        ([a], dict(nesterov=True), ValueError, "Nesterov"),
        ([a], dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "Nesterov"),
        ([a], dict(weight_decay=-1.0), ValueError, "weight_decay"),
        ([a], dict(nesterov=1), TypeError, "nesterov must be a bool"),
        ([a], dict(dtype=np.int32), TypeError, "float32 or float64"),
        ([{"params": [a], "lr": -1.0}], {}, ValueError, r"param_groups\[0\] lr"),
        ([{"lr": 1.0}], {}, ValueError, "'params' key"),
        ([{"params": []}], {}, ValueError, "empty"),
        ([{"params": [a]}, a], {}, TypeError, "not a mix"),
    ]


@pytest.mark.parametrize("params, kwargs, exc, match", bad_construction_cases())
def test_sgd_construction_rejects(params, kwargs, exc, match):
    kwargs.setdefault("lr", 0.1)
    before = snapshot(*params) if isinstance(params, list) and all(isinstance(p, np.ndarray) for p in params) else []
    with pytest.raises(exc, match=match):
        flatopt.SGD(params, **kwargs)
    if before:
        assert_unchanged(params, before)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=1.0), "beta: 1.0"), (dict(beta=-0.1), "beta"), (dict(lr=-1.0), "lr"),
    (dict(weight_decay=float("inf")), "weight_decay"), (dict(maximize="yes"), "maximize"),
])
def test_momentum_construction_rejects(kwargs, match):
    kwargs.setdefault("lr", 0.1)
    with pytest.raises((ValueError, TypeError), match=match):
        flatopt.Momentum([np.zeros(3)], **kwargs)


def _stepped_opt():
    opt = flatopt.SGD([{"params": make_params()[:2]}, {"params": make_params()[2:]}], lr=0.1, momentum=0.9)
    opt.step([np.ones(p.shape) for p in opt.params])
    return opt


@pytest.mark.parametrize("make_grads, exc, match", [
    (lambda o: [np.ones(p.shape) for p in o.params][:-1], ValueError, "5 arrays"),
    (lambda o: [np.ones((5, 5))] + [np.ones(p.shape) for p in o.params][1:], ValueError, r"grads\[0\] must have shape"),
    (lambda o: [np.ones(p.shape, complex) for p in o.params], TypeError, r"real \(float or integer\) dtype"),
    (lambda o: [p.shape for p in o.params], TypeError, r"grads\[0\] must be a numpy array"),
    (lambda o: np.ones(o.layout.size + 1), ValueError, "length 24"),
    (lambda o: np.ones(o.layout.size, np.float32), TypeError, "dtype float64"),
    (lambda o: np.ones(2 * o.layout.size)[::2], ValueError, "C-contiguous"),
    (lambda o: np.ones((o.layout.size, 1)), ValueError, "1-D"),
    (lambda o: o.flat_params, ValueError, "must not share memory with params"),
    (lambda o: o.state["momentum_buffer"], ValueError, "must not share memory"),
    (lambda o: "grads", TypeError, "grads must be None"),
])
def test_step_rejects_bad_grads_without_writing(make_grads, exc, match):
    opt = _stepped_opt()
    opt.grads[0][...] = 5.0
    before = snapshot(*all_buffers(opt))
    with pytest.raises(exc, match=match):
        opt.step(make_grads(opt))
    assert_unchanged(all_buffers(opt), before)
    assert opt.state["step"] == 1


@pytest.mark.parametrize("key, value, match", [
    ("lr", -1.0, r"param_groups\[1\] lr"), ("lr", float("nan"), "nan"),
    ("momentum", -0.1, "momentum"), ("nesterov", 1, "nesterov must be a bool"), ("dampening", "x", "dampening"),
])
def test_step_rejects_bad_group_edit_without_writing(key, value, match):
    opt = _stepped_opt()
    before = snapshot(*all_buffers(opt))
    opt.param_groups[1][key] = value
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step()
    assert_unchanged(all_buffers(opt), before)


@pytest.mark.parametrize("cls, key, value", [
    (flatopt.Adam, "amsgrad", True), (flatopt.SGD, "momentum", 0.9), (flatopt.RMSprop, "centered", True),
    (flatopt.RMSprop, "momentum", 0.5)])
def test_failed_step_remembers_no_group_as_checked(cls, key, value):
    """A valid change needing new state (group 1) next to an invalid one (group 2): the
    step raises; once group 2 is mended, the next step makes group 1's state and matches
    an optimizer that never saw the failed call (before the fix, group 0 was updated,
    then the missing state raised KeyError, step after step)."""
    def run(fail):
        opt = cls([{"params": [np.ones(3)]} for _ in range(3)], lr=0.1)
        grads = np.linspace(-1.0, 1.0, 9)
        opt.step(grads)
        opt.param_groups[1][key] = value
        if fail:
            lr = opt.param_groups[2]["lr"]
            opt.param_groups[2]["lr"] = -1.0
            before = snapshot(*all_buffers(opt))
            with pytest.raises(ValueError, match=r"param_groups\[2\] lr"):
                opt.step(grads)
            assert_unchanged(all_buffers(opt), before)
            opt.param_groups[2]["lr"] = lr
        for _ in range(3):
            opt.step(grads)
        return opt

    mended, straight = run(True), run(False)
    np.testing.assert_array_equal(mended.flat_params, straight.flat_params, strict=True)
    assert mended.state["step"] == straight.state["step"] == 4


def test_step_rejects_bad_grad_scale():
    opt = _stepped_opt()
    before = snapshot(*all_buffers(opt))
    for bad, exc in [(float("nan"), ValueError), ("2", TypeError), (float("inf"), ValueError)]:
        with pytest.raises(exc, match="grad_scale"):
            opt.step(grad_scale=bad)
    assert_unchanged(all_buffers(opt), before)


def _tampered(opt, edit):
    sd = opt.state_dict()
    edit(sd)
    return sd


@pytest.mark.parametrize("edit, exc, match", [
    (lambda sd: sd.update(optimizer="Momentum"), ValueError, "for optimizer 'Momentum'"),
    (lambda sd: sd.update(version=99), ValueError, "version"),
    (lambda sd: sd.pop("state"), ValueError, "must have keys"),
    (lambda sd: sd["layout"].update(dtype="float32"), ValueError, "layout"),
    (lambda sd: sd["layout"]["shapes"].pop(), ValueError, "layout"),
    (lambda sd: sd["param_groups"].pop(), ValueError, "2 param_groups"),
    (lambda sd: sd["param_groups"][0].update(lr=-3.0), ValueError, "lr"),
    (lambda sd: sd["param_groups"][0].pop("momentum"), ValueError, "lacks"),
    (lambda sd: sd["state"].update(step=-1), ValueError, "step"),
    (lambda sd: sd["state"].update(momentum_buffer=np.zeros(3)), ValueError, "length 24"),
    (lambda sd: sd["state"].update(momentum_buffer=np.zeros(20, np.float32)), TypeError, "dtype float64"),
    (lambda sd: sd["state"].update(exp_avg=np.zeros(20)), ValueError, "unknown entry 'exp_avg'"),
    (lambda sd: sd["state"].update(momentum_buffer_initialized=[True]), ValueError, "2 bools"),
    (lambda sd: sd.update(segments=[[0, 10], [10, 20]]), ValueError, "segments"),
])
def test_load_state_dict_rejects_without_changing(edit, exc, match):
    opt = _stepped_opt()
    sd = _tampered(opt, edit)
    before = snapshot(*all_buffers(opt))
    groups_before = [dict(g) for g in opt.param_groups]
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(all_buffers(opt), before)
    assert [dict(g) for g in opt.param_groups] == groups_before
    assert opt.state["step"] == 1


def test_load_state_dict_of_other_layout_rejected():
    opt = flatopt.SGD([np.zeros(3)], lr=0.1, momentum=0.9)
    other = flatopt.SGD([np.zeros(4)], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="layout"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        opt.load_state_dict([1, 2])
    # the same totals, other shapes: the first shape that differs is named
    square = flatopt.SGD([np.zeros((2, 3)), np.zeros(3)], lr=0.1).state_dict()
    with pytest.raises(ValueError, match=r"layout \(array 0 of shape \(2, 3\)\) does not match "
                                         r"this optimizer's \(of shape \(3, 2\)\)"):
        flatopt.SGD([np.zeros((3, 2)), np.zeros(3)], lr=0.1).load_state_dict(square)
    with pytest.raises(ValueError, match=r"segments \[\[0, 9\]\] do not match this optimizer's "
                                         r"parameter groups, \[\[0, 6\], \[6, 9\]\]"):
        flatopt.SGD([{"params": [np.zeros((2, 3))]}, {"params": [np.zeros(3)]}], lr=0.1).load_state_dict(square)


def test_state_dict_names_the_class_as_imported():
    """flatopt.keras.Adam and flatopt.Adam share a class name but not their rules: a state
    dict names the class as users import it, and a namesake's is refused by that name."""
    import flatopt.keras

    opt = flatopt.Adam([np.zeros(3)])
    keras_sd = flatopt.keras.Adam([np.zeros(3)]).state_dict()
    assert (opt.state_dict()["optimizer"], keras_sd["optimizer"]) == ("flatopt.Adam", "flatopt.keras.Adam")
    with pytest.raises(ValueError, match="is for optimizer 'flatopt.keras.Adam', not 'flatopt.Adam'"):
        opt.load_state_dict(keras_sd)
    opt.step([np.ones(3)])
    bare = {**opt.state_dict(), "optimizer": "Adam"}   # as saved before names were qualified
    twin = flatopt.Adam([np.zeros(3)])
    twin.load_state_dict(bare)
    np.testing.assert_array_equal(twin.state["exp_avg"], opt.state["exp_avg"])
    # a user's subclass is named bare: its checkpoints survive a moved or renamed module
    mine = type("MyAdam", (flatopt.Adam,), {"__module__": "__main__"})
    moved = type("MyAdam", (flatopt.Adam,), {"__module__": "my_package.optim"})
    sd = mine([np.zeros(3)]).state_dict()
    assert sd["optimizer"] == "MyAdam"
    moved([np.zeros(3)]).load_state_dict(sd)


def test_pickle_holds_each_buffer_once():
    """A copy or a pickle carries the flat buffers, not also the views into them that the
    optimizer keeps (each would be a copy of its own)."""
    opt = flatopt.SGD([np.zeros(100_000), np.zeros(50_000)], lr=0.1)
    opt.step()
    buffers = opt.flat_params.nbytes + opt.flat_grads.nbytes
    assert len(pickle.dumps(opt)) < 1.05 * buffers

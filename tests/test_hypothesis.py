"""Random valid and invalid calls (hypothesis): valid ones match the NumPy twins in
reference.py bit for bit; invalid ones raise TypeError/ValueError and write nothing.

Valid calls cover awkward layouts (offsets into a larger buffer, byte-misaligned data,
read-only gradients, empty buffers, NaN and inf); invalid calls are a valid call with one
thing broken, drawn from a list of corruptions.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import flatopt
import flatopt.functional as F
import reference as ref
from conftest import assert_unchanged, snapshot
from test_adversarial import OPTIMIZERS, VALID_KWARGS, hyperparameter_cases, name_pattern

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)])
SIZES = st.one_of(st.integers(0, 70), st.sampled_from([1023, flatopt._kernels.PARALLEL_THRESHOLD + 3]))
THREADS = st.sampled_from([None, 1, 2])


def finite(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def placed(values, byte_offset):
    """``values`` copied into a larger buffer at ``byte_offset`` bytes (maybe misaligned)."""
    raw = np.zeros(values.nbytes + byte_offset + 16, np.uint8)
    out = raw[byte_offset:byte_offset + values.nbytes].view(values.dtype)
    out[...] = values
    return out


@st.composite
def buffers(draw, n_buffers=3):
    """(param, grad, state...) 1-D buffers of one dtype, with awkward placement."""
    dtype, n = draw(DTYPES), draw(SIZES)
    elements = st.floats(width=dtype.itemsize * 8, allow_subnormal=True) if draw(st.booleans()) \
        else st.floats(-10, 10, width=dtype.itemsize * 8)
    out = []
    for _ in range(n_buffers):
        if n > 2000:  # big: random normal data is enough, hypothesis arrays would be slow
            values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(n).astype(dtype)
        else:
            values = draw(hnp.arrays(dtype, n, elements=elements))
        offset = draw(st.sampled_from([0, 0, dtype.itemsize, 3]))  # 3 bytes: misaligned
        out.append(placed(values, offset))
    if draw(st.booleans()):
        out[1].setflags(write=False)  # grad is only read
    return out


SGD_HP = st.fixed_dictionaries(dict(
    lr=finite(0, 2), momentum=st.sampled_from([0.0, 0.5, 0.9, 1.5]), dampening=finite(-1, 1),
    weight_decay=st.sampled_from([0.0, 1e-3, 0.5]), maximize=st.booleans(), nesterov=st.booleans(),
    grad_scale=finite(-4, 4), step=st.sampled_from([1, 2, 7]), n_threads=THREADS))
MOMENTUM_HP = st.fixed_dictionaries(dict(
    lr=finite(0, 2), beta=st.one_of(finite(0, 0.999), st.just(0.0)), weight_decay=st.sampled_from([0.0, 0.1]),
    maximize=st.booleans(), grad_scale=finite(-4, 4), n_threads=THREADS))


def _valid_sgd(hp):
    if hp["nesterov"] and not (hp["momentum"] > 0 and hp["dampening"] == 0):
        hp = dict(hp, dampening=0.0, momentum=hp["momentum"] or 0.9)
    return hp


def _ref_sgd(p, g, b, hp):
    kw = {k: v for k, v in hp.items() if k not in ("step", "n_threads")}
    return ref.sgd(p, g, b, first_step=hp["step"] == 1, **kw)


def _ref_momentum(p, g, v, hp):
    return ref.momentum(p, g, v, **{k: v_ for k, v_ in hp.items() if k != "n_threads"})


@SETTINGS
@given(bufs=buffers(), hp=SGD_HP)
def test_sgd_matches_twin(bufs, hp):
    hp = _valid_sgd(hp)
    p, g, b = bufs
    g_before = snapshot(g)
    with np.errstate(all="ignore"):
        expected_p, expected_b = _ref_sgd(p.copy(), g.copy(), b.copy(), hp)
        F.sgd_(p, g, b, **hp)
    np.testing.assert_array_equal(p, expected_p, strict=True)
    if hp["momentum"] != 0:
        np.testing.assert_array_equal(b, expected_b, strict=True)
    assert_unchanged([g], g_before)


@SETTINGS
@given(bufs=buffers(), hp=MOMENTUM_HP)
def test_momentum_matches_twin(bufs, hp):
    p, g, v = bufs
    with np.errstate(all="ignore"):
        expected_p, expected_v = _ref_momentum(p.copy(), g.copy(), v.copy(), hp)
        F.momentum_(p, g, v, **hp)
    np.testing.assert_array_equal(p, expected_p, strict=True)
    np.testing.assert_array_equal(v, expected_v, strict=True)


# ---- one thing broken ------------------------------------------------------------------------

def _other_dtype(a):
    return a.astype(np.float64 if a.dtype == np.float32 else np.float32)


def _readonly(a):
    a = a.copy()
    a.setflags(write=False)
    return a


# (name, index of the buffer to replace or None, how, exception, message)
BUFFER_CORRUPTIONS = [
    ("other-float-dtype", lambda a: _other_dtype(a), TypeError, "must have dtype"),
    ("int-dtype", lambda a: a.astype(np.int32), TypeError, "must have dtype"),
    ("complex-dtype", lambda a: a.astype(np.complex64), TypeError, "must have dtype"),
    ("float16", lambda a: a.astype(np.float16), TypeError, "float16"),
    ("one-longer", lambda a: np.append(a, a.dtype.type(1)), ValueError, "must have length"),
    ("strided", lambda a: np.repeat(a, 2)[::2] if a.size > 1 else np.zeros(4, a.dtype)[::2], ValueError, ""),
    ("2-D", lambda a: a.reshape(1, -1), ValueError, "must be 1-D"),
    ("list", lambda a: a.tolist(), TypeError, "numpy array"),
]
HYPER_CORRUPTIONS = {
    "sgd_": [("lr", -0.5), ("lr", float("nan")), ("momentum", -1.0), ("weight_decay", float("inf")),
             ("dampening", "0"), ("nesterov", 1), ("maximize", None), ("step", 0), ("step", 1.5),
             ("grad_scale", float("-inf")), ("grad_scale", 10**400), ("n_threads", 0), ("n_threads", 2**31),
             ("lr", 1e39), ("weight_decay", -1e-9)],
    "momentum_": [("lr", -1e-9), ("beta", 1.0), ("beta", -0.1), ("beta", float("nan")), ("weight_decay", "x"),
                  ("maximize", 0), ("grad_scale", None), ("grad_scale", 3.5e38), ("n_threads", -1),
                  ("lr", 10**309)],
}
NAMES = ("param", "grad", "momentum_buffer")


@st.composite
def broken_calls(draw):
    fn = draw(st.sampled_from(["sgd_", "momentum_"]))
    p, g, b = draw(buffers())
    hp = _valid_sgd(draw(SGD_HP)) if fn == "sgd_" else draw(MOMENTUM_HP)
    if fn == "sgd_":
        hp["momentum"] = hp["momentum"] or 0.9  # the buffer is in use
    args = [p, g, b]
    kind = draw(st.sampled_from(["buffer", "hyper", "overlap"]))
    if kind == "buffer":
        which = draw(st.integers(0, 2))
        name, how, exc, match = draw(st.sampled_from(BUFFER_CORRUPTIONS))
        with np.errstate(over="ignore", invalid="ignore"):
            args[which] = how(args[which])
        # grad and the state are checked against param: a param of another float dtype
        # or length is reported as a mismatch of grad, which is also a fine answer
        culprit = "grad" if which == 0 and name in ("other-float-dtype", "one-longer") else NAMES[which]
        match = rf"{culprit} .*{match}"
        label = f"{NAMES[which]}:{name}"
    elif kind == "hyper":
        key, bad = draw(st.sampled_from(HYPER_CORRUPTIONS[fn]))
        if key == "lr" and bad == 1e39:
            assume(p.dtype == np.float32)  # finite in float64
        if key == "grad_scale" and bad == 3.5e38:
            assume(p.dtype == np.float32)
        hp[key] = bad
        exc, match, label = (TypeError, ValueError), key, f"{key}={bad!r}"
    else:
        assume(p.size > 1)
        a, c = draw(st.sampled_from([(0, 1), (0, 2), (1, 2)]))
        shift = draw(st.integers(0, p.size - 1))
        shared = np.zeros(p.size + shift, p.dtype)
        args[a], args[c] = shared[:p.size], shared[shift:shift + p.size]
        args[a][...] = p
        exc, match, label = ValueError, rf"{NAMES[a]} and {NAMES[c]}", "overlap"
    return fn, args, hp, exc, match, label


@SETTINGS
@given(call=broken_calls())
def test_broken_functional_calls_raise_and_write_nothing(call):
    fn, args, hp, exc, match, label = call
    arrays = [a for a in args if isinstance(a, np.ndarray)]
    before = snapshot(*arrays)
    with pytest.raises(exc, match=match):
        getattr(F, fn)(*args, **hp)
    assert_unchanged(arrays, before)


# ---- optimizers: random layouts, groups and steps --------------------------------------------

SHAPES = st.lists(st.lists(st.integers(0, 4), max_size=3).map(tuple), min_size=1, max_size=5)


@st.composite
def optimizer_runs(draw):
    dtype = draw(DTYPES)
    shapes = draw(SHAPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    cut = draw(st.integers(0, len(shapes)))
    groups = [params[:cut], params[cut:]] if 0 < cut < len(shapes) else [params]
    which = draw(st.sampled_from(["SGD", "Momentum"]))
    if which == "SGD":
        hp = _valid_sgd(draw(SGD_HP))
        overrides = [dict(lr=draw(finite(0, 1)))] + [{}] * (len(groups) - 1)
    else:
        hp = draw(MOMENTUM_HP)
        overrides = [dict(beta=draw(finite(0, 0.99)))] + [{}] * (len(groups) - 1)
    steps = draw(st.integers(1, 3))
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]
    modes = [draw(st.sampled_from(["list", "flat", "views", "none"])) for _ in range(steps)]
    return which, dtype, groups, hp, overrides, grads, modes


@settings(max_examples=80, deadline=None, derandomize=True)
@given(run=optimizer_runs())
def test_optimizer_runs_match_twins(run):
    which, dtype, groups, hp, overrides, grads, modes = run
    cls = getattr(flatopt, which)
    ctor = {k: v for k, v in hp.items() if k not in ("grad_scale", "step", "n_threads")}
    spec = [{"params": arrays, **o} for arrays, o in zip(groups, overrides)]
    opt = cls(spec, n_threads=hp["n_threads"], **ctor)
    flat_sizes = [sum(int(np.prod(a.shape)) for a in arrays) for arrays in groups]
    expected = [np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0, dtype)
                for arrays in groups]
    state = [np.zeros_like(e) for e in expected]
    for step, (g, mode) in enumerate(zip(grads, modes), start=1):
        flat_g = np.concatenate([x.ravel() for x in g]).astype(dtype) if g else np.zeros(0, dtype)
        with np.errstate(all="ignore"):
            if mode == "list":
                opt.step(g, grad_scale=hp["grad_scale"])
            elif mode == "flat":
                opt.step(flat_g, grad_scale=hp["grad_scale"])
            else:
                for view, x in zip(opt.grads, g):
                    view[...] = x
                opt.step(opt.grads if mode == "views" else None, grad_scale=hp["grad_scale"])
            start = 0
            for gi, (size, group) in enumerate(zip(flat_sizes, opt.param_groups)):
                gseg = flat_g[start:start + size]
                h = {k: group[k] for k in cls._hyperparameters}
                if which == "SGD":
                    expected[gi], state[gi] = ref.sgd(expected[gi], gseg, state[gi], first_step=step == 1,
                                                      grad_scale=hp["grad_scale"], **h)
                else:
                    expected[gi], state[gi] = ref.momentum(expected[gi], gseg, state[gi],
                                                           grad_scale=hp["grad_scale"], **h)
                start += size
    np.testing.assert_array_equal(opt.flat_params, np.concatenate(expected), strict=True)


@st.composite
def broken_constructions(draw):
    names = sorted(c.__name__ for c in OPTIMIZERS if c.__name__ in VALID_KWARGS)
    cls = getattr(flatopt, draw(st.sampled_from(names)))
    kwargs = dict(VALID_KWARGS[cls.__name__])
    rows = hyperparameter_cases(kwargs, "")
    _, key, bad, dtype, exc = draw(st.sampled_from(rows))
    dtype = dtype or draw(DTYPES)
    shapes = draw(SHAPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    where = draw(st.sampled_from(["kwargs", "group"]))
    if where == "kwargs":
        kwargs[key] = bad
        spec = params
    else:
        spec = [{"params": params, key: bad}]
    return cls, spec, kwargs, params, exc, name_pattern(key)


@SETTINGS
@given(case=broken_constructions())
def test_broken_constructions_raise_and_write_nothing(case):
    cls, spec, kwargs, params, exc, match = case
    before = snapshot(*params)
    with pytest.raises(exc, match=match):
        cls(spec, **kwargs)
    assert_unchanged(params, before)


@st.composite
def broken_steps(draw):
    which = draw(st.sampled_from(sorted(c.__name__ for c in OPTIMIZERS if c.__name__ in VALID_KWARGS)))
    dtype = draw(DTYPES)
    shapes = draw(SHAPES.filter(lambda s: sum(int(np.prod(x)) for x in s) > 0))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    opt = getattr(flatopt, which)(params, **VALID_KWARGS[which])
    opt.step([rng.standard_normal(s).astype(dtype) for s in shapes])
    size = opt.layout.size
    i = draw(st.integers(0, len(shapes) - 1))
    bad_list = [rng.standard_normal(s).astype(dtype) for s in shapes]
    kind = draw(st.sampled_from(["flat-dtype", "flat-length", "flat-params", "list-length", "list-shape",
                                 "list-dtype", "grad_scale", "group-edit"]))
    call = {}
    if kind == "flat-dtype":
        call["grads"] = np.ones(size, draw(st.sampled_from([np.float16, np.int64, np.complex128, bool])))
        match = "grads"
    elif kind == "flat-length":
        call["grads"] = np.ones(size + draw(st.sampled_from([-1, 1, size])), dtype)
        match = "grads"
    elif kind == "flat-params":
        call["grads"] = opt.flat_params
        match = "grads"
    elif kind == "list-length":
        call["grads"] = bad_list[:-1] if draw(st.booleans()) else bad_list + [bad_list[0]]
        match = "grads"
    elif kind == "list-shape":
        bad_list[i] = np.ones(shapes[i] + (2,), dtype)
        call["grads"] = bad_list
        match = rf"grads\[{i}\]"
    elif kind == "list-dtype":
        bad_list[i] = bad_list[i].astype(draw(st.sampled_from([np.complex64, bool, object])))
        call["grads"] = bad_list
        match = rf"grads\[{i}\]"
    elif kind == "grad_scale":
        call["grad_scale"] = draw(st.sampled_from([float("nan"), float("inf"), None, "1", True, 10**400]))
        match = "grad_scale"
    else:
        rows = hyperparameter_cases(VALID_KWARGS[which], "")
        _, key, bad, needs, _ = draw(st.sampled_from(rows))
        assume(needs is None or needs == dtype)
        opt.param_groups[0][key] = bad
        match = rf"param_groups\[0\].*{name_pattern(key)}"
    return opt, call, match


@SETTINGS
@given(case=broken_steps())
def test_broken_steps_raise_and_write_nothing(case):
    opt, call, match = case
    arrays = [opt.flat_params, opt.flat_grads] + [v for v in opt.state.values() if isinstance(v, np.ndarray)]
    before, step = snapshot(*arrays), opt.state["step"]
    with pytest.raises((TypeError, ValueError), match=match):
        opt.step(**call)
    assert_unchanged(arrays, before)
    assert opt.state["step"] == step


# ---- read-only reductions: grad_norm and count_nonfinite -------------------------------------

def numpy_norm(x, p):
    x = np.abs(x.astype(np.float64))
    if p == np.inf:
        return x.max(initial=0.0)
    return (x ** p).sum() ** (1.0 / p)


@SETTINGS
@given(bufs=buffers(n_buffers=2), p=st.sampled_from([1.0, 2.0, 3.0, 0.5, np.inf]),
       scale=st.one_of(st.just(1.0), finite(-4, 4)))
def test_grad_norm_and_count_nonfinite_match_numpy(bufs, p, scale):
    """Any placement, NaN and inf included: the norm matches NumPy (to rounding, in
    double), is bit-identical for 1 and 2 threads, and nothing is written."""
    _, g = bufs
    before = snapshot(g)
    with np.errstate(all="ignore"):
        expected = abs(scale) * numpy_norm(g, p)
        got = {t: F.grad_norm(g, p, grad_scale=scale, n_threads=t) for t in (1, 2)}
    if np.isnan(expected):
        assert all(np.isnan(v) for v in got.values())
    else:
        assert got[1] == pytest.approx(expected, rel=1e-12, abs=1e-300)
        assert got[1] == got[2]
    assert F.count_nonfinite(g, n_threads=2) == np.count_nonzero(~np.isfinite(g))
    assert_unchanged([g], before)

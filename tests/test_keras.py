"""Tests of flatopt.keras: Keras 3's optimizers on flat buffers.

1. each Keras kernel equals its NumPy twin (``reference_keras``) bit for bit: awkward
   sizes, both dtypes, 1 and 2 threads, every option;
2. each class agrees with ``keras.optimizers.<Name>.apply`` over 200 steps on several
   variables (Keras on its torch backend): float64 to rtol 1e-12, float32 to a few ulp,
   with and without weight decay, and with a learning-rate schedule;
3. the shared checks: bit-exact resume, bad hyperparameters rejected before any write.
"""

import os
import pickle

import numpy as np
import pytest

import flatopt.keras as fk
import reference_keras as ref
from flatopt import _dispatch
from flatopt._kernels import PARALLEL_THRESHOLD
from test_adaptive import Quadratic, _readonly_grads, _train, assert_bits_equal

SIZES = [0, 1, 7, 4097, PARALLEL_THRESHOLD - 1, PARALLEL_THRESHOLD + 1, 2**17 + 3]
DTYPES = [np.float32, np.float64]
K = _dispatch.kernels


# -- 1. kernels vs twins ----------------------------------------------------------------------

def _sgd(fast, p, g, st, step, hp, gs, nt):
    buf = st.get("momentum", p[:0])
    if fast:
        K.keras_sgd(p, g, buf, hp["lr"], hp.get("momentum", 0.0), hp.get("nesterov", False),
                    hp.get("weight_decay") or 0.0, gs, nt)
    else:
        ref.sgd(p, g, buf, grad_scale=gs, **hp)


def _adam(fast, p, g, st, step, hp, gs, nt):
    vh = st.get("velocity_hat", p[:0])
    if fast:
        K.keras_adam(p, g, st["momentum"], st["velocity"], vh, step, hp["lr"], hp["beta_1"],
                     hp["beta_2"], hp["epsilon"], hp.get("amsgrad", False),
                     hp.get("weight_decay") or 0.0, gs, nt)
    else:
        ref.adam(p, g, st["momentum"], st["velocity"], vh, step=step, grad_scale=gs, **hp)


def _rmsprop(fast, p, g, st, step, hp, gs, nt):
    a, b = st.get("average_gradient", p[:0]), st.get("momentum", p[:0])
    if fast:
        K.keras_rmsprop(p, g, st["velocity"], a, b, hp["lr"], hp["rho"], hp.get("momentum", 0.0),
                        hp["epsilon"], hp.get("centered", False), hp.get("weight_decay") or 0.0,
                        gs, nt)
    else:
        ref.rmsprop(p, g, st["velocity"], a, b, grad_scale=gs, **hp)


def _adagrad(fast, p, g, st, step, hp, gs, nt):
    if fast:
        K.keras_adagrad(p, g, st["accumulator"], hp["lr"], hp["epsilon"],
                        hp.get("weight_decay") or 0.0, gs, nt)
    else:
        ref.adagrad(p, g, st["accumulator"], grad_scale=gs, **hp)


def _adamax(fast, p, g, st, step, hp, gs, nt):
    if fast:
        K.keras_adamax(p, g, st["m"], st["u"], step, hp["lr"], hp["beta_1"], hp["beta_2"],
                       hp["epsilon"], hp.get("weight_decay") or 0.0, gs, nt)
    else:
        ref.adamax(p, g, st["m"], st["u"], step=step, grad_scale=gs, **hp)


def _nadam(fast, p, g, st, step, hp, gs, nt):
    if fast:
        st["u_product"] = K.keras_nadam(p, g, st["momentum"], st["velocity"], step,
                                        st["u_product"], hp["lr"], hp["beta_1"], hp["beta_2"],
                                        hp["epsilon"], hp.get("weight_decay") or 0.0, gs, nt)
    else:
        st["u_product"] = ref.nadam(p, g, st["momentum"], st["velocity"], step=step,
                                    u_product=st["u_product"], grad_scale=gs, **hp)


def _weight_decay(fast, p, g, st, step, hp, gs, nt):
    if fast:
        K.keras_weight_decay(p, hp["lr"], hp["weight_decay"], nt)
    else:
        p[...] = ref._decay(p, hp["lr"], hp["weight_decay"])


# (id, runner, hyperparameters, state buffers, initial scalars, grad_scale)
KERNEL_CASES = [
    ("sgd", _sgd, dict(lr=1e-2), (), {}, 1.0),
    ("sgd-momentum-wd", _sgd, dict(lr=1e-2, momentum=0.9, weight_decay=0.1), ("momentum",), {}, 0.37),
    ("sgd-nesterov", _sgd, dict(lr=1e-2, momentum=0.5, nesterov=True), ("momentum",), {}, 1.0),
    ("adam", _adam, dict(lr=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7), ("momentum", "velocity"), {}, 1.0),
    ("adam-amsgrad-wd", _adam, dict(lr=1e-2, beta_1=0.8, beta_2=0.99, epsilon=1e-6, amsgrad=True,
                                    weight_decay=0.004),
     ("momentum", "velocity", "velocity_hat"), {}, 2.5),
    ("rmsprop", _rmsprop, dict(lr=1e-3, rho=0.9, epsilon=1e-7), ("velocity",), {}, 1.0),
    ("rmsprop-centered-momentum-wd", _rmsprop,
     dict(lr=1e-3, rho=0.8, momentum=0.9, epsilon=1e-7, centered=True, weight_decay=0.1),
     ("velocity", "average_gradient", "momentum"), {}, 0.37),
    ("adagrad-wd", _adagrad, dict(lr=1e-2, epsilon=1e-7, weight_decay=0.1), ("accumulator",), {}, 1.0),
    ("adamax", _adamax, dict(lr=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7), ("m", "u"), {}, 1.0),
    ("adamax-wd", _adamax, dict(lr=1e-2, beta_1=0.5, beta_2=0.9, epsilon=1e-5, weight_decay=0.1),
     ("m", "u"), {}, 0.37),
    ("nadam", _nadam, dict(lr=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7), ("momentum", "velocity"),
     {"u_product": 1.0}, 1.0),
    ("nadam-wd", _nadam, dict(lr=1e-2, beta_1=0.8, beta_2=0.99, epsilon=1e-6, weight_decay=0.1),
     ("momentum", "velocity"), {"u_product": 1.0}, 2.5),
    ("weight-decay", _weight_decay, dict(lr=1e-2, weight_decay=0.3), (), {}, 1.0),
]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_kernel_matches_twin(case, dtype, n, tmp_path):
    _, run, hp, names, scalars, gs = case
    dtype = np.dtype(dtype)
    grads = _readonly_grads(tmp_path, n, dtype)
    p0 = np.random.default_rng(1).standard_normal(n).astype(dtype)
    init = 0.1 if run is _adagrad else 0.0

    def fresh():
        return p0.copy(), {**{k: np.full(n, init, dtype) for k in names}, **scalars}

    p_ref, st_ref = fresh()
    for step in range(1, 61):
        run(False, p_ref, grads[step % 3], st_ref, step, hp, gs, 1)
    assert np.isfinite(p_ref).all()
    if n:
        assert not np.array_equal(p_ref, p0)
    for nt in (1, 2):
        p, st = fresh()
        for step in range(1, 61):
            run(True, p, grads[step % 3], st, step, hp, gs, nt)
        assert_bits_equal(p, p_ref, f"param, n_threads={nt}")
        for k in names:
            assert_bits_equal(st[k], st_ref[k], k)
        for k in scalars:
            assert st[k] == st_ref[k], k


@pytest.mark.parametrize("level", _dispatch.supported_levels())
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_every_isa_build_matches_twin(case, dtype, level, tmp_path, monkeypatch):
    # The kernels of every ISA build this CPU can run (baseline, avx2, avx512), 10 steps.
    import importlib
    _, run, hp, names, scalars, gs = case
    monkeypatch.setitem(globals(), "K", importlib.import_module(_dispatch.MODULES[level]))
    n = PARALLEL_THRESHOLD + 17
    dtype = np.dtype(dtype)
    grads = _readonly_grads(tmp_path, n, dtype)
    p0 = np.random.default_rng(1).standard_normal(n).astype(dtype)
    results = []
    for fast in (False, True):
        p, st = p0.copy(), {**{k: np.full(n, 0.1, dtype) for k in names}, **scalars}
        for step in range(1, 11):
            run(fast, p, grads[step % 3], st, step, hp, gs, 2)
        results.append([p] + [st[k] for k in names])
    for got, want in zip(results[1], results[0]):
        assert_bits_equal(got, want, level)


# -- 2. against keras.optimizers ----------------------------------------------------------------

@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    return pytest.importorskip("keras")


SHAPES = [(3, 4), (5,), (2, 3, 2)]

# (name, keyword arguments for both). Every option that changes a formula.
KERAS_CASES = [
    ("SGD", dict()),
    ("SGD", dict(learning_rate=0.05, momentum=0.9)),
    ("SGD", dict(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("Adam", dict()),
    ("Adam", dict(learning_rate=1e-2, beta_1=0.8, beta_2=0.99, epsilon=1e-6, amsgrad=True,
                  weight_decay=0.01)),
    ("AdamW", dict()),
    ("AdamW", dict(learning_rate=1e-2, weight_decay=0.1, amsgrad=True)),
    ("RMSprop", dict()),
    ("RMSprop", dict(centered=True)),
    ("RMSprop", dict(momentum=0.9, weight_decay=0.01)),
    ("RMSprop", dict(learning_rate=1e-2, rho=0.8, momentum=0.5, centered=True, epsilon=1e-6)),
    ("Adadelta", dict()),
    ("Adadelta", dict(learning_rate=1.0, rho=0.9, epsilon=1e-6, weight_decay=0.01)),
    ("Adagrad", dict()),
    ("Adagrad", dict(learning_rate=0.1, initial_accumulator_value=0.5, epsilon=1e-6,
                     weight_decay=0.01)),
    ("Adamax", dict()),
    ("Adamax", dict(learning_rate=1e-2, beta_1=0.5, beta_2=0.9, epsilon=1e-5, weight_decay=0.01)),
    ("Nadam", dict()),
    ("Nadam", dict(learning_rate=1e-2, beta_1=0.8, beta_2=0.99, epsilon=1e-6, weight_decay=0.01)),
    ("Lion", dict()),
    ("Lion", dict(learning_rate=1e-3, beta_1=0.5, beta_2=0.9, weight_decay=0.1)),
]


def _case_id(case):
    name, hp = case
    return name + "".join(f"-{k}={v}" for k, v in hp.items())


def _gradients(dtype, steps=200, seed=42):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        g = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        for a in g:
            a.ravel()[::7] = 0.0
        out.append(g)
    return out


def _run_both(keras, name, hp, dtype, schedule=None, steps=200, changes=None):
    """Train keras.optimizers.<name> and flatopt.keras.<name> on the same gradients;
    ``changes[k]``: attributes assigned to both optimizers before step ``k``."""
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = _gradients(dtype, steps)
    old = keras.config.floatx()
    keras.config.set_floatx(np.dtype(dtype).name)  # Keras's lr variable in the same dtype
    try:
        kw = dict(hp) if schedule is None else {**hp, "learning_rate": schedule()}
        variables = [keras.Variable(a.copy(), dtype=np.dtype(dtype).name) for a in init]
        theirs = getattr(keras.optimizers, name)(**kw)
        kw = dict(hp) if schedule is None else {**hp, "learning_rate": schedule()}
        ours = getattr(fk, name)([a.copy() for a in init], **kw, n_threads=1)
        for k, g in enumerate(grads):
            for attr, value in (changes or {}).get(k, {}).items():
                setattr(theirs, attr, value)
                setattr(ours, attr, value)
            theirs.apply([keras.ops.convert_to_tensor(x) for x in g], variables)
            ours.step(g)
        theirs_params = [keras.ops.convert_to_numpy(v) for v in variables]
    finally:
        keras.config.set_floatx(old)
    assert ours.iterations == int(keras.ops.convert_to_numpy(theirs.iterations)) == steps
    return ours, theirs, theirs_params, init


def _ulps(a, b):
    """|a - b| in units of the last place of the larger magnitude, elementwise."""
    return np.abs(a.astype(np.float64) - b) / np.spacing(np.maximum(np.abs(a), np.abs(b)))


@pytest.mark.parametrize("case", KERAS_CASES, ids=[_case_id(c) for c in KERAS_CASES])
def test_matches_keras_float64(case, keras):
    name, hp = case
    ours, _, theirs, init = _run_both(keras, name, hp, np.float64)
    for a, b, a0 in zip(ours.params, theirs, init):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
        assert not np.array_equal(a, a0)


# Keras's torch backend computes the same formulas as its backend-agnostic update_step
# (which flatopt.keras follows operation for operation) with torch._foreach ops in another
# order (``m*b1 + (1-b1)*g`` for ``m + (g-m)*(1-b1)``) whose CPU kernels contract to fused
# multiply-adds: about one float32 ulp per operation per step, a random walk over 200
# steps, amplified by momentum (errors live ~1/(1-momentum) steps). Observed over the cases
# below: the median within 2 ulp (0 for most), the largest difference 4.3e-6 = 36 ulp of
# 1.0 (SGD with Nesterov momentum 0.9 at lr 0.05; parameters are O(1)); the huge ulp counts
# are near-zero values. So: the median within 4 ulp and every element within 128 ulp of
# 1.0 (1.5e-5). A systematic error moves the median: a beta cast in the wrong precision
# (1e-5 relative in a bias correction) by ~20 ulp, a bias correction off by one step by
# thousands. Errors below float32 resolution (epsilon inside or outside a root) are caught
# by the float64 test at 1e-12.
def _assert_float32_close(ours, theirs):
    a = np.concatenate([x.ravel() for x in ours])
    b = np.concatenate([np.asarray(x).ravel() for x in theirs])
    ulps = _ulps(a, b)
    assert np.median(ulps) <= 4, np.median(ulps)
    np.testing.assert_allclose(a, b, rtol=0, atol=128 * np.finfo(np.float32).eps)


@pytest.mark.parametrize("case", KERAS_CASES, ids=[_case_id(c) for c in KERAS_CASES])
def test_matches_keras_float32(case, keras):
    name, hp = case
    ours, _, theirs, _ = _run_both(keras, name, hp, np.float32)
    _assert_float32_close(ours.params, theirs)


def _exponential_decay(keras):
    return lambda: keras.optimizers.schedules.ExponentialDecay(
        0.01, decay_steps=20, decay_rate=0.5)


def _piecewise(keras):
    return lambda: keras.optimizers.schedules.PiecewiseConstantDecay([50, 120], [1e-2, 3e-3, 1e-3])


SCHEDULE_NAMES = ["SGD", "Adam", "AdamW", "RMSprop", "Adadelta", "Adagrad", "Adamax", "Nadam", "Lion"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_matches_keras_with_a_schedule(name, dtype, keras):
    # The same LearningRateSchedule object type for both; weight decay on, so that the
    # decay also uses the scheduled rate (Keras's semantics).
    hp = dict(weight_decay=0.05) if name != "SGD" else dict(momentum=0.9, weight_decay=0.05)
    schedule = _exponential_decay(keras) if name != "Adagrad" else _piecewise(keras)
    ours, _, theirs, _ = _run_both(keras, name, hp, dtype, schedule=schedule)
    if dtype == np.float64:
        for a, b in zip(ours.params, theirs):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    else:
        _assert_float32_close(ours.params, theirs)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_defaults_are_keras(name, keras):
    import inspect
    ours = inspect.signature(getattr(fk, name)).parameters
    theirs = inspect.signature(getattr(keras.optimizers, name)).parameters
    shared = [k for k in ours if k not in ("params", "n_threads", "dtype", "adopt", "master_dtype", "unsupported")]
    assert shared == [k for k in theirs if k in shared]  # same order
    for k in shared:
        assert ours[k].default == theirs[k].default, k


# Keras's attributes: assigned between steps (as Keras scripts change the learning rate),
# each takes effect at the next step in both. Flags that make Keras build other state
# (amsgrad, centered, momentum from 0) are left alone: Keras cannot switch them mid-run.
ATTRIBUTE_CASES = [
    ("SGD", dict(learning_rate=0.05, momentum=0.9),
     {5: dict(learning_rate=0.01, momentum=0.5, nesterov=True, weight_decay=0.01)}),
    ("Adam", dict(learning_rate=1e-2), {5: dict(learning_rate=3e-3, beta_1=0.5, beta_2=0.99, epsilon=1e-5)}),
    ("AdamW", dict(learning_rate=1e-2), {7: dict(weight_decay=0.1)}),
    ("RMSprop", dict(learning_rate=1e-3, momentum=0.9), {5: dict(rho=0.5, momentum=0.3, epsilon=1e-4)}),
    ("Adadelta", dict(learning_rate=1.0), {5: dict(rho=0.5, epsilon=1e-4)}),
    ("Adagrad", dict(learning_rate=1e-2), {0: dict(initial_accumulator_value=1.0), 5: dict(epsilon=1e-3)}),
    ("Adamax", dict(learning_rate=1e-2), {5: dict(beta_1=0.5, beta_2=0.9, epsilon=1e-4)}),
    ("Nadam", dict(learning_rate=1e-2), {5: dict(beta_1=0.8, beta_2=0.99, epsilon=1e-5)}),
    ("Lion", dict(learning_rate=1e-3), {5: dict(beta_1=0.5, beta_2=0.9, learning_rate=1e-2)}),
    ("Lion", dict(learning_rate=1e-3, beta_1=1.0), {}),  # Keras's beta_1 range is (0, 1]
    ("Lion", dict(learning_rate=1e-3, beta_2=1.0), {}),  # Keras does not check beta_2
]


@pytest.mark.parametrize("case", ATTRIBUTE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(ATTRIBUTE_CASES)])
def test_assigned_attributes_take_effect_as_in_keras(case, keras):
    """``opt.learning_rate = 0.01`` and every other hyperparameter attribute, as in Keras
    (they used to create a new attribute and change nothing); Adagrad's accumulator is
    filled at the first step, as Keras builds it then."""
    name, hp, changes = case
    ours, theirs_opt, theirs, init = _run_both(keras, name, hp, np.float64, steps=20, changes=changes)
    for a, b in zip(ours.params, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    for attr in set(changes.get(5, {})) - {"learning_rate"}:
        assert getattr(ours, attr) == getattr(theirs_opt, attr)
    assert ours.learning_rate == pytest.approx(float(keras.ops.convert_to_numpy(theirs_opt.learning_rate)))


def test_callable_learning_rates_are_called_as_keras_calls_them(keras):
    """A LearningRateSchedule gets the iteration count, any other callable no argument."""
    ours, theirs_opt, theirs, _ = _run_both(keras, "SGD", dict(learning_rate=lambda: 0.03, momentum=0.9),
                                            np.float64, steps=10)
    for a, b in zip(ours.params, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    assert ours.learning_rate == 0.03
    sched = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    ours = fk.SGD([np.zeros(3)], learning_rate=sched)
    ours.step(np.ones(3))
    assert ours.learning_rate == float(keras.ops.convert_to_numpy(sched(1))) == pytest.approx(0.05)
    with pytest.raises(TypeError, match="LearningRateSchedule, so it is not settable"):
        ours.learning_rate = 0.1  # as Keras refuses it
    ours.learning_rate = lambda: 0.5
    assert ours.learning_rate == 0.5


class _InverseTime(fk.LearningRateSchedule):
    def __call__(self, step):
        return 0.1 / (1 + step)


def test_flatopt_schedule_gets_the_iteration_count_and_survives_copies():
    """flatopt.keras.LearningRateSchedule: a step-dependent rate without Keras, carried
    by deepcopy and pickle (a closure over the optimizer would keep reading the original)."""
    import copy

    opt = fk.SGD([np.ones(3)], momentum=0.9, learning_rate=_InverseTime())
    opt.step(np.ones(3))
    twins = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    for o in [opt] + twins:
        for _ in range(3):
            o.step(np.ones(3))
    for twin in twins:
        assert_bits_equal(twin.flat_params, opt.flat_params)
    m, p = 0.0, 1.0
    for t in range(4):  # Keras's SGD with momentum, at rate 0.1/(1+t)
        m = 0.9 * m - 0.1 / (1 + t)
        p += m
    np.testing.assert_allclose(opt.params[0], p, rtol=1e-15)
    assert opt.learning_rate == 0.1 / 5


UNSUPPORTED = [("clipnorm", None, "clip_grad_norm_"), ("clipvalue", None, "np.clip"),
               ("global_clipnorm", None, "clip_grad_norm_"), ("use_ema", False, "moving average"),
               ("ema_momentum", 0.99, "moving average"), ("ema_overwrite_frequency", None, "moving average"),
               ("loss_scale_factor", None, "grad_scale"), ("gradient_accumulation_steps", None, "grad_scale")]


def test_unsupported_keras_attributes_refuse_to_be_set():
    """clipnorm & co. as attributes: None (off), and setting one raises, naming it, showing
    the value and saying what to use instead (it used to create an attribute that changed
    nothing)."""
    opt = fk.Adam([np.ones(3)])
    for name, off, instead in UNSUPPORTED:
        assert getattr(opt, name) == off  # Keras's default: off
        setattr(opt, name, off)
        if off is not None:  # NumPy's value of it too
            setattr(opt, name, np.asarray(off)[()])
        with pytest.raises(TypeError, match=f"Adam.{name}: not supported") as info:
            setattr(opt, name, 0.5)
        assert "got float 0.5" in str(info.value) and instead in str(info.value)
        assert name not in vars(opt)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_unsupported_keras_arguments_accept_only_keras_defaults(name):
    """Keras's clipnorm=None, use_ema=False, ... spelled out in a ported call are accepted
    (they used to be "unexpected keyword argument"); any other value is a TypeError naming
    the argument and the value, before anything is made; an unknown name is refused as
    Python refuses one. Every class takes the same ones (``**unsupported``, typed by
    ``KerasUnsupported`` for type checkers)."""
    import inspect
    cls = getattr(fk, name)
    last = list(inspect.signature(cls).parameters.values())[-1]
    import typing
    assert typing.get_type_hints(cls.__init__)["unsupported"]  # (tools that read the hints)
    assert (last.name, last.kind) == ("unsupported", inspect.Parameter.VAR_KEYWORD)
    assert list(fk.KerasUnsupported.__annotations__) == [k for k, _, _ in UNSUPPORTED]
    with pytest.raises(TypeError, match=rf"{name}\(\) got an unexpected keyword argument 'clip_norm'"):
        cls([np.ones(3)], clip_norm=None)
    opt = cls([np.ones(3)], **{k: off for k, off, _ in UNSUPPORTED})
    assert all(getattr(opt, k) == off for k, off, _ in UNSUPPORTED)
    cls([np.ones(3)], use_ema=np.False_, ema_momentum=np.float64(0.99))
    for k, off, instead in UNSUPPORTED:
        for bad in (1.0, True) if off is None else (True, 0.9):
            with pytest.raises(TypeError, match=rf"^{name} {k}: not supported by flatopt.keras") as info:
                cls([np.ones(3)], **{k: bad})
            assert f"got {type(bad).__name__} {bad!r}" in str(info.value) and instead in str(info.value)


def test_adagrad_accumulator_is_filled_only_for_a_changed_value():
    """Refilled at the first step only if initial_accumulator_value changed before it (Keras
    builds then); an accumulator set by hand, or a step count set back to 0, is kept
    (``acc += g*g`` from it)."""
    g = np.full(3, 0.5)
    opt = fk.Adagrad([np.ones(3)])
    opt.state["accumulator"] = np.full(3, 2.0)
    opt.step(g)
    np.testing.assert_array_equal(opt.state["accumulator"], 2.0 + 0.25)
    for _ in range(4):
        opt.step(g)
    opt.state["step"] = 0
    opt.step(g)
    np.testing.assert_array_equal(opt.state["accumulator"], 2.0 + 6 * 0.25)
    changed = fk.Adagrad([np.ones(3)])
    changed.initial_accumulator_value = 0.5  # before the first step: in the snapshot too
    twin = fk.Adagrad([np.ones(3)])
    twin.load_state_dict(changed.state_dict())
    for o in (changed, twin):
        o.step(g)
        np.testing.assert_array_equal(o.state["accumulator"], 0.5 + 0.25)
    saved = fk.Adagrad([np.ones(3)])
    saved.state["accumulator"] = np.full(3, 3.0)
    loaded = fk.Adagrad([np.ones(3)])
    loaded.load_state_dict(saved.state_dict())  # a step-0 checkpoint: kept as loaded
    loaded.step(g)
    np.testing.assert_array_equal(loaded.state["accumulator"], 3.0 + 0.25)
    by_hand = fk.Adagrad([np.ones(3)])
    by_hand.initial_accumulator_value = 0.5
    by_hand.state["accumulator"] = np.full(3, 7.0)
    by_hand.step(g)  # the changed value refills it, over the hand-set one (documented)
    np.testing.assert_array_equal(by_hand.state["accumulator"], 0.5 + 0.25)


def test_adagrad_state_dict_does_not_refill_with_a_value_that_overflows():
    """state_dict() refills before the first step only with a value that passes step()'s
    checks: 1e39 overflows float32 and used to write inf into the accumulator."""
    opt = fk.Adagrad([np.ones(3, np.float32)])
    opt.param_groups[0]["initial_accumulator_value"] = 1e39  # unchecked, in the group
    with np.errstate(over="raise"):
        snapshot = opt.state_dict()
    for accumulator in (opt.state["accumulator"], snapshot["state"]["accumulator"]):
        assert_bits_equal(accumulator, np.full(3, 0.1, np.float32))
    with pytest.raises(ValueError, match=r"param_groups\[0\] initial_accumulator_value: 1e\+39 \(overflows float32"):
        opt.step(np.ones(3, np.float32))
    assert_bits_equal(opt.state["accumulator"], np.full(3, 0.1, np.float32))


def test_which_refused_or_skipped_steps_use_up_a_callable_rate():
    """As step() documents: a step refused by the first checks calls no rate; one refused
    for a later group's value has called the earlier groups', and a skipped step every
    group's, so a stateful callable's values are used up; a schedule, called with the
    iteration count (which does not advance), gives the same rate again."""
    rates = iter([0.1, 0.05, 0.01])
    opt = fk.SGD([np.zeros(3)], learning_rate=rates.__next__)
    with pytest.raises(ValueError):
        opt.step(np.ones(4))  # the wrong shape: refused before the rate is asked for
    opt.step(np.ones(3))
    np.testing.assert_array_equal(opt.params[0], -0.1)

    rates = iter([0.1, 0.05, 0.01])
    second = {"rate": -1.0}
    opt = fk.SGD([{"params": [np.zeros(3)], "learning_rate": rates.__next__},
                  {"params": [np.zeros(2)], "learning_rate": lambda: second["rate"]}])
    with pytest.raises(ValueError, match=r"param_groups\[1\] learning_rate"):
        opt.step([np.ones(3), np.ones(2)])
    assert_bits_equal(opt.flat_params, np.zeros(5))
    assert opt.iterations == 0
    second["rate"] = 0.5
    opt.step([np.ones(3), np.ones(2)])  # group 0's 0.1 was used up by the refused step
    np.testing.assert_array_equal(opt.params[0], -0.05)

    rates = iter([0.1, 0.05, 0.01])
    stateful = fk.SGD([np.zeros(3)], learning_rate=rates.__next__)
    scheduled = fk.SGD([np.zeros(3)], learning_rate=_InverseTime())
    for opt in (stateful, scheduled):
        assert not opt.step(np.array([np.nan, 0.0, 0.0]), skip_if_nonfinite=True)
        assert opt.iterations == 0
        opt.step(np.ones(3))
    np.testing.assert_array_equal(stateful.params[0], -0.05)  # 0.1 used up by the skip
    np.testing.assert_array_equal(scheduled.params[0], -0.1)  # 0.1/(1 + 0) again


def test_a_callable_rate_is_called_once_per_step_for_update_and_weight_decay():
    """One value per step and group, for both the weight decay and the update (Keras
    calls the callable again for the weight decay; see test_keras_calls_a_callable_rate_twice)."""
    calls = []

    def rate():
        calls.append(None)
        return 0.1 * len(calls)  # another value at each call

    opt = fk.SGD([np.ones(3)], learning_rate=rate, weight_decay=0.5)
    p = 1.0
    for t in range(1, 4):
        opt.step(np.ones(3))
        lr = 0.1 * t
        p = p - p * (0.5 * lr) - lr  # p *= 1 - wd*lr, then p -= lr*g, with the same lr
    assert len(calls) == 3
    np.testing.assert_allclose(opt.params[0], p, rtol=1e-15)


def test_keras_calls_a_callable_rate_twice(keras):
    """What the docs say of Keras: with weight decay it calls a callable learning rate a
    second time per step, so a rate that changes at each call gives other numbers there."""
    calls = []
    theirs = keras.optimizers.SGD(learning_rate=lambda: calls.append(None) or 0.1, weight_decay=0.5)
    variable = keras.Variable(np.ones(3, np.float32))
    for _ in range(3):
        theirs.apply([keras.ops.convert_to_tensor(np.ones(3, np.float32))], [variable])
    assert len(calls) == 6


def test_attributes_read_equal_values_of_other_types_and_flags_checkpoint():
    opt = fk.SGD([{"params": [np.ones(3)], "momentum": 0}, {"params": [np.ones(2)], "momentum": 0.0}],
                 learning_rate=np.float64(0.5))
    opt.param_groups[1]["learning_rate"] = 0.5
    assert opt.momentum == 0 and opt.learning_rate == 0.5
    opt = fk.Adam([np.ones(3)], learning_rate=0.1)
    twin = fk.Adam([np.ones(3)], learning_rate=0.1)
    for o in (opt, twin):
        o.step(np.full(3, 0.5))
        o.amsgrad = True  # a flag whose buffer the next step allocates
    opt.load_state_dict(opt.state_dict())  # the snapshot has that buffer: it loads
    for o in (opt, twin):
        o.step(np.full(3, 0.25))
    assert_bits_equal(opt.flat_params, twin.flat_params)


def test_sgd_checkpoint_lacking_the_momentum_buffer_is_refused():
    """A checkpoint at step > 0 whose groups have momentum but whose state lacks the buffer
    (state_dict() always has it) would silently restart momentum from zero: refused,
    with nothing changed."""
    g = np.ones(3)
    saved = fk.SGD([np.zeros(3)], momentum=0.9)
    for _ in range(5):
        saved.step(g)
    truncated = saved.state_dict()
    del truncated["state"]["momentum"]
    opt = fk.SGD([np.zeros(3)], momentum=0.5, learning_rate=0.1)
    for _ in range(2):
        opt.step(g)
    before = (opt.flat_params.copy(), opt.state["momentum"].copy(), opt.state["step"],
              [dict(group, params=None) for group in opt.param_groups])
    with pytest.raises(ValueError, match=r"lacks \['momentum'\], needed by param_groups\[0\] at step 5"):
        opt.load_state_dict(truncated)
    assert_bits_equal(opt.flat_params, before[0])
    assert_bits_equal(opt.state["momentum"], before[1])
    assert opt.state["step"] == before[2] == 2
    assert [dict(group, params=None) for group in opt.param_groups] == before[3]
    # A momentum turned on after the last step: state_dict() makes its buffer, so it loads.
    later = fk.SGD([np.zeros(3)])
    later.step(g)
    later.momentum = 0.9
    opt.load_state_dict(later.state_dict())
    assert_bits_equal(opt.state["momentum"], np.zeros(3))


def test_a_callable_learning_rate_that_needs_arguments_is_refused():
    """Keras calls it with no arguments: ``lambda it: ...`` fails there; here it is refused
    up front, naming learning_rate, and when set in a group, before any write."""
    with pytest.raises(TypeError, match=r"SGD learning_rate: a callable learning rate is called with no arguments"):
        fk.SGD([np.zeros(3)], learning_rate=lambda it: 0.1)
    opt = fk.SGD([np.ones(3)], learning_rate=0.1)
    opt.param_groups[0]["learning_rate"] = lambda it: 0.1
    with pytest.raises(TypeError, match=r"param_groups\[0\] learning_rate: a callable"):
        opt.step(np.ones(3))
    assert_bits_equal(opt.flat_params, np.ones(3))
    assert opt.iterations == 0


def test_bad_attribute_values_are_refused_and_groups_must_agree():
    opt = fk.Adam([{"params": [np.ones(3)]}, {"params": [np.ones(2)], "learning_rate": 0.5}])
    with pytest.raises(ValueError, match=r"beta_1"):
        opt.beta_1 = 1.5
    assert [g["beta_1"] for g in opt.param_groups] == [0.9, 0.9] and opt.beta_1 == 0.9
    with pytest.raises(AttributeError, match="parameter groups hold different values"):
        opt.learning_rate
    opt.learning_rate = 0.2
    assert [g["learning_rate"] for g in opt.param_groups] == [0.2, 0.2]
    with pytest.raises(ValueError, match=r"Lion beta_1"):
        fk.Lion([np.ones(3)], beta_1=0.0)  # Keras: "degenerates to SignSGD"


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax", "Nadam"])
@pytest.mark.parametrize("beta", ["beta_1", "beta_2"])
def test_a_bad_beta_is_named_alone(name, beta):
    """Each beta is checked by its own name, in [0, 1) (torch's rule for betas): the message
    names the wrong one, not the other, nor torch's ``betas[i]``."""
    other = {"beta_1": "beta_2", "beta_2": "beta_1"}[beta]
    cls = getattr(fk, name)
    for bad, exc in [(1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError), ("0.9", TypeError)]:
        with pytest.raises(exc, match=rf"\b{name} {beta}\b") as info:
            cls([np.ones(3)], **{beta: bad})
        assert other not in str(info.value) and "betas" not in str(info.value)
    opt = cls([np.ones(3)])
    with pytest.raises(ValueError, match=rf"param_groups\[0\] {beta}: 1.5 \(must be in \[0.0, 1.0\)\)") as info:
        setattr(opt, beta, 1.5)
    assert other not in str(info.value)
    assert getattr(opt, beta) == {"beta_1": 0.9, "beta_2": 0.999}[beta]
    cls([np.ones(3)], **{beta: 0.0})  # 0 is allowed, as in torch


# -- 3. shared checks ----------------------------------------------------------------------------

TABLE = [
    ("SGD", dict(learning_rate=1e-2, momentum=0.9, weight_decay=1e-4)),
    ("Adam", dict(learning_rate=3e-2, amsgrad=True)),
    ("AdamW", dict(learning_rate=3e-2)),
    ("RMSprop", dict(learning_rate=1e-3, centered=True, momentum=0.5)),
    ("Adadelta", dict(learning_rate=1.0)),
    ("Adagrad", dict(learning_rate=0.5)),
    ("Adamax", dict(learning_rate=3e-2)),
    ("Nadam", dict(learning_rate=3e-2)),
    ("Lion", dict(learning_rate=1e-3, weight_decay=1e-3)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("entry", TABLE, ids=[e[0] for e in TABLE])
def test_state_dict_resume_is_bit_exact(entry, dtype):
    name, kwargs = entry
    cls = getattr(fk, name)
    problem = Quadratic()
    start = [x.astype(dtype) for x in problem.start()]

    def groups(arrays):
        return [{"params": [arrays[0].copy()]},
                {"params": [arrays[1].copy()], "learning_rate": kwargs["learning_rate"] / 2}]

    straight = cls(groups(start), **kwargs)
    _train(straight, problem, 50)
    first = cls(groups(start), **kwargs)
    _train(first, problem, 20)
    state, params = pickle.loads(pickle.dumps((first.state_dict(), [p.copy() for p in first.params])))
    resumed = cls([{"params": [params[0]]}, {"params": [params[1]]}], **kwargs)
    resumed.load_state_dict(state)
    _train(resumed, problem, 30)
    for a, b in zip(resumed.params, straight.params):
        assert_bits_equal(a, b)
    for k, v in straight.state.items():
        if isinstance(v, np.ndarray):
            assert_bits_equal(resumed.state[k], v, k)
        else:
            assert resumed.state[k] == v, k


@pytest.mark.parametrize("entry", TABLE, ids=[e[0] for e in TABLE])
def test_converges(entry):
    name, kwargs = entry
    problem = Quadratic()
    opt = getattr(fk, name)(problem.start(), **kwargs)
    _train(opt, problem, 20000 if name in ("Adadelta", "RMSprop") else 6000)
    assert problem.solved(opt.params), [p.round(3) for p in opt.params]


NAN = float("nan")
BAD = {
    "learning_rate": [-1.0, NAN, "0.1", None],
    "momentum": [-0.1, NAN],
    "nesterov": [1],
    "weight_decay": [-0.1, NAN, "x"],
    "beta_1": [1.0, -0.1],
    "beta_2": [1.0, NAN],
    "epsilon": [0.0, -1.0],
    "amsgrad": ["yes"],
    "rho": [1.5, -0.1],
    "centered": [0],
    "initial_accumulator_value": [-1.0],
}
BAD_FOR = {("Lion", "beta_1"): [0.0, 1.5],  # Keras's range for Lion's beta_1 is (0, 1]
           ("Lion", "beta_2"): [1.5, NAN]}
BAD_CASES = [(name, kwargs, key, bad) for name, kwargs in TABLE
             for key in getattr(fk, name)._hyperparameters for bad in BAD_FOR.get((name, key), BAD[key])]


@pytest.mark.parametrize("name,kwargs,key,bad", BAD_CASES,
                         ids=[f"{n}-{k}={b!r}" for n, _, k, b in BAD_CASES])
def test_bad_hyperparameter_rejected_without_writes(name, kwargs, key, bad):
    cls = getattr(fk, name)
    problem = Quadratic()
    with pytest.raises((TypeError, ValueError), match=key):
        cls(problem.start(), **{**kwargs, key: bad})
    opt = cls([{"params": [x]} for x in problem.start()], **kwargs)
    _train(opt, problem, 3)
    problem.grad(opt.params, opt.grads)
    before = [opt.flat_params.copy()] + [v.copy() for v in opt.state.values() if isinstance(v, np.ndarray)]
    opt.param_groups[1][key] = bad
    with pytest.raises((TypeError, ValueError), match=key):
        opt.step()
    after = [opt.flat_params] + [v for v in opt.state.values() if isinstance(v, np.ndarray)]
    for a, b in zip(after, before):
        assert_bits_equal(a, b)


@pytest.mark.parametrize("value, dtype, exc", [
    (NAN, np.float64, ValueError), ("0.1", np.float64, TypeError), (True, np.float64, TypeError),
    (10**400, np.float64, ValueError), (1e39, np.float32, ValueError), (-0.1, np.float32, ValueError),
], ids=["nan", "str", "bool", "hugeint", "f32overflow", "negative"])
def test_bad_schedule_value_is_rejected_without_writes(value, dtype, exc):
    """A schedule's value gets the checks a plain learning rate gets (a string is not a
    number, 1e39 overflows float32), before anything is written."""
    opt = fk.Adam([{"params": [np.ones(3, dtype)]},
                   {"params": [np.ones(2, dtype)], "learning_rate": lambda: value}])
    opt.grads[0][:] = 1.0
    with pytest.raises(exc, match=r"param_groups\[1\] learning_rate"):
        opt.step()
    assert_bits_equal(opt.flat_params, np.ones(5, dtype))
    assert opt.iterations == 0


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adadelta", "Adagrad", "Adamax", "Nadam"])
def test_epsilon_that_rounds_to_zero_is_rejected(name):
    """epsilon=1e-46 is 0 in float32 (0/0 on the first step): rejected as ``eps`` is."""
    with pytest.raises(ValueError, match="epsilon.*rounds to 0 in float32"):
        getattr(fk, name)([np.ones(4, np.float32)], epsilon=1e-46)
    getattr(fk, name)([np.ones(4, np.float64)], epsilon=1e-46)  # a double holds it


def test_adamw_requires_weight_decay():
    with pytest.raises(ValueError, match="weight_decay"):
        fk.AdamW([np.ones(3)], weight_decay=None)

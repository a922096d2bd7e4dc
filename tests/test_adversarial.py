"""Adversarial inputs across the public API: each is a row of a table.

Every row is one bad input. Calling the API with it must raise TypeError or ValueError
with a message that names the argument, and must leave every buffer bit-identical (and,
for optimizers, the step count, hyperparameters and the steps that follow). The
optimizer tables run over every class in ``flatopt`` that subclasses
``flatopt.Optimizer``: a new optimizer needs one line in ``VALID_KWARGS``, and until it
has one its rows are skipped with a reason.

test_optimizer.py and test_functional.py hold the first, SGD-centred bad-input tests;
the rows here are different inputs (or the same kind of input on every class).
"""

import pickle
from collections import namedtuple

import numpy as np
import pytest

import flatopt
import flatopt.functional as F
from conftest import assert_unchanged, snapshot

# Valid constructor arguments for each optimizer, chosen so that every state buffer the
# class has is in use (momentum on, amsgrad on, centered on, ...).
VALID_KWARGS = {
    "SGD": dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "Momentum": dict(lr=0.1, beta=0.9, weight_decay=0.01),
    "Adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=True),
    "AdamW": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=True),
    "RMSprop": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.01, momentum=0.9, centered=True),
    "Adadelta": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.01),
    "Adagrad": dict(lr=1e-2, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1, eps=1e-10),
    "NAdam": dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, momentum_decay=4e-3),
    "RAdam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                  decoupled_weight_decay=True),
    "Adamax": dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
    "Lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01),
}
# Hyperparameters that torch.optim requires to be >= 0 (whichever classes have them).
NON_NEGATIVE = {"lr", "weight_decay", "eps", "momentum", "beta", "alpha", "rho", "lr_decay",
                "initial_accumulator_value"}

OPTIMIZERS = sorted(
    (obj for obj in vars(flatopt).values()
     if isinstance(obj, type) and issubclass(obj, flatopt.Optimizer) and obj is not flatopt.Optimizer),
    key=lambda c: c.__name__)

# Two parameters of the same shape (indices 1 and 2) so that grads can be swapped.
SHAPES = [(4, 3), (5,), (5,), (1,), (2, 2, 2)]
SIZE = sum(int(np.prod(s)) for s in SHAPES)

Case = namedtuple("Case", "id make exc match")


def test_the_optimizer_table_sees_every_optimizer():
    names = {c.__name__ for c in OPTIMIZERS}
    assert {"SGD", "Momentum"} <= names
    assert not any(n.startswith("_") for n in names)


def make_params(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def make_grads(dtype, rng):
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def build(cls, dtype=np.float64, groups=True, steps=3, seed=0):
    """An optimizer of ``cls`` that has taken a few steps, with non-zero grads waiting."""
    kwargs = VALID_KWARGS[cls.__name__]
    params = make_params(dtype, seed)
    spec = [{"params": params[:2]}, {"params": params[2:], "lr": kwargs["lr"] / 2}] if groups else params
    opt = cls(spec, **kwargs)
    rng = np.random.default_rng(seed + 1)
    for _ in range(steps):
        opt.step(make_grads(dtype, rng))
    opt.grads[0][...] = 0.5
    return opt


def arrays_of(opt):
    return [opt.flat_params, opt.flat_grads] + [v for v in opt.state.values() if isinstance(v, np.ndarray)]


def plain_of(opt):
    """Everything but the buffers: step count, flags, hyperparameters (pickled to compare)."""
    return pickle.dumps(({k: v for k, v in opt.state.items() if not isinstance(v, np.ndarray)},
                         [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                         sorted(opt.state)))


def optimizer_params(case_lists):
    """pytest params (cls, case) for every optimizer class and its cases."""
    out = []
    for cls in OPTIMIZERS:
        name = cls.__name__
        if name not in VALID_KWARGS:
            out.append(pytest.param(cls, None, id=f"{name}-skipped", marks=pytest.mark.skip(
                reason=f"no VALID_KWARGS entry for {name}: add one line to test_adversarial.py")))
            continue
        for case in case_lists(cls, VALID_KWARGS[name]):
            out.append(pytest.param(cls, case, id=f"{name}-{case.id}"))
    return out


def hyperparameter_cases(kwargs, prefix):
    """Bad values for every hyperparameter in ``kwargs``: (id, key, bad value, dtype, exc)."""
    rows = []
    for key, good in kwargs.items():
        if isinstance(good, bool):
            rows += [(f"{prefix}{key}-int", key, 1, None, TypeError),
                     (f"{prefix}{key}-str", key, "yes", None, TypeError),
                     (f"{prefix}{key}-none", key, None, None, TypeError)]
        elif isinstance(good, tuple):
            rows += [(f"{prefix}{key}-set", key, set(good), None, TypeError),  # in no order of the caller's
                     (f"{prefix}{key}-nan", key, (float("nan"),) + good[1:], None, ValueError),
                     (f"{prefix}{key}-one", key, (1.0,) + good[1:], None, ValueError),
                     (f"{prefix}{key}-negative", key, good[:-1] + (-0.1,), None, ValueError)]
        else:
            rows += [(f"{prefix}{key}-nan", key, float("nan"), None, ValueError),
                     (f"{prefix}{key}-inf", key, float("inf"), None, ValueError),
                     (f"{prefix}{key}-neginf", key, -float("inf"), None, ValueError),
                     (f"{prefix}{key}-str", key, str(good), None, TypeError),
                     (f"{prefix}{key}-none", key, None, None, TypeError),
                     (f"{prefix}{key}-complex", key, complex(good, 1), None, TypeError),
                     (f"{prefix}{key}-array", key, np.array([good, good]), None, TypeError),
                     (f"{prefix}{key}-hugeint", key, 10**400, None, ValueError),
                     (f"{prefix}{key}-f32overflow", key, 1e39, np.float32, ValueError)]
            if key in NON_NEGATIVE:
                rows.append((f"{prefix}{key}-negative", key, -0.5, None, ValueError))
    return rows


def name_pattern(key):
    return key[:-1] if key.endswith("s") else key  # "betas" may be reported as "beta1"


# ---- construction ---------------------------------------------------------------------

def _f64(*shape):
    return np.random.default_rng(7).standard_normal(shape)


def construction_cases(cls, kwargs):
    a = _f64(12)
    rows = [
        Case("params-empty-tuple", lambda: ((), {}), ValueError, "empty"),
        Case("params-empty-generator", lambda: (iter([]), {}), ValueError, "empty"),
        Case("params-dict", lambda: ({"params": [_f64(3)]}, {}), TypeError, "params"),
        Case("params-none", lambda: (None, {}), TypeError, "params"),
        Case("params-int", lambda: (5, {}), TypeError, "params"),
        Case("params-str", lambda: ("abc", {}), TypeError, "params"),
        Case("params-list-of-none", lambda: ([_f64(3), None], {}), TypeError, r"params'\]\[1\]"),
        Case("params-nested-list", lambda: ([[1.0, 2.0]], {}), TypeError, r"params'\]\[0\]"),
        Case("dtype-int32", lambda: ([_f64(3), np.arange(3, dtype=np.int32)], {}), TypeError, r"params\[1\].*int32"),
        Case("dtype-bool", lambda: ([np.ones(3, bool)], {}), TypeError, r"params\[0\].*bool"),
        Case("dtype-complex", lambda: ([np.ones(3, complex)], {}), TypeError, r"params\[0\].*complex"),
        Case("dtype-float16", lambda: ([np.ones(3, np.float16)], {}), TypeError, r"params\[0\].*float16"),
        Case("dtype-object", lambda: ([np.array([1.0, None])], {}), TypeError, r"params\[0\].*object"),
        Case("dtype-uint8", lambda: ([np.ones(3, np.uint8)], {}), TypeError, r"params\[0\].*uint8"),
        Case("dtype-bigendian", lambda: ([np.ones(3, ">f8")], {}), TypeError, r"params\[0\]"),
        Case("dtype-str", lambda: ([np.array(["a", "b"])], {}), TypeError, r"params\[0\]"),
        Case("convert-bool", lambda: ([np.ones(3, bool)], dict(dtype=np.float32)), TypeError, r"params\[0\].*bool"),
        Case("convert-complex", lambda: ([np.ones(3, complex)], dict(dtype=np.float64)), TypeError,
             r"params\[0\].*complex"),
        Case("convert-object", lambda: ([np.array([1.0, None])], dict(dtype=np.float32)), TypeError, r"params\[0\]"),
        Case("dtype-arg-float16", lambda: ([_f64(3)], dict(dtype="float16")), TypeError, "dtype"),
        Case("dtype-arg-object", lambda: ([_f64(3)], dict(dtype=object)), TypeError, "dtype"),
        Case("dtype-arg-nonsense", lambda: ([_f64(3)], dict(dtype="nonsense")), TypeError, "dtype"),
        Case("dtype-arg-complex", lambda: ([_f64(3)], dict(dtype=np.complex64)), TypeError, "dtype"),
        Case("overlap-partial", lambda: ([a[:5], a[3:8]], {}), ValueError,
             r"params\[0\] and params\[1\] share memory"),
        Case("overlap-reshaped", lambda: ([a[:4], a[:4].reshape(2, 2)], {}), ValueError, "share memory"),
        Case("group-params-none", lambda: ([{"params": None}], {}), TypeError, r"param_groups\[0\]\['params'\]"),
        Case("group-params-int", lambda: ([{"params": [_f64(2)]}, {"params": 5}], {}), TypeError,
             r"param_groups\[1\]\['params'\]"),
        Case("group-params-empty-2nd", lambda: ([{"params": [_f64(2)]}, {"params": ()}], {}), ValueError,
             r"param_groups\[1\]\['params'\] is empty"),
        Case("group-without-params-2nd", lambda: ([{"params": [_f64(2)]}, {"lr": 0.1}], {}), ValueError,
             r"param_groups\[1\]"),
        Case("group-lr-nan", lambda: ([{"params": [_f64(2)]}, {"params": [_f64(2)], "lr": float("nan")}], {}),
             ValueError, r"param_groups\[1\] lr"),
        Case("group-lr-f32overflow",
             lambda: ([{"params": [np.ones(2, np.float32)], "lr": 1e39}], {}), ValueError, r"param_groups\[0\] lr"),
        Case("n_threads-zero", lambda: ([_f64(2)], dict(n_threads=0)), ValueError, "n_threads"),
        Case("n_threads-negative", lambda: ([_f64(2)], dict(n_threads=-1)), ValueError, "n_threads"),
        Case("n_threads-beyond-int", lambda: ([_f64(2)], dict(n_threads=2**31)), ValueError, "n_threads"),
        Case("n_threads-float", lambda: ([_f64(2)], dict(n_threads=np.float64(2.0))), TypeError, "n_threads"),
        Case("n_threads-np-bool", lambda: ([_f64(2)], dict(n_threads=np.True_)), TypeError, "n_threads"),
    ]
    for cid, key, bad, dtype, exc in hyperparameter_cases(kwargs, "hp-"):
        make = (lambda key=key, bad=bad, dtype=dtype:
                ([np.ones(3, dtype or np.float64), np.ones(2, dtype or np.float64)], {key: bad}))
        rows.append(Case(cid, make, exc, name_pattern(key)))
    return rows


@pytest.mark.parametrize("cls, case", optimizer_params(construction_cases))
def test_construction_rejects(cls, case):
    params, extra = case.make()
    arrays = []
    if isinstance(params, list):
        for p in params:
            arrays += p["params"] if isinstance(p, dict) and isinstance(p.get("params"), list) else [p]
    arrays = [a for a in arrays if isinstance(a, np.ndarray)]
    before = snapshot(*arrays)
    with pytest.raises(case.exc, match=case.match):
        cls(params, **{**VALID_KWARGS[cls.__name__], **extra})
    assert_unchanged(arrays, before)


# ---- step -----------------------------------------------------------------------------

def step_cases(cls, kwargs):
    rows = [
        Case("grads-flat-float16", lambda o: dict(grads=np.ones(SIZE, np.float16)), TypeError, "grads"),
        Case("grads-flat-int64", lambda o: dict(grads=np.ones(SIZE, np.int64)), TypeError, "grads"),
        Case("grads-flat-complex", lambda o: dict(grads=np.ones(SIZE, complex)), TypeError, "grads"),
        Case("grads-flat-object", lambda o: dict(grads=np.ones(SIZE, object)), TypeError, "grads"),
        Case("grads-flat-bool", lambda o: dict(grads=np.ones(SIZE, bool)), TypeError, "grads"),
        Case("grads-flat-empty", lambda o: dict(grads=np.ones(0)), ValueError, "grads must have length"),
        Case("grads-flat-reversed", lambda o: dict(grads=np.ones(SIZE)[::-1]), ValueError,
             "grads must be C-contiguous"),
        Case("grads-flat-0d", lambda o: dict(grads=np.array(1.0)), ValueError, "grads must be 1-D"),
        Case("grads-flat-state-view", lambda o: dict(grads=arrays_of(o)[2]), ValueError,
             "grads must not share memory with state"),
        Case("grads-scalar", lambda o: dict(grads=np.float64(1.0)), TypeError, "grads must be None"),
        Case("grads-dict", lambda o: dict(grads={"w": np.ones(3)}), TypeError, "grads must be None"),
        Case("grads-list-empty", lambda o: dict(grads=[]), ValueError, "grads must have 5 arrays"),
        Case("grads-list-none", lambda o: dict(grads=[np.ones(s) for s in SHAPES[:-1]] + [None]), TypeError,
             r"grads\[4\]"),
        Case("grads-list-bool", lambda o: dict(grads=[np.ones(s, bool) for s in SHAPES]), TypeError, r"grads\[0\]"),
        Case("grads-list-object", lambda o: dict(grads=[np.ones(s, object) for s in SHAPES]), TypeError,
             r"grads\[0\]"),
        Case("grads-list-transposed", lambda o: dict(grads=[np.ones(s) for s in SHAPES[1:]] + [np.ones((3, 4))]),
             ValueError, r"grads\[0\] must have shape"),
        Case("grads-list-swapped-views", lambda o: dict(grads=[o.grads[0], o.grads[2], o.grads[1]] + o.grads[3:]),
             ValueError, r"grads\[1\] shares memory with flat_grads at another place than its own"),
        Case("grads-list-shifted-view", lambda o: dict(grads=[o.grads[0], o.flat_grads[13:18]] + o.grads[2:]),
             ValueError, r"grads\[1\]"),
        Case("grad_scale-nan", lambda o: dict(grad_scale=float("nan")), ValueError, "grad_scale"),
        Case("grad_scale-neginf", lambda o: dict(grad_scale=-float("inf")), ValueError, "grad_scale"),
        Case("grad_scale-none", lambda o: dict(grad_scale=None), TypeError, "grad_scale"),
        Case("grad_scale-str", lambda o: dict(grad_scale="1"), TypeError, "grad_scale"),
        Case("grad_scale-bool", lambda o: dict(grad_scale=True), TypeError, "grad_scale"),
        Case("grad_scale-array", lambda o: dict(grad_scale=np.array([1.0, 2.0])), TypeError, "grad_scale"),
        Case("grad_scale-hugeint", lambda o: dict(grad_scale=10**400), ValueError, "grad_scale"),
        Case("grad_scale-f32overflow", lambda o: dict(grad_scale=1e39), ValueError, "grad_scale"),
        Case("skip_if_nonfinite-int", lambda o: dict(skip_if_nonfinite=1), TypeError, "skip_if_nonfinite"),
        Case("skip_if_nonfinite-str", lambda o: dict(skip_if_nonfinite="yes"), TypeError, "skip_if_nonfinite"),
        Case("skip_if_nonfinite-none", lambda o: dict(skip_if_nonfinite=None), TypeError, "skip_if_nonfinite"),
    ]
    return rows


# ---- gradient hygiene: grad_norm and clip_grad_norm_ ---------------------------------------

def hygiene_cases(cls, kwargs):
    return [
        Case("grad_norm-str", lambda o: o.grad_norm("2"), TypeError, "norm_type"),
        Case("grad_norm-inf-str", lambda o: o.grad_norm("inf"), TypeError, "norm_type"),
        Case("grad_norm-none", lambda o: o.grad_norm(None), TypeError, "norm_type"),
        Case("grad_norm-zero", lambda o: o.grad_norm(0), ValueError, "norm_type"),
        Case("grad_norm-negative", lambda o: o.grad_norm(-2.0), ValueError, "norm_type"),
        Case("grad_norm-neginf", lambda o: o.grad_norm(-float("inf")), ValueError, "norm_type"),
        Case("grad_norm-nan", lambda o: o.grad_norm(float("nan")), ValueError, "norm_type"),
        Case("grad_norm-array", lambda o: o.grad_norm(np.array([1.0, 2.0])), TypeError, "norm_type"),
        Case("grad_norm-bool", lambda o: o.grad_norm(True), TypeError, "norm_type"),
        Case("clip-nan", lambda o: o.clip_grad_norm_(float("nan")), ValueError, "max_norm"),
        Case("clip-negative", lambda o: o.clip_grad_norm_(-1.0), ValueError, "max_norm"),
        Case("clip-str", lambda o: o.clip_grad_norm_("1.0"), TypeError, "max_norm"),
        Case("clip-none", lambda o: o.clip_grad_norm_(None), TypeError, "max_norm"),
        Case("clip-hugeint", lambda o: o.clip_grad_norm_(10**400), ValueError, "max_norm"),
        Case("clip-norm_type-zero", lambda o: o.clip_grad_norm_(1.0, norm_type=0.0), ValueError, "norm_type"),
        Case("clip-norm_type-list", lambda o: o.clip_grad_norm_(1.0, norm_type=[2]), TypeError, "norm_type"),
    ]


@pytest.mark.parametrize("cls, case", optimizer_params(hygiene_cases))
def test_grad_hygiene_rejects(cls, case):
    """A rejected norm or clip call writes nothing and leaves no clip factor behind."""
    opt, twin = build(cls), build(cls)
    opt.grads[0][...] = 1e3  # large enough that a clip factor would show
    twin.grads[0][...] = 1e3
    before, plain = snapshot(*arrays_of(opt)), plain_of(opt)
    with pytest.raises(case.exc, match=case.match):
        case.make(opt)
    assert_unchanged(arrays_of(opt), before)
    assert plain_of(opt) == plain
    opt.step()
    twin.step()
    assert_unchanged(arrays_of(opt), arrays_of(twin))


@pytest.mark.parametrize("norm_type", [1e-300, 0.001])
def test_grad_norm_of_a_small_norm_type_is_inf_not_overflow_error(norm_type):
    """(sum |g|**p) ** (1/p) overflows a double for small p: the norm is inf, and
    clip_grad_norm_ then leaves the gradients alone (a non-finite norm)."""
    opt = build(flatopt.SGD)
    opt.flat_grads[:] = 3.0
    assert opt.grad_norm(norm_type) == np.inf
    assert opt.clip_grad_norm_(1.0, norm_type) == np.inf


def _twin_continues_identically(opt, twin, dtype):
    """After the rejected call, ``opt`` steps exactly like an untouched twin."""
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(2):
        opt.step(make_grads(dtype, rng_a))
        twin.step(make_grads(dtype, rng_b))
    assert_unchanged(arrays_of(opt), arrays_of(twin))
    assert plain_of(opt) == plain_of(twin)


@pytest.mark.parametrize("cls, case", optimizer_params(step_cases))
def test_step_rejects(cls, case):
    dtype = np.float32 if "f32" in case.id else np.float64
    opt, twin = build(cls, dtype), build(cls, dtype)
    kwargs = case.make(opt)
    before, plain = snapshot(*arrays_of(opt)), plain_of(opt)
    with pytest.raises(case.exc, match=case.match):
        opt.step(**kwargs)
    assert_unchanged(arrays_of(opt), before)
    assert plain_of(opt) == plain
    _twin_continues_identically(opt, twin, dtype)


# ---- param_groups edited between steps (a scheduler gone wrong) --------------------------

def _append_group(o):
    o.param_groups.append(dict(o.param_groups[0]))


def _replace_group(o):
    o.param_groups[1] = 5


def edit_cases(cls, kwargs):
    rows = [
        Case("edit-delete-lr", lambda o: o.param_groups[1].pop("lr"), ValueError,
             r"param_groups\[1\] lacks \['lr'\]"),
        Case("edit-append-group", _append_group, ValueError, "param_groups"),
        Case("edit-group-not-dict", _replace_group, TypeError, r"param_groups\[1\]"),
    ]
    for cid, key, bad, dtype, exc in hyperparameter_cases(kwargs, "edit-"):
        def edit(o, key=key, bad=bad):
            o.param_groups[1][key] = bad
        rows.append(Case(cid, edit, exc, rf"param_groups\[1\].*{name_pattern(key)}"))
    return rows


@pytest.mark.parametrize("cls, case", optimizer_params(edit_cases))
def test_step_rejects_bad_group_edits(cls, case):
    dtype = np.float32 if "f32" in case.id else np.float64
    opt = build(cls, dtype)
    before, step = snapshot(*arrays_of(opt)), opt.state["step"]
    case.make(opt)
    with pytest.raises(case.exc, match=case.match):
        opt.step()
    assert_unchanged(arrays_of(opt), before)
    assert opt.state["step"] == step


# ---- load_state_dict: other layouts, dtypes, optimizers, versions; truncated; tampered ----

def _other_class(cls):
    others = [c for c in OPTIMIZERS if c is not cls and c.__name__ in VALID_KWARGS]
    return others[0]


def _array_key(sd):
    return sorted(k for k, v in sd["state"].items() if isinstance(v, np.ndarray))[0]


def _set(path, value):
    def edit(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _delete(*path):
    def edit(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return edit


def _buffer(transform):
    def edit(sd):
        key = _array_key(sd)
        sd["state"][key] = transform(sd["state"][key])
    return edit


def _repeat_strided(b):
    return np.repeat(b, 2)[::2]


def load_cases(cls, kwargs):
    real_key = next(k for k, v in kwargs.items() if not isinstance(v, (bool, tuple)))
    bool_key = next((k for k, v in kwargs.items() if isinstance(v, bool)), "maximize")
    rows = [
        # whole state dicts of something else
        Case("other-optimizer", lambda: build(_other_class(cls)).state_dict(), ValueError, "optimizer"),
        Case("other-dtype", lambda: build(cls, np.float32).state_dict(), ValueError, "layout"),
        Case("other-grouping", lambda: build(cls, groups=False).state_dict(), ValueError, "segments|param_groups"),
        Case("other-layout-same-size", lambda: _relaid(cls), ValueError, "layout"),
        Case("not-a-dict-none", lambda: None, TypeError, "state_dict"),
        Case("not-a-dict-bytes", lambda: pickle.dumps(build(cls).state_dict()), TypeError, "state_dict"),
        # another version
        Case("version-str", _set(("version",), "1"), ValueError, "version"),
        Case("version-zero", _set(("version",), 0), ValueError, "version"),
        Case("version-bool", _set(("version",), True), ValueError, "version"),
        Case("version-float", _set(("version",), 1.0), ValueError, "version"),
        Case("version-array", _set(("version",), np.array([1, 1])), ValueError, "version"),
        Case("optimizer-none", _set(("optimizer",), None), ValueError, "optimizer"),
        # truncated
        Case("missing-version", _delete("version"), ValueError, "keys"),
        Case("missing-layout", _delete("layout"), ValueError, "keys"),
        Case("missing-param_groups", _delete("param_groups"), ValueError, "keys"),
        Case("missing-step", _delete("state", "step"), ValueError, "step"),
        Case("missing-hyperparameter", lambda sd: sd["param_groups"][1].pop(real_key), ValueError, "lacks"),
        Case("extra-key", _set(("extra",), 1), ValueError, "keys"),
        # tampered layout and segments
        Case("layout-list", _set(("layout",), [[3], "float64"]), ValueError, "layout"),
        Case("layout-dtype-float16", _set(("layout", "dtype"), "float16"), TypeError, "layout.*dtype"),
        Case("layout-dtype-bogus", _set(("layout", "dtype"), "bogus"), TypeError, "layout.*dtype"),
        Case("layout-shapes-int", _set(("layout", "shapes"), 3), TypeError, "layout.*shapes"),
        Case("layout-shapes-float-dims", lambda sd: sd["layout"]["shapes"].__setitem__(
            1, [float(d) for d in sd["layout"]["shapes"][1]]), TypeError, r"layout.*shapes\[1\]"),
        Case("layout-shapes-negative", lambda sd: sd["layout"]["shapes"].__setitem__(0, [-4, -3]),
             ValueError, r"layout.*shapes\[0\]"),
        Case("segments-none", _set(("segments",), None), ValueError, "segments"),
        Case("segments-strings", _set(("segments",), [["0", "a"], [17, SIZE]]), ValueError, "segments"),
        Case("segments-shifted", _set(("segments",), [[0, 16], [16, SIZE]]), ValueError, "segments"),
        # tampered param_groups
        Case("groups-dict", lambda sd: sd.update(param_groups=dict(enumerate(sd["param_groups"]))),
             ValueError, "param_groups"),
        Case("groups-with-params", lambda sd: sd["param_groups"][0].update(params=[0, 1]), ValueError,
             r"param_groups\[0\]"),
        Case("group-nan", lambda sd: sd["param_groups"][1].update({real_key: float("nan")}), ValueError, real_key),
        Case("group-str", lambda sd: sd["param_groups"][0].update({real_key: "0.1"}), TypeError, real_key),
        Case("group-hugeint", lambda sd: sd["param_groups"][0].update({real_key: 10**400}), ValueError, real_key),
        Case("group-bool-as-int", lambda sd: sd["param_groups"][0].update({bool_key: 1}), TypeError, bool_key),
        # tampered state
        Case("state-list", _set(("state",), [1, 2]), TypeError, r"state_dict\['state'\]"),
        Case("step-float", _set(("state", "step"), 3.0), TypeError, "step"),
        Case("step-str", _set(("state", "step"), "3"), TypeError, "step"),
        Case("step-bool", _set(("state", "step"), True), TypeError, "step"),
        Case("step-none", _set(("state", "step"), None), TypeError, "step"),
        Case("step-negative", _set(("state", "step"), -1), ValueError, "step"),
        Case("step-beyond-max", _set(("state", "step"), 2**62 + 1), ValueError, r"step.*2\*\*62"),
        Case("segments-fractional", lambda sd: sd["segments"][0].__setitem__(1, sd["segments"][0][1] + 0.5),
             ValueError, "segments"),
        Case("unknown-state-entry", _set(("state", "bogus"), np.zeros(SIZE)), ValueError, "bogus"),
        Case("buffer-float16", _buffer(lambda b: b.astype(np.float16)), TypeError, r"state_dict\['state'\]"),
        Case("buffer-int64", _buffer(lambda b: b.astype(np.int64)), TypeError, r"state_dict\['state'\]"),
        Case("buffer-object", _buffer(lambda b: b.astype(object)), TypeError, r"state_dict\['state'\]"),
        Case("buffer-list", _buffer(lambda b: b.tolist()), TypeError, r"state_dict\['state'\]"),
        Case("buffer-truncated", _buffer(lambda b: b[:-1]), ValueError, r"state_dict\['state'\].*length"),
        Case("buffer-2d", _buffer(lambda b: b.reshape(1, -1)), ValueError, r"state_dict\['state'\].*1-D"),
        Case("buffer-strided", _buffer(_repeat_strided), ValueError, r"state_dict\['state'\].*contiguous"),
    ]
    # every state buffer and every plain (per-group) entry, dropped in turn
    state = build(cls).state_dict()["state"]
    for key, value in sorted(state.items()):
        if key == "step":
            continue
        rows.append(Case(f"missing-{key}", _delete("state", key), ValueError, key))
        if not isinstance(value, np.ndarray):
            rows.append(Case(f"{key}-too-short", _set(("state", key), value[:1]), ValueError, key))
            rows.append(Case(f"{key}-ints", _set(("state", key), [int(v) for v in value]), ValueError, key))
            rows.append(Case(f"{key}-tuple", _set(("state", key), tuple(value)), ValueError, key))
    return rows


def _relaid(cls):
    """A state dict of the same class and size, but other shapes (a different model)."""
    opt = build(cls)
    sd = opt.state_dict()
    sd["layout"]["shapes"][0] = [3, 4]
    return sd


@pytest.mark.parametrize("cls, case", optimizer_params(load_cases))
def test_load_state_dict_rejects(cls, case):
    opt, twin = build(cls), build(cls)
    # a checkpoint as it comes back from disk, then edited (or another whole object)
    if case.make.__code__.co_argcount == 0:  # a whole object: another optimizer's state dict, ...
        made = case.make()
    else:  # an edit of a genuine checkpoint (another run of the same model), unpickled
        made = pickle.loads(pickle.dumps(build(cls, seed=3, steps=4).state_dict()))
        case.make(made)
    before, plain = snapshot(*arrays_of(opt)), plain_of(opt)
    with pytest.raises(case.exc, match=case.match):
        opt.load_state_dict(made)
    assert_unchanged(arrays_of(opt), before)
    assert plain_of(opt) == plain
    _twin_continues_identically(opt, twin, np.float64)


def test_sgd_state_without_buffer_but_initialized_flag_rejected():
    """A checkpoint whose flag says the momentum buffer exists, without the buffer."""
    opt = build(flatopt.SGD)
    sd = opt.state_dict()
    del sd["state"]["momentum_buffer"]
    with pytest.raises(ValueError, match="momentum_buffer"):
        opt.load_state_dict(sd)


def test_sgd_state_saved_before_momentum_was_used_still_loads():
    """The legitimate case next to the one above: momentum switched on, saved before a step."""
    opt = flatopt.SGD([np.zeros(3)], lr=0.1)
    opt.step([np.ones(3)])
    opt.param_groups[0]["momentum"] = 0.9
    sd = opt.state_dict()  # the buffer the next step needs is in it, not yet initialized
    assert sd["state"]["momentum_buffer_initialized"] == [False]
    other = flatopt.SGD([np.zeros(3)], lr=0.1)
    other.load_state_dict(sd)
    other.step([np.full(3, 2.0)])
    np.testing.assert_array_equal(other.state["momentum_buffer"], np.full(3, 2.0))


# ---- hyperparameters and state held in mutable objects; calls that fail half-way ----------

BETAS_CLASSES = [c for c in OPTIMIZERS if "betas" in VALID_KWARGS.get(c.__name__, {})]


@pytest.mark.parametrize("container", [list, np.array], ids=["list", "array"])
@pytest.mark.parametrize("cls", BETAS_CLASSES, ids=lambda c: c.__name__)
def test_betas_changed_in_place_are_checked_at_the_next_step(cls, container):
    """Betas in a list or an array may be edited in place; an invalid edit is caught at
    the next step (the optimizer remembers their content, not the object)."""
    betas = container(VALID_KWARGS[cls.__name__]["betas"])
    opt = build(cls)
    opt.param_groups[1]["betas"] = betas
    opt.step()
    betas[0] = 5.0
    before, plain = snapshot(*arrays_of(opt)), plain_of(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\] betas\[0\]"):
        opt.step()
    assert_unchanged(arrays_of(opt), before)
    assert plain_of(opt) == plain


def test_a_step_that_fails_its_gradient_checks_allocates_no_state():
    """amsgrad switched on, then a step with gradients of the wrong length: the step
    raises before the new state buffer exists (state_dict() keeps its keys)."""
    opt = flatopt.Adam([np.ones(3)], lr=0.1)
    opt.step([np.ones(3)])
    opt.param_groups[0]["amsgrad"] = True
    keys = sorted(opt.state)
    with pytest.raises(ValueError, match="grads must have length 3"):
        opt.step(np.ones(4))
    assert sorted(opt.state) == keys
    opt.step(np.ones(3))
    assert "max_exp_avg_sq" in opt.state


def test_state_update_checks_every_entry_before_writing():
    opt = build(flatopt.Adam)
    before = snapshot(*arrays_of(opt))
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt.state.update(exp_avg=np.zeros(SIZE), exp_avg_sq=np.zeros(SIZE + 1))
    with pytest.raises(ValueError, match="step"):
        opt.state.update(exp_avg=np.zeros(SIZE), step=2**62 + 1)
    assert_unchanged(arrays_of(opt), before)


@pytest.mark.parametrize("how", ["load_state_dict", "state.update"])
def test_loading_the_optimizers_own_buffers_swapped(how):
    """Sources that are the optimizer's own live buffers, in other roles, are read before
    any of them is overwritten."""
    opt = build(flatopt.Adam)
    m, v = opt.state["exp_avg"].copy(), opt.state["exp_avg_sq"].copy()
    swapped = {"exp_avg": opt.state["exp_avg_sq"], "exp_avg_sq": opt.state["exp_avg"]}
    if how == "load_state_dict":
        sd = opt.state_dict()
        sd["state"].update(swapped)
        opt.load_state_dict(sd)
    else:
        opt.state.update(swapped)
    np.testing.assert_array_equal(opt.state["exp_avg"], v)
    np.testing.assert_array_equal(opt.state["exp_avg_sq"], m)


def test_state_dict_is_a_snapshot_of_mutable_hyperparameters():
    """Betas in a list: the checkpoint keeps the values of when it was taken, and a loaded
    checkpoint edited afterwards does not reach into the optimizer."""
    opt = flatopt.Adam([np.ones(3)], lr=0.1, betas=[0.9, 0.99])
    sd = opt.state_dict()
    opt.param_groups[0]["betas"][0] = 0.5
    assert sd["param_groups"][0]["betas"] == [0.9, 0.99]
    opt.load_state_dict(sd)
    sd["param_groups"][0]["betas"][0] = 0.7
    assert opt.param_groups[0]["betas"] == [0.9, 0.99]


def test_clip_grad_norm_to_inf_measures_without_clipping():
    """torch's idiom for measuring the norm: max_norm=inf; the step is then unscaled."""
    opt, twin = build(flatopt.Adam), build(flatopt.Adam)
    opt.grads[0][...] = twin.grads[0][...] = 1e3
    assert opt.clip_grad_norm_(float("inf")) == twin.grad_norm()
    opt.step()
    twin.step()
    assert_unchanged(arrays_of(opt), arrays_of(twin))


def test_interleaved_views_are_disjoint_parameters():
    """a[::2] and a[1::2] span the same bytes but share no element: accepted, and stepped
    as two separate arrays are; an overlap hidden behind them is still found."""
    a = np.arange(12.0)
    opt = flatopt.SGD([a[::2], a[1::2]], lr=0.5)
    ref = flatopt.SGD([a[::2].copy(), a[1::2].copy()], lr=0.5)
    for o in (opt, ref):
        o.step([np.ones(6), np.full(6, 2.0)])
    assert_unchanged(opt.params, ref.params)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[2\] share memory"):
        flatopt.SGD([a[0:12:2], a[1:6:2], a[4:6]], lr=0.5)


# ---- flatten and FlatLayout ----------------------------------------------------------------

def _layout():
    return flatopt.FlatLayout(((2, 3), (4,)), np.float64)


def _readonly(a):
    a.setflags(write=False)
    return a


def _pack_swapped():
    layout = flatopt.FlatLayout(((3,), (3,)), np.float64)
    out = np.arange(6.0)
    a, b = layout.split(out)
    return lambda: layout.pack([b, a], out=out), [out]


def _pack_into(out):
    return (lambda: _layout().pack([np.ones((2, 3)), np.ones(4)], out=out)), [out]


def _call(f, *arrays):
    """A case's ``make`` result: the call and the arrays it must leave alone."""
    return f, list(arrays)


LAYOUT_CASES = [
    Case("flatten-none", lambda: _call(lambda: flatopt.flatten(None)), TypeError, "arrays"),
    Case("flatten-int", lambda: _call(lambda: flatopt.flatten(5)), TypeError, "arrays"),
    Case("flatten-list-of-none", lambda: (lambda a: _call(lambda: flatopt.flatten([a, None]), a))(np.ones(2)),
         TypeError, r"arrays\[1\]"),
    Case("flatten-ragged", lambda: _call(lambda: flatopt.flatten([[[1.0, 2.0], [3.0]]])), TypeError, r"arrays\[0\]"),
    Case("flatten-uint16", lambda: (lambda a: _call(lambda: flatopt.flatten([a]), a))(np.ones(2, np.uint16)),
         TypeError, r"arrays\[0\].*uint16"),
    Case("flatten-complex", lambda: (lambda a: _call(lambda: flatopt.flatten([a]), a))(np.ones(2, complex)),
         TypeError, r"arrays\[0\].*complex"),
    Case("flatten-object", lambda: (lambda a: _call(lambda: flatopt.flatten([a]), a))(np.array([1.0, None])),
         TypeError, r"arrays\[0\].*object"),
    Case("flatten-bigendian", lambda: (lambda a: _call(lambda: flatopt.flatten([a]), a))(np.ones(2, ">f4")),
         TypeError, r"arrays\[0\]"),
    Case("flatten-strings", lambda: _call(lambda: flatopt.flatten(["ab"])), TypeError, r"arrays\[0\]"),
    Case("flatten-dtype-float16", lambda: _call(lambda: flatopt.flatten([np.ones(2)], dtype="float16")),
         TypeError, "dtype"),
    Case("flatten-dtype-int", lambda: _call(lambda: flatopt.flatten([np.ones(2)], dtype=5)), TypeError, "dtype"),
    Case("flatten-dtype-bool", lambda: _call(lambda: flatopt.flatten([np.ones(2)], dtype=np.bool_)), TypeError,
         "dtype"),
    Case("flatten-dtype-nonsense", lambda: _call(lambda: flatopt.flatten([np.ones(2)], dtype="nonsense")),
         TypeError, "dtype"),
    Case("layout-shapes-int", lambda: _call(lambda: flatopt.FlatLayout(5, np.float32)), TypeError, "shapes"),
    Case("layout-shapes-str", lambda: _call(lambda: flatopt.FlatLayout(["ab"], np.float32)), TypeError,
         r"shapes\[0\]"),
    Case("layout-shape-none", lambda: _call(lambda: flatopt.FlatLayout([None], np.float32)), TypeError,
         r"shapes\[0\]"),
    Case("layout-dim-float", lambda: _call(lambda: flatopt.FlatLayout([(3,), (2.5,)], np.float32)), TypeError,
         r"shapes\[1\]"),
    Case("layout-dim-bool", lambda: _call(lambda: flatopt.FlatLayout([(True,)], np.float32)), TypeError,
         r"shapes\[0\]"),
    Case("layout-dim-none", lambda: _call(lambda: flatopt.FlatLayout([(None, 2)], np.float32)), TypeError,
         r"shapes\[0\]"),
    Case("layout-too-big", lambda: _call(lambda: flatopt.FlatLayout([(2**62, 2**62)], np.float32)), ValueError,
         "shapes"),
    Case("layout-dtype-float16", lambda: _call(lambda: flatopt.FlatLayout([(3,)], np.float16)), TypeError, "dtype"),
    Case("layout-dtype-object", lambda: _call(lambda: flatopt.FlatLayout([(3,)], object)), TypeError, "dtype"),
    Case("from-dict-none", lambda: _call(lambda: flatopt.FlatLayout.from_dict(None)), ValueError, "layout"),
    Case("from-dict-no-dtype", lambda: _call(lambda: flatopt.FlatLayout.from_dict({"shapes": [[3]]})), ValueError,
         "layout"),
    Case("from-dict-int8", lambda: _call(lambda: flatopt.FlatLayout.from_dict({"shapes": [[3]], "dtype": "int8"})),
         TypeError, "dtype"),
    Case("split-int", lambda: _call(lambda: _layout().split(np.zeros(10, np.int64))), TypeError, "flat"),
    Case("split-2d", lambda: _call(lambda: _layout().split(np.zeros((2, 5)))), ValueError, "flat"),
    Case("split-list", lambda: _call(lambda: _layout().split([0.0] * 10)), TypeError, "flat"),
    Case("pack-count", lambda: _call(lambda: _layout().pack([np.zeros((2, 3))])), ValueError, "arrays"),
    Case("pack-complex", lambda: _call(lambda: _layout().pack([np.zeros((2, 3), complex), np.zeros(4)])), TypeError,
         r"arrays\[0\]"),
    Case("pack-out-readonly", lambda: _pack_into(_readonly(np.zeros(10))), ValueError, "out must be writable"),
    Case("pack-out-float32", lambda: _pack_into(np.zeros(10, np.float32)), TypeError, "out must have dtype"),
    Case("pack-out-short", lambda: _pack_into(np.zeros(9)), ValueError, "out must have length"),
    Case("pack-out-strided", lambda: _pack_into(np.zeros(20)[::2]), ValueError, "out must be C-contiguous"),
    Case("pack-swapped-views-of-out", _pack_swapped, ValueError, r"arrays\[0\] shares memory with out"),
]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: c.id)
def test_flatten_and_layout_reject(case):
    call, arrays = case.make()
    before = snapshot(*arrays)
    with pytest.raises(case.exc, match=case.match):
        call()
    assert_unchanged(arrays, before)


# ---- functional --------------------------------------------------------------------------

def _bufs(dtype=np.float64, n=8):
    rng = np.random.default_rng(11)
    return [rng.standard_normal(n).astype(dtype) for _ in range(3)]


def _memmap_readonly(a, tmp_path):
    path = tmp_path / "buf.bin"
    a.tofile(path)
    return np.memmap(path, dtype=a.dtype, mode="r", shape=a.shape)


def _with(i, make):
    """Replace buffer ``i`` of (param, grad, momentum_buffer) by ``make(buffers, tmp_path)``."""
    def f(bufs, tmp_path):
        bufs = list(bufs)
        bufs[i] = make(bufs, tmp_path)
        return bufs
    return f


def _overlap(i, j, shift):
    """Buffers ``i`` and ``j`` made views of one array, ``shift`` elements apart."""
    def f(bufs, tmp_path):
        n = bufs[0].shape[0]
        shared = np.zeros(n + shift, bufs[0].dtype)
        bufs = list(bufs)
        bufs[i], bufs[j] = shared[:n], shared[shift:shift + n]
        return bufs
    return f


SAME = lambda bufs, tmp_path: bufs  # noqa: E731

FUNCTIONAL_CASES = [
    # (id, which function, buffers transform, extra kwargs, dtype, exception, message)
    ("param-complex", "momentum_", _with(0, lambda b, t: b[0].astype(complex)), {}, np.float64, TypeError, "param"),
    ("param-bool", "momentum_", _with(0, lambda b, t: b[0] > 0), {}, np.float64, TypeError, "param"),
    ("param-object", "momentum_", _with(0, lambda b, t: b[0].astype(object)), {}, np.float64, TypeError, "param"),
    ("param-bigendian", "momentum_", _with(0, lambda b, t: b[0].astype(">f4")), {}, np.float32, TypeError, "param"),
    ("param-0d", "momentum_", _with(0, lambda b, t: np.array(1.0)), {}, np.float64, ValueError, "param"),
    ("param-fortran-2d", "momentum_", _with(0, lambda b, t: np.asfortranarray(b[0].reshape(2, 4))), {}, np.float64,
     ValueError, "param must be 1-D"),
    ("param-memmap-readonly", "sgd_", _with(0, lambda b, t: _memmap_readonly(b[0], t)), {}, np.float64, ValueError,
     "param must be writable"),
    ("param-tuple", "sgd_", _with(0, lambda b, t: tuple(b[0])), {}, np.float64, TypeError, "param"),
    ("grad-int32", "momentum_", _with(1, lambda b, t: b[1].astype(np.int32)), {}, np.float64, TypeError, "grad"),
    ("grad-float64-for-float32", "momentum_", _with(1, lambda b, t: b[1].astype(np.float64)), {}, np.float32,
     TypeError, "grad must have dtype float32"),
    ("grad-longer", "sgd_", _with(1, lambda b, t: np.append(b[1], 1.0)), {}, np.float64, ValueError, "grad"),
    ("buffer-float32-for-float64", "momentum_", _with(2, lambda b, t: b[2].astype(np.float32)), {}, np.float64,
     TypeError, "momentum_buffer"),
    ("buffer-strided", "momentum_", _with(2, lambda b, t: np.repeat(b[2], 2)[::2]), {}, np.float64, ValueError,
     "momentum_buffer must be C-contiguous"),
    ("buffer-memmap-readonly", "momentum_", _with(2, lambda b, t: _memmap_readonly(b[2], t)), {}, np.float64,
     ValueError, "momentum_buffer must be writable"),
    ("buffer-list", "sgd_", _with(2, lambda b, t: list(b[2])), {}, np.float64, TypeError, "momentum_buffer"),
    ("buffer-none", "momentum_", _with(2, lambda b, t: None), {}, np.float64, TypeError, "momentum_buffer"),
    ("buffer-is-param", "momentum_", _with(2, lambda b, t: b[0]), {}, np.float64, ValueError,
     "param and momentum_buffer"),
    ("overlap-param-buffer", "momentum_", _overlap(0, 2, 3), {}, np.float64, ValueError, "param and momentum_buffer"),
    ("overlap-grad-buffer", "sgd_", _overlap(1, 2, 1), {}, np.float32, ValueError, "grad and momentum_buffer"),
    ("lr-f32overflow", "momentum_", SAME, dict(lr=1e39), np.float32, ValueError, "lr"),
    ("wd-f32overflow", "sgd_", SAME, dict(weight_decay=4e38), np.float32, ValueError, "weight_decay"),
    ("dampening-f32overflow", "sgd_", SAME, dict(dampening=-1e39), np.float32, ValueError, "dampening"),
    ("momentum-f32overflow", "sgd_", SAME, dict(momentum=1e39), np.float32, ValueError, "momentum"),
    ("grad_scale-f32overflow", "momentum_", SAME, dict(grad_scale=-1e39), np.float32, ValueError, "grad_scale"),
    ("lr-hugeint", "sgd_", SAME, dict(lr=10**400), np.float64, ValueError, "lr"),
    ("grad_scale-hugeint", "momentum_", SAME, dict(grad_scale=-10**400), np.float64, ValueError, "grad_scale"),
    ("grad_scale-bool", "sgd_", SAME, dict(grad_scale=True), np.float64, TypeError, "grad_scale"),
    ("grad_scale-array", "momentum_", SAME, dict(grad_scale=np.ones(8)), np.float64, TypeError, "grad_scale"),
    ("beta-complex", "momentum_", SAME, dict(beta=0.5j), np.float64, TypeError, "beta"),
    ("step-negative", "sgd_", SAME, dict(step=-1), np.float64, ValueError, "step"),
    ("step-str", "sgd_", SAME, dict(step="2"), np.float64, TypeError, "step"),
    ("step-none", "sgd_", SAME, dict(step=None), np.float64, TypeError, "step"),
    ("step-bool", "sgd_", SAME, dict(step=True), np.float64, TypeError, "step"),
    ("n_threads-beyond-int", "momentum_", SAME, dict(n_threads=2**31), np.float64, ValueError, "n_threads"),
    ("n_threads-float", "sgd_", SAME, dict(n_threads=2.0), np.float64, TypeError, "n_threads"),
    ("n_threads-negative", "momentum_", SAME, dict(n_threads=-4), np.float64, ValueError, "n_threads"),
]
FUNCTIONAL_DEFAULTS = {"sgd_": dict(lr=0.1, momentum=0.9, step=2), "momentum_": dict(lr=0.1, beta=0.9)}
# grad_norm and count_nonfinite take one buffer
FUNCTIONAL_CASES += [
    ("norm-grad-int", "grad_norm", lambda b, t: [b[1].astype(np.int16)], {}, np.float64, TypeError, "grad"),
    ("norm-grad-2d", "grad_norm", lambda b, t: [b[1].reshape(2, 4)], {}, np.float64, ValueError, "grad must be 1-D"),
    ("norm-grad-strided", "grad_norm", lambda b, t: [b[1][::2]], {}, np.float32, ValueError, "grad must be C-contig"),
    ("norm-grad-list", "grad_norm", lambda b, t: [list(b[1])], {}, np.float64, TypeError, "grad"),
    ("norm-type-zero", "grad_norm", lambda b, t: [b[1]], dict(norm_type=0), np.float64, ValueError, "norm_type"),
    ("norm-type-str", "grad_norm", lambda b, t: [b[1]], dict(norm_type="fro"), np.float64, TypeError, "norm_type"),
    ("norm-grad_scale-nan", "grad_norm", lambda b, t: [b[1]], dict(grad_scale=float("nan")), np.float64,
     ValueError, "grad_scale"),
    ("norm-n_threads-zero", "grad_norm", lambda b, t: [b[1]], dict(n_threads=0), np.float64, ValueError, "n_threads"),
    ("nonfinite-x-bool", "count_nonfinite", lambda b, t: [b[1] > 0], {}, np.float64, TypeError, r"\bx\b"),
    ("nonfinite-x-2d", "count_nonfinite", lambda b, t: [b[1].reshape(4, 2)], {}, np.float32, ValueError, r"\bx\b"),
    ("nonfinite-x-none", "count_nonfinite", lambda b, t: [None], {}, np.float64, TypeError, r"\bx\b"),
    ("nonfinite-n_threads-str", "count_nonfinite", lambda b, t: [b[1]], dict(n_threads="2"), np.float64,
     TypeError, "n_threads"),
]
FUNCTIONAL_DEFAULTS.update(grad_norm={}, count_nonfinite={})


@pytest.mark.parametrize("cid, fn, transform, kwargs, dtype, exc, match", FUNCTIONAL_CASES,
                         ids=[c[0] for c in FUNCTIONAL_CASES])
def test_functional_rejects(cid, fn, transform, kwargs, dtype, exc, match, tmp_path):
    bufs = transform(_bufs(dtype), tmp_path)
    arrays = [b for b in bufs if isinstance(b, np.ndarray)]
    before = snapshot(*arrays)
    with pytest.raises(exc, match=match):
        getattr(F, fn)(*bufs, **{**FUNCTIONAL_DEFAULTS[fn], **kwargs})
    assert_unchanged(arrays, before)


# ---- thread functions --------------------------------------------------------------------

THREAD_CASES = [(2**31, ValueError), (-1, ValueError), (np.float64(2.0), TypeError),
                (np.int64(0), ValueError), ([2], TypeError)]


@pytest.mark.parametrize("bad, exc", THREAD_CASES, ids=["beyond-int", "negative", "np-float", "np-int-zero", "list"])
def test_thread_functions_reject_and_keep_the_setting(bad, exc):
    before = flatopt.get_num_threads()
    with pytest.raises(exc, match=r"\bn\b"):
        flatopt.set_num_threads(bad)
    assert flatopt.get_num_threads() == before
    with pytest.raises(exc, match=r"\bn\b"):
        with flatopt.num_threads(bad):
            pytest.fail("the block must not run")  # pragma: no cover
    assert flatopt.get_num_threads() == before


def distinct_bad_inputs():
    """Ids of every distinct bad input in this module (per-class rows counted once)."""
    ids = set()
    for cls in OPTIMIZERS:
        if cls.__name__ in VALID_KWARGS:
            for cases in (construction_cases, step_cases, edit_cases, load_cases, hygiene_cases):
                ids.update(f"{cases.__name__}:{c.id}" for c in cases(cls, VALID_KWARGS[cls.__name__]))
    ids.update(f"layout:{c.id}" for c in LAYOUT_CASES)
    ids.update(f"functional:{c[0]}" for c in FUNCTIONAL_CASES)
    ids.update(f"threads:{i}" for i in range(len(THREAD_CASES)))
    return ids


def test_at_least_60_distinct_bad_inputs():
    assert len(distinct_bad_inputs()) >= 60

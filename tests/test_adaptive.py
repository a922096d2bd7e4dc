"""Tests of the adaptive family (Adam, AdamW, AMSGrad, RMSprop, Adadelta, Adagrad).

Three layers of evidence:

1. each kernel equals its NumPy twin (``reference_adaptive``) bit for bit, over 100 steps,
   on awkward sizes, both dtypes, 1 and 2 threads, read-only memory-mapped gradients and
   ``grad_scale != 1``;
2. the optimizer classes agree with torch.optim (float64 to rtol 1e-12; float32 to a
   tolerance justified below) over every option that changes the formula;
3. one table of every optimizer (optax's style) over which shared checks run:
   convergence, bit-exact resume from a pickled state_dict, rejection of bad
   hyperparameters without touching any buffer, dtype preservation.
"""

import importlib
import itertools
import pickle

import numpy as np
import pytest

import flatopt
import reference_adaptive as ref
from flatopt import _dispatch
from flatopt import functional as F
from flatopt._kernels import PARALLEL_THRESHOLD

SIZES = [0, 1, 7, 4097, PARALLEL_THRESHOLD - 1, PARALLEL_THRESHOLD + 1, 2**17 + 3]
DTYPES = [np.float32, np.float64]


def assert_bits_equal(actual, expected, what=""):
    """Same dtype, shape and bytes (stricter than ==: tells -0.0 from 0.0)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.tobytes() != expected.tobytes():
        np.testing.assert_array_equal(actual, expected, err_msg=what)
        raise AssertionError(f"{what}: equal values but different bits (signed zeros or NaNs)")


# -- 1. kernels vs their NumPy twins -----------------------------------------------------------

def _adam_state(hp):
    return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hp.get("amsgrad") else [])


def _adam_fast(param, grad, st, step, hp, grad_scale, n_threads):
    F.adam_(param, grad, st["exp_avg"], st["exp_avg_sq"], max_exp_avg_sq=st.get("max_exp_avg_sq"),
            step=step, grad_scale=grad_scale, n_threads=n_threads, **hp)


def _adam_slow(param, grad, st, step, hp, grad_scale):
    ref.adam(param, grad, st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq"),
             step=step, grad_scale=grad_scale, **hp)


def _rmsprop_state(hp):
    return (["square_avg"] + (["grad_avg"] if hp.get("centered") else [])
            + (["momentum_buffer"] if hp.get("momentum", 0) > 0 else []))


def _rmsprop_fast(param, grad, st, step, hp, grad_scale, n_threads):
    F.rmsprop_(param, grad, st["square_avg"], st.get("grad_avg"), st.get("momentum_buffer"),
               grad_scale=grad_scale, n_threads=n_threads, **hp)


def _rmsprop_slow(param, grad, st, step, hp, grad_scale):
    ref.rmsprop(param, grad, st["square_avg"], st.get("grad_avg"), st.get("momentum_buffer"),
                grad_scale=grad_scale, **hp)


def _adadelta_fast(param, grad, st, step, hp, grad_scale, n_threads):
    F.adadelta_(param, grad, st["square_avg"], st["acc_delta"], grad_scale=grad_scale,
                n_threads=n_threads, **hp)


def _adadelta_slow(param, grad, st, step, hp, grad_scale):
    ref.adadelta(param, grad, st["square_avg"], st["acc_delta"], grad_scale=grad_scale, **hp)


def _adagrad_fast(param, grad, st, step, hp, grad_scale, n_threads):
    F.adagrad_(param, grad, st["state_sum"], step=step, grad_scale=grad_scale,
               n_threads=n_threads, **hp)


def _adagrad_slow(param, grad, st, step, hp, grad_scale):
    ref.adagrad(param, grad, st["state_sum"], step=step, grad_scale=grad_scale, **hp)


KERNELS = {
    "adam": (_adam_state, _adam_fast, _adam_slow),
    "rmsprop": (_rmsprop_state, _rmsprop_fast, _rmsprop_slow),
    "adadelta": (lambda hp: ["square_avg", "acc_delta"], _adadelta_fast, _adadelta_slow),
    "adagrad": (lambda hp: ["state_sum"], _adagrad_fast, _adagrad_slow),
}

# (id, kernel, hyperparameters, grad_scale, initial state value). Every branch of every
# kernel is covered: each option on and off, and both branches of lerp (weight < 0.5 with
# the default betas/alpha, >= 0.5 with beta1 = 0.3 / alpha = 0.3).
KERNEL_CASES = [
    ("adam", "adam", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8), 1.0, 0.0),
    ("adam-amsgrad-l2-maximize", "adam",
     dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
     0.37, 0.0),
    ("adamw-smallbeta", "adam",
     dict(lr=3e-2, beta1=0.3, beta2=0.9, eps=1e-8, weight_decay=0.5, decoupled=True), 2.5, 0.0),
    ("rmsprop", "rmsprop", dict(lr=1e-2, alpha=0.99, eps=1e-8), 1.0, 0.0),
    ("rmsprop-centered", "rmsprop", dict(lr=1e-2, alpha=0.3, eps=1e-8, centered=True), 0.37, 0.0),
    ("rmsprop-momentum-l2-maximize", "rmsprop",
     dict(lr=1e-2, alpha=0.9, eps=1e-6, momentum=0.9, weight_decay=0.1, maximize=True), 1.0, 0.0),
    ("rmsprop-centered-momentum", "rmsprop",
     dict(lr=1e-3, alpha=0.95, eps=1e-8, momentum=0.5, centered=True, weight_decay=0.01), 0.37, 0.0),
    ("adadelta", "adadelta", dict(lr=1.0, rho=0.9, eps=1e-6), 1.0, 0.0),
    ("adadelta-l2-maximize", "adadelta",
     dict(lr=0.5, rho=0.3, eps=1e-4, weight_decay=0.1, maximize=True), 0.37, 0.0),
    ("adagrad", "adagrad", dict(lr=1e-2, eps=1e-10), 1.0, 0.0),
    ("adagrad-decay-l2-maximize-init", "adagrad",
     dict(lr=0.1, eps=1e-10, lr_decay=0.01, weight_decay=0.1, maximize=True), 0.37, 0.1),
]


def _readonly_grads(tmp_path, n, dtype, rows=3, seed=0):
    """``rows`` gradients in a read-only np.memmap, with zeros and magnitudes 1e-3..1e3."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((rows, n)) * 10.0 ** rng.uniform(-3, 3, (rows, n))
    g[:, 3::5] = 0.0
    path = tmp_path / "grads.bin"
    mm = np.memmap(path, dtype=dtype, mode="w+", shape=(rows, n))
    mm[...] = g
    mm.flush()
    del mm
    grads = np.memmap(path, dtype=dtype, mode="r", shape=(rows, n))
    assert not grads.flags.writeable
    return [grads[k] for k in range(rows)]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_kernel_matches_twin(case, dtype, n, tmp_path):
    _, kernel, hp, grad_scale, init = case
    state_names, fast, slow = KERNELS[kernel]
    dtype = np.dtype(dtype)
    grads = _readonly_grads(tmp_path, n, dtype)
    p0 = np.random.default_rng(1).standard_normal(n).astype(dtype)

    def fresh():
        return p0.copy(), {name: np.full(n, init, dtype) for name in state_names(hp)}

    param_ref, state_ref = fresh()
    for step in range(1, 101):
        slow(param_ref, grads[step % 3], state_ref, step, hp, grad_scale)
    assert np.isfinite(param_ref).all()
    if n:
        assert not np.array_equal(param_ref, p0)  # the run did something

    for n_threads in (1, 2):
        param, state = fresh()
        for step in range(1, 101):
            fast(param, grads[step % 3], state, step, hp, grad_scale, n_threads)
        assert_bits_equal(param, param_ref, f"param, n_threads={n_threads}")
        for name in state:
            assert_bits_equal(state[name], state_ref[name], f"{name}, n_threads={n_threads}")


@pytest.mark.parametrize("level", _dispatch.supported_levels())
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_every_isa_build_matches_twin(case, dtype, level, tmp_path, monkeypatch):
    # The test above runs the kernels the dispatcher picked for this CPU; here every
    # build this CPU can run (baseline, avx2, avx512) meets the twin, 10 steps.
    _, kernel, hp, grad_scale, init = case
    state_names, fast, slow = KERNELS[kernel]
    monkeypatch.setattr(F, "kernels", importlib.import_module(_dispatch.MODULES[level]))
    n = PARALLEL_THRESHOLD + 17
    dtype = np.dtype(dtype)
    grads = _readonly_grads(tmp_path, n, dtype)
    p0 = np.random.default_rng(1).standard_normal(n).astype(dtype)
    results = []
    for run in (slow, fast):
        param, state = p0.copy(), {name: np.full(n, init, dtype) for name in state_names(hp)}
        for step in range(1, 11):
            if run is slow:
                slow(param, grads[step % 3], state, step, hp, grad_scale)
            else:
                fast(param, grads[step % 3], state, step, hp, grad_scale, 2)
        results.append([param] + list(state.values()))
    for got, want in zip(results[1], results[0]):
        assert_bits_equal(got, want, level)


# -- 2. classes vs torch.optim --------------------------------------------------------------

SHAPES = [(3, 4), (5,), (2, 3, 2)]


def _run_vs_torch(flat_cls, torch_cls, groups, defaults, *, dtype=np.float64, steps=200,
                  lr_change_at=None):
    """Run flatopt and torch side by side on the same gradients; return both results.

    ``groups`` is a list of (indices into SHAPES, hyperparameter overrides); ``defaults``
    go to both constructors. Gradients are random, independent of the parameters (so both
    see identical inputs), with exact zeros. At ``lr_change_at`` every group's lr is
    halved in both optimizers.
    """
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(42)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    ours = flat_cls([{"params": [init[i].copy() for i in idx], **hp} for idx, hp in groups],
                    **defaults, n_threads=1)
    tp = [torch.tensor(a.copy()) for a in init]
    theirs = torch_cls([{"params": [tp[i] for i in idx], **hp} for idx, hp in groups],
                       **defaults, foreach=False)
    if torch_cls.__name__ == "Adagrad":
        # torch initialises every sum from the constructor's initial_accumulator_value and
        # ignores a group's own value; flatopt honours the group's (documented). Give torch
        # the same starting sums so that the update formulas are what is compared.
        for group in theirs.param_groups:
            for t in group["params"]:
                theirs.state[t]["sum"].fill_(group["initial_accumulator_value"])
    order = [i for idx, _ in groups for i in idx]  # flatopt's packing order
    for step in range(steps):
        if step == lr_change_at:
            for g in ours.param_groups + theirs.param_groups:
                g["lr"] *= 0.5
        g = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        for a in g:
            a.ravel()[::7] = 0.0
        ours.step([g[i] for i in order])
        for i, t in enumerate(tp):
            t.grad = torch.tensor(g[i])
        theirs.step()
    ours_params = {i: p for i, p in zip(order, ours.params)}
    return ours, theirs, order, ours_params, tp


def _compare_with_torch(ours, theirs, order, ours_params, tp, rtol, atol=0.0):
    for i, t in enumerate(tp):
        np.testing.assert_allclose(ours_params[i], t.detach().numpy(), rtol=rtol, atol=atol,
                                   err_msg=f"param {i}")
    for name, flat in ours.state.items():
        if not isinstance(flat, np.ndarray):
            continue
        views = ours.layout.split(flat)
        for view, i in zip(views, order):
            st = theirs.state[tp[i]]
            if name in st:
                np.testing.assert_allclose(view, st[name].numpy(), rtol=rtol, atol=atol,
                                           err_msg=f"state {name!r} of param {i}")
            else:  # a buffer another group needs: this group's segment is never touched
                assert not view.any(), f"state {name!r} of param {i} was written"
    torch_names = {k for st in theirs.state.values() for k in st if k != "step"}
    assert torch_names == {k for k in ours.state if k != "step"}  # same state allocated


def _torch_cls(name):
    torch = pytest.importorskip("torch")
    return getattr(torch.optim, name)


ALL = [0, 1, 2]
# Every option combination that changes a formula.
TORCH_CASES = (
    [("Adam", dict(amsgrad=a, maximize=m, weight_decay=wd, decoupled_weight_decay=dec))
     for a, m, (wd, dec) in itertools.product([False, True], [False, True],
                                              [(0.0, False), (0.1, False), (0.1, True)])]
    + [("Adam", dict(lr=1e-2, betas=(0.3, 0.9), eps=1e-6))]  # lerp's large-weight branch
    + [("AdamW", dict(amsgrad=a)) for a in (False, True)]
    + [("AdamW", dict(lr=1e-2, weight_decay=0.5, maximize=True))]
    + [("RMSprop", dict(centered=c, momentum=mom, maximize=m, weight_decay=wd))
       for c, mom, m, wd in itertools.product([False, True], [0.0, 0.9], [False, True], [0.0, 0.1])]
    + [("RMSprop", dict(alpha=0.3, centered=True, lr=1e-3))]
    + [("Adadelta", dict(maximize=m, weight_decay=wd))
       for m, wd in itertools.product([False, True], [0.0, 0.1])]
    + [("Adadelta", dict(lr=0.5, rho=0.3, eps=1e-4))]
    + [("Adagrad", dict(lr_decay=d, initial_accumulator_value=iv, weight_decay=wd, maximize=m))
       for d, iv, wd, m in itertools.product([0.0, 0.01], [0.0, 0.1], [0.0, 0.1], [False, True])]
)


def _case_id(case):
    name, hp = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in hp.items())


@pytest.mark.parametrize("case", TORCH_CASES, ids=[_case_id(c) for c in TORCH_CASES])
def test_matches_torch_float64(case):
    name, hp = case
    result = _run_vs_torch(getattr(flatopt, name), _torch_cls(name), [(ALL, {})], hp)
    _compare_with_torch(*result, rtol=1e-12)


# Two groups with different hyperparameters, and the lr halved at step 100.
GROUP_CASES = [
    ("Adam", [([0, 2], dict(amsgrad=True, weight_decay=0.1)),
              ([1], dict(lr=2e-2, betas=(0.8, 0.99), maximize=True, eps=1e-6))]),
    ("AdamW", [([1], dict(weight_decay=0.0)), ([0, 2], dict(lr=5e-3, amsgrad=True))]),
    ("RMSprop", [([0], dict(centered=True, momentum=0.9)),
                 ([1, 2], dict(lr=1e-3, alpha=0.9, weight_decay=0.1))]),
    ("Adadelta", [([0, 1], dict(rho=0.95)), ([2], dict(lr=0.1, eps=1e-5, maximize=True))]),
    ("Adagrad", [([2], dict(initial_accumulator_value=0.5, lr_decay=0.05)),
                 ([0, 1], dict(lr=0.1, initial_accumulator_value=0.01))]),
]


@pytest.mark.parametrize("case", GROUP_CASES, ids=[c[0] for c in GROUP_CASES])
def test_matches_torch_param_groups_and_lr_schedule(case):
    name, groups = case
    result = _run_vs_torch(getattr(flatopt, name), _torch_cls(name), groups, {}, lr_change_at=100)
    _compare_with_torch(*result, rtol=1e-12)


FLOAT32_CASES = [
    ("Adam", dict(amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict()),
    ("RMSprop", dict(centered=True, momentum=0.9)),
    ("Adadelta", dict(weight_decay=0.1)),
    ("Adagrad", dict(lr_decay=0.01, initial_accumulator_value=0.1)),
]


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=[c[0] for c in FLOAT32_CASES])
def test_matches_torch_float32(case):
    # Both sides compute in float32 with the same operations in the same order; they differ
    # only where torch's vectorised CPU kernels contract to fused multiply-adds (lerp), by
    # about one float32 ulp (6e-8 relative) per operation per step, and the differences do
    # not grow beyond rounding noise because every one of these updates is contracting in
    # its state. Observed over 200 steps: at most 6e-7 absolute and 4e-6 relative (RMSprop,
    # centered with momentum 0.9, whose buffer sums ~1/(1-0.9) = 10 steps of rounding).
    # rtol=2e-5 with atol=2e-6 (for values near zero) leaves a margin of ~4x; a formula
    # error such as a bias correction off by one step moves results by > 1e-3. (Errors
    # below float32 resolution, such as eps inside the square root, are caught by the
    # float64 test at 1e-12.)
    name, hp = case
    result = _run_vs_torch(getattr(flatopt, name), _torch_cls(name), [(ALL, {})], hp,
                           dtype=np.float32)
    _compare_with_torch(*result, rtol=2e-5, atol=2e-6)


# -- 3. one table of every optimizer, shared checks -----------------------------------------

# (id, class, arguments, steps for the convergence checks). Learning rates are chosen per
# optimizer so that each converges within the step budget on both problems.
OPTIMIZERS = [
    ("SGD", flatopt.SGD, dict(lr=2e-3), 6000),
    ("SGD-nesterov", flatopt.SGD, dict(lr=1e-3, momentum=0.9, nesterov=True), 1500),
    ("Momentum", flatopt.Momentum, dict(lr=2e-3, beta=0.9), 7000),
    ("Adam", flatopt.Adam, dict(lr=3e-2), 3000),
    ("Adam-amsgrad-l2", flatopt.Adam, dict(lr=3e-2, amsgrad=True, weight_decay=1e-6), 4500),
    ("AdamW", flatopt.AdamW, dict(lr=3e-2, weight_decay=1e-6), 3000),
    ("RMSprop", flatopt.RMSprop, dict(lr=1e-3), 7000),
    ("RMSprop-centered-momentum", flatopt.RMSprop,
     dict(lr=1e-4, alpha=0.9, momentum=0.9, centered=True), 1500),
    ("Adadelta", flatopt.Adadelta, dict(lr=5e-2), 10000),
    ("Adagrad", flatopt.Adagrad, dict(lr=1.0, initial_accumulator_value=0.1), 9000),
    ("NAdam", flatopt.NAdam, dict(lr=3e-2), 3800),
    ("NAdamW", flatopt.NAdam, dict(lr=3e-2, weight_decay=1e-6, decoupled_weight_decay=True), 3800),
    ("RAdam", flatopt.RAdam, dict(lr=5e-3), 11000),
    ("RAdam-l2", flatopt.RAdam, dict(lr=5e-3, weight_decay=1e-6), 11000),
    ("Adamax", flatopt.Adamax, dict(lr=3e-2, weight_decay=1e-6), 5200),
    ("Lion", flatopt.Lion, dict(lr=1e-3, weight_decay=1e-4), 4500),
]
OPT_IDS = [o[0] for o in OPTIMIZERS]


class Quadratic:
    """f = sum(a * (x - b)**2) / 2 over two arrays; minimum at x = b."""

    def __init__(self):
        rng = np.random.default_rng(3)
        self.a = [rng.uniform(1, 10, s) for s in [(4, 3), (5,)]]
        self.b = [rng.uniform(-2, 2, s) for s in [(4, 3), (5,)]]

    def start(self):
        return [np.zeros_like(b) for b in self.b]

    def grad(self, xs, out):
        for a, b, x, g in zip(self.a, self.b, xs, out):
            np.multiply(a, x - b, out=g)

    def solved(self, xs):
        return all(np.allclose(x, b, atol=1e-2, rtol=0) for x, b in zip(xs, self.b))


class Rosenbrock:
    """Four independent 2-D Rosenbrock problems, f = (1-x)**2 + 100*(y-x**2)**2; minimum at 1."""

    def start(self):
        return [np.array([-1.2, 0.0, 0.5, 1.5]), np.array([1.0, 0.5, -0.5, 2.0])]

    def grad(self, xs, out):
        x, y = xs
        out[0][...] = -2 * (1 - x) - 400 * x * (y - x**2)
        out[1][...] = 200 * (y - x**2)

    def solved(self, xs):
        return all(np.allclose(x, 1.0, atol=5e-2, rtol=0) for x in xs)


def _train(opt, problem, steps):
    for _ in range(steps):
        problem.grad(opt.params, opt.grads)
        opt.step()


@pytest.mark.parametrize("problem", [Quadratic, Rosenbrock])
@pytest.mark.parametrize("entry", OPTIMIZERS, ids=OPT_IDS)
def test_converges(entry, problem):
    _, cls, kwargs, steps = entry
    problem = problem()
    opt = cls(problem.start(), **kwargs)
    assert not problem.solved(opt.params)
    _train(opt, problem, steps)
    assert problem.solved(opt.params), [p.round(3) for p in opt.params]


def _snapshot(opt):
    """Copies of every buffer and the step count, to prove nothing changed."""
    return ([opt.flat_params.copy(), opt.flat_grads.copy()],
            {k: (v.copy() if isinstance(v, np.ndarray) else pickle.loads(pickle.dumps(v)))
             for k, v in opt.state.items()})


def _assert_same_snapshot(a, b):
    (bufs_a, state_a), (bufs_b, state_b) = a, b
    for x, y in zip(bufs_a, bufs_b):
        assert_bits_equal(x, y)
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        if isinstance(state_a[k], np.ndarray):
            assert_bits_equal(state_a[k], state_b[k], k)
        else:
            assert state_a[k] == state_b[k], k


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("entry", OPTIMIZERS, ids=OPT_IDS)
def test_state_dict_resume_is_bit_exact(entry, dtype):
    _, cls, kwargs, _ = entry
    problem = Quadratic()
    start = [x.astype(dtype) for x in problem.start()]
    groups = [{"params": [start[0]]}, {"params": [start[1]], "lr": kwargs["lr"] / 2}]

    straight = cls([{**g, "params": [a.copy() for a in g["params"]]} for g in groups], **kwargs)
    _train(straight, problem, 50)

    first = cls([{**g, "params": [a.copy() for a in g["params"]]} for g in groups], **kwargs)
    _train(first, problem, 20)
    blob = pickle.dumps((first.state_dict(), [p.copy() for p in first.params]))
    del first
    state, params = pickle.loads(blob)
    resumed = cls([{"params": [params[0]]}, {"params": [params[1]]}], **kwargs)
    resumed.load_state_dict(state)
    assert resumed.param_groups[1]["lr"] == kwargs["lr"] / 2  # hyperparameters restored
    _train(resumed, problem, 30)

    assert resumed.state["step"] == straight.state["step"] == 50
    for a, b in zip(resumed.params, straight.params):
        assert_bits_equal(a, b)
    for k, v in straight.state.items():
        if isinstance(v, np.ndarray):
            assert_bits_equal(resumed.state[k], v, k)


# Invalid values per hyperparameter name; each optimizer is checked on the names it has.
NAN, INF = float("nan"), float("inf")
BAD_VALUES = {
    "lr": [-1e-3, NAN, INF, "0.1", None],
    "betas": [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.999), (0.9, NAN), (0.9,), 0.9],
    "eps": [0.0, -1e-8, INF],
    "weight_decay": [-1e-2, NAN],
    "momentum": [-0.5, INF],
    "dampening": [NAN],
    "beta": [1.0, -0.1],
    "alpha": [-0.1, 1.1],
    "rho": [-0.1, 1.1, NAN],
    "lr_decay": [-0.1, INF],
    "initial_accumulator_value": [-0.1],
    "amsgrad": [1, "yes"],
    "maximize": [1, None],
    "centered": [0],
    "nesterov": ["no"],
    "decoupled_weight_decay": [1],
    "momentum_decay": [-1e-3, NAN],
}
BAD_CASES = [(entry, name, bad) for entry in OPTIMIZERS
             for name in entry[1]._hyperparameters for bad in BAD_VALUES[name]]


def _check_message(exc, name, bad):
    message = str(exc.value)
    assert name in message, message
    if isinstance(bad, float):
        assert str(bad) in message, message


@pytest.mark.parametrize("entry,name,bad", BAD_CASES,
                         ids=[f"{e[0]}-{n}={b!r}" for e, n, b in BAD_CASES])
def test_bad_hyperparameter_rejected_without_writes(entry, name, bad):
    _, cls, kwargs, _ = entry
    problem = Quadratic()
    if name != "decoupled_weight_decay" or cls is not flatopt.AdamW:  # AdamW fixes it
        with pytest.raises((TypeError, ValueError)) as exc:
            cls(problem.start(), **{**kwargs, name: bad})
        _check_message(exc, name, bad)

    opt = cls([{"params": [x]} for x in problem.start()], **kwargs)
    _train(opt, problem, 3)
    problem.grad(opt.params, opt.grads)
    before = _snapshot(opt)
    good = opt.param_groups[1][name]
    opt.param_groups[1][name] = bad
    with pytest.raises((TypeError, ValueError)) as exc:
        opt.step()
    _check_message(exc, name, bad)
    assert "param_groups[1]" in str(exc.value)
    _assert_same_snapshot(_snapshot(opt), before)  # group 0 was not updated either
    opt.param_groups[1][name] = good
    opt.step()
    assert opt.state["step"] == 4


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("entry", OPTIMIZERS, ids=OPT_IDS)
def test_dtype_preserved(entry, dtype):
    _, cls, kwargs, _ = entry
    problem = Quadratic()
    for given, convert in [(dtype, None), (np.float64 if dtype == np.float32 else np.float32, dtype)]:
        opt = cls([x.astype(given) for x in problem.start()], **kwargs, dtype=convert)
        _train(opt, problem, 5)
        arrays = (opt.params + opt.grads + [opt.flat_params, opt.flat_grads]
                  + [v for v in opt.state.values() if isinstance(v, np.ndarray)])
        assert {a.dtype for a in arrays} == {np.dtype(dtype)}
        assert all(np.isfinite(p).all() for p in opt.params)
        assert not all(np.array_equal(p, 0) for p in opt.params)


# -- state allocation, per-group values, functional validation --------------------------------

@pytest.mark.parametrize("cls,kwargs,expected", [
    (flatopt.Adam, {}, {"exp_avg", "exp_avg_sq"}),
    (flatopt.Adam, dict(amsgrad=True), {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    (flatopt.AdamW, {}, {"exp_avg", "exp_avg_sq"}),
    (flatopt.RMSprop, {}, {"square_avg"}),
    (flatopt.RMSprop, dict(centered=True), {"square_avg", "grad_avg"}),
    (flatopt.RMSprop, dict(momentum=0.5), {"square_avg", "momentum_buffer"}),
    (flatopt.Adadelta, {}, {"square_avg", "acc_delta"}),
    (flatopt.Adagrad, {}, {"sum"}),
])
def test_only_needed_state_is_allocated(cls, kwargs, expected):
    opt = cls([np.ones(3), np.ones(4)], **kwargs)
    opt.step()
    assert set(opt.state) - {"step"} == expected


def test_option_turned_on_mid_run_allocates_zeroed_state():
    opt = flatopt.Adam([np.ones(5)], lr=0.1)
    opt.grads[0][:] = 1.0
    opt.step()
    assert "max_exp_avg_sq" not in opt.state
    opt.param_groups[0]["amsgrad"] = True
    opt.step()
    # starting from zeros, max(0, v) = v: the running maximum is exactly exp_avg_sq
    assert opt.state["max_exp_avg_sq"].any()
    assert_bits_equal(opt.state["max_exp_avg_sq"], opt.state["exp_avg_sq"])


def test_adagrad_sum_starts_at_each_groups_initial_value():
    opt = flatopt.Adagrad([{"params": [np.ones(3)], "initial_accumulator_value": 0.5},
                           {"params": [np.ones(2), np.ones(4)]}],
                          initial_accumulator_value=0.25)
    np.testing.assert_array_equal(opt.state["sum"], [0.5] * 3 + [0.25] * 6)
    # torch reads it once: a later change of the group's value does not reset the sums
    opt.param_groups[1]["initial_accumulator_value"] = 2.0
    opt.step()
    np.testing.assert_array_equal(opt.state["sum"], [0.5] * 3 + [0.25] * 6)


def _adam_buffers(n=8, dtype=np.float64):
    rng = np.random.default_rng(0)
    return dict(param=rng.standard_normal(n).astype(dtype), grad=rng.standard_normal(n).astype(dtype),
                exp_avg=np.zeros(n, dtype), exp_avg_sq=np.zeros(n, dtype))


ADAM_HP = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


@pytest.mark.parametrize("change,error", [
    (dict(amsgrad=True), "max_exp_avg_sq is required"),
    (dict(step=0), "step"),
    (dict(beta2=1.0), "beta"),
    (dict(eps=0.0), "eps"),
    (dict(grad_scale=NAN), "grad_scale"),
    (dict(n_threads=0), "n_threads"),
    ("overlap", "share memory"),
    ("readonly-param", "writable"),
    ("float32-state", "dtype"),
    ("short-state", "length"),
])
def test_functional_adam_rejects_bad_input_without_writes(change, error):
    bufs = _adam_buffers()
    hp = dict(ADAM_HP)
    if change == "overlap":
        bufs["exp_avg_sq"] = bufs["exp_avg"]
    elif change == "readonly-param":
        bufs["param"].flags.writeable = False
    elif change == "float32-state":
        bufs["exp_avg"] = bufs["exp_avg"].astype(np.float32)
    elif change == "short-state":
        bufs["exp_avg"] = bufs["exp_avg"][:-1]
    else:
        hp.update(change)
    before = {k: v.copy() for k, v in bufs.items()}
    with pytest.raises((TypeError, ValueError), match=error):
        F.adam_(bufs["param"], bufs["grad"], bufs["exp_avg"], bufs["exp_avg_sq"], **hp)
    for k, v in bufs.items():
        assert_bits_equal(v, before[k], k)


def test_functional_rmsprop_requires_option_buffers():
    p, g, s = np.ones(4), np.ones(4), np.zeros(4)
    with pytest.raises(ValueError, match="grad_avg is required"):
        F.rmsprop_(p, g, s, lr=0.1, alpha=0.9, eps=1e-8, centered=True)
    with pytest.raises(ValueError, match="momentum_buffer is required"):
        F.rmsprop_(p, g, s, lr=0.1, alpha=0.9, eps=1e-8, momentum=0.9)
    assert_bits_equal(p, np.ones(4))
    assert_bits_equal(s, np.zeros(4))


@pytest.mark.parametrize("call", [
    lambda p, g, s: F.adadelta_(p, g, s, np.zeros(4), lr=1.0, rho=1.5, eps=1e-6),
    lambda p, g, s: F.adagrad_(p, g, s, step=1, lr=0.1, eps=1e-10, lr_decay=-1.0),
    lambda p, g, s: F.adagrad_(p, g, s, step=True, lr=0.1, eps=1e-10),
    lambda p, g, s: F.rmsprop_(p, g, s, lr=0.1, alpha=-0.5, eps=1e-8),
])
def test_functional_rejects_bad_hyperparameters(call):
    p, g, s = np.ones(4), np.ones(4), np.zeros(4)
    with pytest.raises((TypeError, ValueError)):
        call(p, g, s)
    assert_bits_equal(p, np.ones(4))
    assert_bits_equal(s, np.zeros(4))

"""Tests of NAdam, RAdam, Adamax (torch.optim's) and Lion.

1. each kernel equals its NumPy twin (``reference_variants``) bit for bit: awkward sizes,
   around the parallel threshold, both dtypes, 1 and 2 threads, 100 steps, read-only
   memory-mapped gradients, ``grad_scale != 1``, every branch;
2. the NumPy classes agree with torch.optim over 200 steps (float64 to rtol 1e-12, every
   option; float32 to rounding), with parameter groups and an lr change; Lion agrees with
   an independent float64 reference written from the paper;
3. the flatopt.torch drop-ins train like torch.optim and exchange state dicts with it;
4. the functional forms validate before writing.

The shared checks (convergence, bit-exact resume, bad hyperparameters) run over these
optimizers in ``test_adaptive.py``'s table.
"""

import importlib
import itertools

import numpy as np
import pytest

import flatopt
import reference_variants as ref
from flatopt import _dispatch
from flatopt import functional as F
from flatopt._kernels import PARALLEL_THRESHOLD
from test_adaptive import (SHAPES, _compare_with_torch, _readonly_grads, _run_vs_torch,
                           _torch_cls, assert_bits_equal)

SIZES = [0, 1, 7, 4097, PARALLEL_THRESHOLD - 1, PARALLEL_THRESHOLD, PARALLEL_THRESHOLD + 1,
         2**17 + 3]
DTYPES = [np.float32, np.float64]


# -- 1. kernels vs twins ----------------------------------------------------------------------

def _nadam_fast(param, grad, st, step, hp, grad_scale, n_threads):
    st["mu_product"] = F.nadam_(param, grad, st["exp_avg"], st["exp_avg_sq"], step=step,
                                mu_product=st["mu_product"], grad_scale=grad_scale,
                                n_threads=n_threads, **hp)


def _nadam_slow(param, grad, st, step, hp, grad_scale):
    st["mu_product"] = ref.nadam(param, grad, st["exp_avg"], st["exp_avg_sq"], step=step,
                                 mu_product=st["mu_product"], grad_scale=grad_scale, **hp)


def _radam_fast(param, grad, st, step, hp, grad_scale, n_threads):
    st.setdefault("rectified", []).append(
        F.radam_(param, grad, st["exp_avg"], st["exp_avg_sq"], step=step, grad_scale=grad_scale,
                 n_threads=n_threads, **hp))


def _radam_slow(param, grad, st, step, hp, grad_scale):
    st.setdefault("rectified", []).append(
        ref.radam(param, grad, st["exp_avg"], st["exp_avg_sq"], step=step, grad_scale=grad_scale,
                  **hp))


def _adamax_fast(param, grad, st, step, hp, grad_scale, n_threads):
    F.adamax_(param, grad, st["exp_avg"], st["exp_inf"], step=step, grad_scale=grad_scale,
              n_threads=n_threads, **hp)


def _adamax_slow(param, grad, st, step, hp, grad_scale):
    ref.adamax(param, grad, st["exp_avg"], st["exp_inf"], step=step, grad_scale=grad_scale, **hp)


def _lion_fast(param, grad, st, step, hp, grad_scale, n_threads):
    F.lion_(param, grad, st["exp_avg"], grad_scale=grad_scale, n_threads=n_threads, **hp)


def _lion_slow(param, grad, st, step, hp, grad_scale):
    ref.lion(param, grad, st["exp_avg"], grad_scale=grad_scale, **hp)


KERNELS = {
    "nadam": (("exp_avg", "exp_avg_sq"), {"mu_product": 1.0}, _nadam_fast, _nadam_slow),
    "radam": (("exp_avg", "exp_avg_sq"), {}, _radam_fast, _radam_slow),
    "adamax": (("exp_avg", "exp_inf"), {}, _adamax_fast, _adamax_slow),
    "lion": (("exp_avg",), {}, _lion_fast, _lion_slow),
}

# (id, kernel, hyperparameters, grad_scale). Every branch: each option on and off, both
# branches of lerp (beta1 = 0.3 takes the large-weight one), RAdam's unrectified first
# steps and rectified later ones, NAdam's mu_product in either precision.
KERNEL_CASES = [
    ("nadam", "nadam", dict(lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8), 1.0),
    ("nadam-l2-maximize-smallbeta", "nadam",
     dict(lr=1e-2, beta1=0.3, beta2=0.99, eps=1e-6, weight_decay=0.1, momentum_decay=0.01,
          maximize=True), 0.37),
    ("nadamw-mu32", "nadam",
     dict(lr=1e-2, beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0.5, decoupled=True,
          mu_product_float32=True), 2.5),
    ("nadam-mu64", "nadam",
     dict(lr=1e-2, beta1=0.8, beta2=0.999, eps=1e-8, mu_product_float32=False), 1.0),
    ("radam", "radam", dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8), 1.0),
    ("radam-l2-maximize", "radam",
     dict(lr=1e-2, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.1, maximize=True), 0.37),
    ("radamw-smallbeta", "radam",
     dict(lr=3e-2, beta1=0.3, beta2=0.99, eps=1e-8, weight_decay=0.5, decoupled=True), 2.5),
    ("adamax", "adamax", dict(lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8), 1.0),
    ("adamax-l2-maximize-smallbeta", "adamax",
     dict(lr=1e-2, beta1=0.3, beta2=0.9, eps=1e-4, weight_decay=0.1, maximize=True), 0.37),
    ("lion", "lion", dict(lr=1e-4, beta1=0.9, beta2=0.99), 1.0),
    ("lion-wd-maximize", "lion",
     dict(lr=3e-3, beta1=0.5, beta2=0.9, weight_decay=0.3, maximize=True), 0.37),
]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_kernel_matches_twin(case, dtype, n, tmp_path):
    _, kernel, hp, grad_scale = case
    names, scalars, fast, slow = KERNELS[kernel]
    dtype = np.dtype(dtype)
    grads = _readonly_grads(tmp_path, n, dtype)
    p0 = np.random.default_rng(1).standard_normal(n).astype(dtype)

    def fresh():
        return p0.copy(), {**{name: np.zeros(n, dtype) for name in names}, **scalars}

    param_ref, state_ref = fresh()
    for step in range(1, 101):
        slow(param_ref, grads[step % 3], state_ref, step, hp, grad_scale)
    assert np.isfinite(param_ref).all()
    if n:
        assert not np.array_equal(param_ref, p0)  # the run did something
    if kernel == "radam":  # both of RAdam's branches were taken
        assert not state_ref["rectified"][0] and state_ref["rectified"][-1]

    for n_threads in (1, 2):
        param, state = fresh()
        for step in range(1, 101):
            fast(param, grads[step % 3], state, step, hp, grad_scale, n_threads)
        assert_bits_equal(param, param_ref, f"param, n_threads={n_threads}")
        for name in names:
            assert_bits_equal(state[name], state_ref[name], f"{name}, n_threads={n_threads}")
        for name in scalars:
            assert state[name] == state_ref[name], name
        if kernel == "radam":
            assert state["rectified"] == state_ref["rectified"]


@pytest.mark.parametrize("level", _dispatch.supported_levels())
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_every_isa_build_matches_twin(case, dtype, level, tmp_path, monkeypatch):
    # Every kernel build this CPU can run (baseline, avx2, avx512) meets the twin, 10 steps.
    _, kernel, hp, grad_scale = case
    names, scalars, fast, slow = KERNELS[kernel]
    monkeypatch.setattr(F, "kernels", importlib.import_module(_dispatch.MODULES[level]))
    n = PARALLEL_THRESHOLD + 17
    dtype = np.dtype(dtype)
    grads = _readonly_grads(tmp_path, n, dtype)
    p0 = np.random.default_rng(1).standard_normal(n).astype(dtype)
    results = []
    for run in (slow, fast):
        param, state = p0.copy(), {**{name: np.zeros(n, dtype) for name in names}, **scalars}
        for step in range(1, 11):
            if run is slow:
                slow(param, grads[step % 3], state, step, hp, grad_scale)
            else:
                fast(param, grads[step % 3], state, step, hp, grad_scale, 2)
        results.append([param] + [state[name] for name in names])
    for got, want in zip(results[1], results[0]):
        assert_bits_equal(got, want, level)


@pytest.mark.parametrize("kernel", ["adamax", "lion"])
def test_nan_propagates_like_the_twin(kernel):
    # A NaN gradient must poison its own element (as torch.maximum / torch.sign do), not be
    # dropped by a max() or sign() that compares false.
    names, scalars, fast, slow = KERNELS[kernel]
    hp = dict(KERNEL_CASES[[c[1] for c in KERNEL_CASES].index(kernel)][2])
    g = np.array([1.0, np.nan, -2.0, 0.0, np.inf])
    results = []
    for run in ("slow", "fast"):
        p, st = np.ones(5), {name: np.zeros(5) for name in names}
        if run == "slow":
            with np.errstate(invalid="ignore"):
                slow(p, g, st, 1, hp, 1.0)
        else:
            fast(p, g, st, 1, hp, 1.0, 1)
        results.append((p, st))
    assert np.isnan(results[1][0][1])
    assert_bits_equal(results[1][0], results[0][0])
    for name in names:
        assert_bits_equal(results[1][1][name], results[0][1][name])


# -- 2. classes vs torch.optim -------------------------------------------------------------------

@pytest.fixture
def torch_float64_default():
    """torch's default dtype float64, so that NAdam's scalar mu_product is a double in
    torch as it is in flatopt for float64 parameters (see flatopt.NAdam)."""
    torch = pytest.importorskip("torch")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


TORCH_CASES = (
    [("NAdam", dict(weight_decay=wd, decoupled_weight_decay=dec, maximize=m))
     for (wd, dec), m in itertools.product([(0.0, False), (0.1, False), (0.1, True)], [False, True])]
    + [("NAdam", dict(lr=1e-2, betas=(0.3, 0.9), eps=1e-6, momentum_decay=0.05))]
    + [("RAdam", dict(weight_decay=wd, decoupled_weight_decay=dec, maximize=m))
       for (wd, dec), m in itertools.product([(0.0, False), (0.1, False), (0.1, True)], [False, True])]
    + [("RAdam", dict(lr=1e-2, betas=(0.3, 0.9), eps=1e-6))]  # lerp's other branch; rho_inf 19
    + [("RAdam", dict(betas=(0.9, 0.5)))]  # rho_inf = 3: never rectified
    + [("Adamax", dict(weight_decay=wd, maximize=m))
       for wd, m in itertools.product([0.0, 0.1], [False, True])]
    + [("Adamax", dict(lr=1e-2, betas=(0.3, 0.9), eps=1e-3))]
)


def _case_id(case):
    name, hp = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in hp.items())


def _compare_mu_product(ours, theirs, order, tp, rtol):
    if "mu_product" not in ours.state:
        return
    for t in tp:
        np.testing.assert_allclose(theirs.state[t]["mu_product"].item(), ours.state["mu_product"][0],
                                   rtol=rtol)


@pytest.mark.parametrize("case", TORCH_CASES, ids=[_case_id(c) for c in TORCH_CASES])
def test_matches_torch_float64(case, torch_float64_default):
    name, hp = case
    ours, theirs, order, ours_params, tp = _run_vs_torch(
        getattr(flatopt, name), _torch_cls(name), [([0, 1, 2], {})], hp)
    _compare_with_torch(ours, theirs, order, ours_params, tp, rtol=1e-12)
    _compare_mu_product(ours, theirs, order, tp, rtol=1e-15)


GROUP_CASES = [
    ("NAdam", [([0, 2], dict(weight_decay=0.1, decoupled_weight_decay=True)),
               ([1], dict(lr=1e-2, betas=(0.8, 0.99), maximize=True, eps=1e-6))]),
    ("RAdam", [([1], dict(weight_decay=0.1)), ([0, 2], dict(lr=5e-3, betas=(0.9, 0.9)))]),
    ("Adamax", [([0], dict(betas=(0.5, 0.9))), ([1, 2], dict(lr=1e-3, weight_decay=0.1))]),
]


@pytest.mark.parametrize("case", GROUP_CASES, ids=[c[0] for c in GROUP_CASES])
def test_matches_torch_param_groups_and_lr_schedule(case, torch_float64_default):
    name, groups = case
    result = _run_vs_torch(getattr(flatopt, name), _torch_cls(name), groups, {}, lr_change_at=100)
    _compare_with_torch(*result, rtol=1e-12)


@pytest.mark.parametrize("case", [("NAdam", dict(weight_decay=0.1)),
                                  ("NAdam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
                                  ("RAdam", dict(weight_decay=0.1)),
                                  ("Adamax", dict(weight_decay=0.1))], ids=_case_id)
def test_matches_torch_float32(case):
    # As test_adaptive.test_matches_torch_float32: the same float32 operations in the same
    # order (NAdam's mu_product in float32, as torch's default dtype keeps it), apart from
    # the fused multiply-adds torch's vectorised lerp may use; rounding noise only.
    name, hp = case
    ours, theirs, order, ours_params, tp = _run_vs_torch(
        getattr(flatopt, name), _torch_cls(name), [([0, 1, 2], {})], hp, dtype=np.float32)
    _compare_with_torch(ours, theirs, order, ours_params, tp, rtol=2e-5, atol=2e-6)
    _compare_mu_product(ours, theirs, order, tp, rtol=0)  # both float32, the same products


def test_nadam_mu_product_follows_the_parameters_dtype():
    # float64 parameters with torch's default float32: torch rounds mu_product to float32,
    # flatopt keeps a double; documented, and visible here (the product differs).
    opts = [flatopt.NAdam([np.ones(3, dt)]) for dt in (np.float32, np.float64)]
    for opt in opts:
        for _ in range(3):
            opt.grads[0][:] = 1.0
            opt.step()
    mu32, mu64 = (opt.state["mu_product"][0] for opt in opts)
    assert mu32 == float(np.float32(mu32)) and mu64 != float(np.float32(mu64))
    assert mu32 == pytest.approx(mu64, rel=1e-6)


def _lion_paper(params, grads, lr, beta1, beta2, weight_decay, maximize):
    """Lion from the paper's Algorithm 2 (and optax's ``scale_by_lion`` +
    ``add_decayed_weights``), written independently of the kernel, in Python floats:
    ``update = sign(beta1*m + (1-beta1)*g) + wd*p; p -= lr*update; m = beta2*m + (1-beta2)*g``."""
    m = [0.0] * len(params)
    p = [float(x) for x in params]
    for g_step in grads:
        for i, g in enumerate(g_step.tolist()):
            g = -g if maximize else g
            c = beta1 * m[i] + (1 - beta1) * g
            update = (c > 0) - (c < 0) + weight_decay * p[i]
            p[i] = p[i] - lr * update
            m[i] = beta2 * m[i] + (1 - beta2) * g
    return np.array(p), np.array(m)


@pytest.mark.parametrize("hp", [dict(), dict(lr=3e-3, weight_decay=0.5),
                                dict(lr=1e-3, betas=(0.5, 0.9), weight_decay=0.1, maximize=True)],
                         ids=["defaults", "wd", "betas-wd-maximize"])
def test_lion_matches_the_paper(hp):
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(37)
    grads = rng.standard_normal((200, 37))
    grads[:, ::5] = 0.0
    opt = flatopt.Lion([{"params": [p0[:20].copy()]}, {"params": [p0[20:].copy()]}], **hp)
    for g in grads:
        opt.step(g)
    full = {**dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False), **hp}
    beta1, beta2 = full.pop("betas")
    p, m = _lion_paper(p0, grads, beta1=beta1, beta2=beta2, **full)
    np.testing.assert_allclose(opt.flat_params, p, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(opt.state["exp_avg"], m, rtol=1e-12, atol=1e-15)
    # Every step moves each parameter by lr (plus decay): sign, not magnitude.
    assert not np.allclose(opt.flat_params, p0)


# -- 3. flatopt.torch drop-ins --------------------------------------------------------------------

DROP_IN_CASES = [
    ("NAdam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("NAdam", dict(momentum_decay=0.01, maximize=True)),
    ("RAdam", dict(lr=1e-2, weight_decay=0.1)),
    ("RAdam", dict(decoupled_weight_decay=True, weight_decay=0.1)),
    ("Adamax", dict(weight_decay=0.1, maximize=True)),
]


def _model(torch, dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2)).to(dtype)


def _train_torch(torch, model, opt, steps, seed=1, skip_bias_every=None):
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(16, 5, generator=gen, dtype=next(model.parameters()).dtype)
        opt.zero_grad()
        loss = (model(x) ** 2).mean()
        loss.backward()
        if skip_bias_every and step % skip_bias_every == 0:
            model[2].bias.grad = None  # torch skips it: its step count falls behind
        opt.step()


@pytest.mark.parametrize("default_dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", DROP_IN_CASES, ids=_case_id)
def test_drop_in_trains_like_torch(case, default_dtype):
    torch = pytest.importorskip("torch")
    import flatopt.torch as ft
    name, hp = case
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, default_dtype))
    try:
        models = [_model(torch, torch.float64) for _ in range(2)]
        ours = getattr(ft, name)(models[0].parameters(), **hp)
        theirs = getattr(torch.optim, name)(models[1].parameters(), foreach=False, **hp)
        for model, opt in zip(models, (ours, theirs)):
            _train_torch(torch, model, opt, 200, skip_bias_every=7)
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-12, atol=1e-15)
        ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
        assert ([{**g, "foreach": None} for g in ours_sd["param_groups"]]
                == [{**g, "foreach": None} for g in theirs_sd["param_groups"]])
        for pid, entry in theirs_sd["state"].items():
            assert set(ours_sd["state"][pid]) == set(entry)
            for key, value in entry.items():
                assert ours_sd["state"][pid][key].dtype == value.dtype, key
                np.testing.assert_allclose(ours_sd["state"][pid][key].numpy(), value.numpy(),
                                           rtol=1e-12, atol=1e-15, err_msg=key)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("name", ["NAdam", "RAdam", "Adamax"])
def test_drop_in_state_dict_interchanges_with_torch(name):
    # torch.optim for 20 steps, flatopt.torch for 20 (loading torch's state dict), torch
    # again for 20 (loading flatopt's): the same as 60 steps of torch.optim. Each chunk
    # replays the same 20 batches, and one parameter's grad is None every 5th step, so
    # step counts (and NAdam's mu_product) differ between parameters.
    torch = pytest.importorskip("torch")
    import flatopt.torch as ft
    hp = dict(lr=1e-2, weight_decay=0.1)
    ref_model = _model(torch, torch.float32)
    ref_opt = getattr(torch.optim, name)(ref_model.parameters(), foreach=False, **hp)
    for _ in range(3):
        _train_torch(torch, ref_model, ref_opt, 20, skip_bias_every=5)

    model = _model(torch, torch.float32)
    opt = getattr(torch.optim, name)(model.parameters(), foreach=False, **hp)
    _train_torch(torch, model, opt, 20, skip_bias_every=5)
    for cls in (getattr(ft, name), getattr(torch.optim, name)):
        state = opt.state_dict()
        opt = cls(model.parameters(), **hp)
        opt.load_state_dict(state)
        _train_torch(torch, model, opt, 20, skip_bias_every=5)

    for a, b in zip(model.parameters(), ref_model.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=2e-5, atol=2e-6)
    got, want = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    counts = {k: v["step"].item() for k, v in got.items()}
    assert counts == {k: v["step"].item() for k, v in want.items()}
    assert len(set(counts.values())) == 2
    if name == "NAdam":
        assert {k: v["mu_product"].item() for k, v in got.items()} == {
            k: v["mu_product"].item() for k, v in want.items()}


def test_drop_in_lion_matches_numpy_lion():
    torch = pytest.importorskip("torch")
    import flatopt.torch as ft
    model = _model(torch, torch.float64)
    init = [p.detach().numpy().copy() for p in model.parameters()]
    opt = ft.Lion(model.parameters(), lr=1e-3, weight_decay=0.1)
    numpy_opt = flatopt.Lion([a.copy() for a in init], lr=1e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        x = torch.randn(16, 5, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        (model(x) ** 2).mean().backward()
        numpy_opt.step([p.grad.numpy().copy() for p in model.parameters()])
        opt.step()
    for p, q in zip(model.parameters(), numpy_opt.params):
        assert_bits_equal(p.detach().numpy(), q)
    assert set(opt.state_dict()["state"][0]) == {"exp_avg"}


# -- 4. functional validation ------------------------------------------------------------------

def _bufs(n=8, dtype=np.float64, k=2):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)] + [
        np.zeros(n, dtype) for _ in range(k)]


CALLS = {
    "nadam_": (2, lambda b, **kw: F.nadam_(*b, **{**dict(step=1, mu_product=1.0, lr=1e-3, beta1=0.9,
                                                          beta2=0.999, eps=1e-8), **kw})),
    "radam_": (2, lambda b, **kw: F.radam_(*b, **{**dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999,
                                                          eps=1e-8), **kw})),
    "adamax_": (2, lambda b, **kw: F.adamax_(*b, **{**dict(step=1, lr=1e-3, beta1=0.9,
                                                            beta2=0.999, eps=1e-8), **kw})),
    "lion_": (1, lambda b, **kw: F.lion_(*b, **{**dict(lr=1e-4), **kw})),
}
BAD = [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(beta1=1.0), "beta1"),
    (dict(beta2=-0.1), "beta2"), (dict(weight_decay=-1.0), "weight_decay"),
    (dict(maximize=1), "maximize"), (dict(grad_scale=float("inf")), "grad_scale"),
    (dict(n_threads=0), "n_threads"), ("overflow", "overflows"),
    ("overlap", "share memory"), ("readonly-param", "writable"), ("float32-state", "dtype"),
    ("short-state", "length"),
]
EXTRA_BAD = {
    "nadam_": [(dict(eps=0.0), "eps"), (dict(step=0), "step"), (dict(mu_product=1.5), "mu_product"),
               (dict(momentum_decay=-1.0), "momentum_decay"), (dict(decoupled=1), "decoupled")],
    "radam_": [(dict(eps=0.0), "eps"), (dict(step=True), "step"), (dict(decoupled="no"), "decoupled")],
    "adamax_": [(dict(eps=-1.0), "eps"), (dict(step=1.5), "step")],
    "lion_": [],
}
FUNC_CASES = [(name, change, error) for name in CALLS for change, error in BAD + EXTRA_BAD[name]]


@pytest.mark.parametrize("name,change,error", FUNC_CASES,
                         ids=[f"{n}-{c if isinstance(c, str) else list(c.items())[0]}"
                              for n, c, _ in FUNC_CASES])
def test_functional_rejects_bad_input_without_writes(name, change, error):
    k, call = CALLS[name]
    bufs = _bufs(k=k)
    kw = {}
    if change == "overlap":
        bufs[-1] = bufs[2] if k == 2 else bufs[0]
    elif change == "readonly-param":
        bufs[0].flags.writeable = False
    elif change == "float32-state":
        bufs[2] = bufs[2].astype(np.float32)
    elif change == "short-state":
        bufs[2] = bufs[2][:-1]
    elif change == "overflow":  # finite as a double, inf as the buffers' float32
        bufs, kw = _bufs(k=k, dtype=np.float32), dict(lr=1e39)
    else:
        kw = change
    before = [b.copy() for b in bufs]
    with pytest.raises((TypeError, ValueError), match=error):
        call(bufs, **kw)
    for b, c in zip(bufs, before):
        assert_bits_equal(b, c)
    call(_bufs(k=k))  # and the defaults are valid


def test_functional_nadam_chains_mu_product():
    p, g, m, v = _bufs()
    mu = 1.0
    for step in range(1, 4):
        new = F.nadam_(p, g, m, v, step=step, mu_product=mu, lr=1e-3, beta1=0.9, beta2=0.999,
                       eps=1e-8)
        assert 0 < new < mu
        mu = new


# -- 5. the benchmark's NumPy baselines ----------------------------------------------------------

@pytest.mark.parametrize("name", ["nadam", "radam", "adamax", "lion"])
def test_bench_baseline_matches_flatopt_over_30_steps(name):
    # tests/test_bench.py runs 5 steps; RAdam's rectified branch starts at step 6.
    from flatopt import bench
    optim = bench.OPTIMIZERS[name]
    rng = np.random.default_rng(0)
    p = rng.standard_normal(1000)
    g = rng.standard_normal(1000)
    opt = optim.flatopt([p.copy()], 1)
    opt.flat_grads[:] = g
    p_np = p.copy()
    numpy_step = optim.numpy(p_np, g)
    for _ in range(30):
        opt.step()
        numpy_step()
    np.testing.assert_allclose(opt.flat_params, p_np, rtol=1e-12)
    assert not np.allclose(p_np, p)

"""flatopt.torch against torch.optim: same training trajectories, checkpoints, semantics.

Every optimizer in CASES trains small models for 100 steps next to a reference from the
same weights and data: torch.optim's optimizer of the same name, or, for flatopt-only
optimizers (Momentum), flatopt's NumPy optimizer run one tensor at a time the way
torch.optim loops (skipping tensors whose grad is None). float64 must agree to 1e-12
relative, float32 closely.
"""

import copy
import inspect
import io
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("flatopt.torch")
import flatopt  # noqa: E402

STEPS = 100

# (name, kwargs): each optimizer with its interesting hyperparameter combinations.
CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.5, maximize=True)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2, amsgrad=True, maximize=True)),
    ("Adam", dict(lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("RMSprop", dict(lr=1e-3)),
    ("RMSprop", dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2)),
    ("Adadelta", dict()),
    ("Adadelta", dict(lr=0.5, rho=0.8, weight_decay=1e-2, maximize=True)),
    ("Adagrad", dict(lr=0.05)),
    ("Adagrad", dict(lr=0.05, lr_decay=1e-2, initial_accumulator_value=0.1, weight_decay=1e-2)),
    ("Momentum", dict(lr=0.1)),
    ("Momentum", dict(lr=0.1, beta=0.8, weight_decay=1e-2, maximize=True)),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CASES]


def rtol(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-4


# -- reference optimizers ----------------------------------------------------------------
class PerTensorNumpy(torch.optim.Optimizer):
    """flatopt's NumPy optimizer applied tensor by tensor, skipping tensors whose grad is
    None: torch.optim's loop structure, for optimizers torch.optim does not have."""

    def __init__(self, params, numpy_class, **hyper):
        signature = inspect.signature(numpy_class)
        defaults = {k: signature.parameters[k].default for k in numpy_class._hyperparameters}
        super().__init__(params, {**defaults, **hyper})
        self.numpy_class = numpy_class
        self.opts = {}

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step()
        return loss

    def _step(self):
        for group in self.param_groups:
            hyper = {k: group[k] for k in self.numpy_class._hyperparameters}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p not in self.opts:
                    self.opts[p] = self.numpy_class([p.detach().numpy()], **hyper)
                opt = self.opts[p]
                opt.param_groups[0].update(hyper)
                opt.step([p.grad.numpy()])
                p.copy_(torch.from_numpy(opt.params[0]))


def make_pair(name, params_a, params_b, kwargs):
    """(flatopt.torch optimizer over params_a, reference over params_b)."""
    flat = getattr(ft, name)(params_a, **kwargs)
    torch_class = getattr(torch.optim, name, None)
    if torch_class is not None:
        ref = torch_class(params_b, **kwargs)
    else:
        ref = PerTensorNumpy(params_b, getattr(flatopt, name), **kwargs)
    return flat, ref


# -- models ----------------------------------------------------------------------------
class MLP(torch.nn.Module):
    def __init__(self, n_in=5, n_out=3):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_in, 12), torch.nn.Tanh(), torch.nn.Linear(12, 8), torch.nn.Tanh(),
            torch.nn.Linear(8, n_out))

    def forward(self, x, step):
        return self.net(x)


class Shared(torch.nn.Module):
    """One parameter shared by two layers (tied weights) plus a layer applied twice."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(5, 8)
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x, step):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.a(h))
        h = torch.tanh(self.b(h))
        h = torch.tanh(self.a(h))
        return self.out(h)


class Frozen(MLP):
    """An MLP whose first bias is frozen (requires_grad=False) but given to the optimizer."""

    def __init__(self):
        super().__init__()
        self.net[0].bias.requires_grad_(False)


class Unused(MLP):
    """A second head used only every third step: its grad is None on the other steps, so
    its step count (and SGD's first-step buffer) lag behind the trunk's."""

    def __init__(self):
        super().__init__()
        self.extra = torch.nn.Linear(5, 3)

    def forward(self, x, step):
        y = self.net(x)
        return y + self.extra(x) if step % 3 == 2 else y


class Mixed(torch.nn.Module):
    """float64 and float32 parameters in one model: one flat buffer per dtype."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(5, 8).double()
        self.b = torch.nn.Linear(8, 3).float()

    def forward(self, x, step):
        return self.b(torch.tanh(self.a(x.double())).float()).double()


MODELS = {"mlp": MLP, "shared": Shared, "frozen": Frozen, "unused": Unused}


def make_models(factory, dtype, seed=0):
    torch.manual_seed(seed)
    model = factory()
    if not isinstance(model, Mixed):
        model = model.to(dtype)
    return model, copy.deepcopy(model)


def batches(dtype, n=STEPS * 2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, 5, generator=g, dtype=dtype)
    y = torch.randn(n, 16, 3, generator=g, dtype=dtype)
    return x, y


def train(model, opt, data, steps=STEPS, *, start=0, set_to_none=True, accumulate=1,
          scheduler=None, sign=1.0, zero=None):
    """Train for ``steps`` steps; return the losses."""
    x, y = data
    losses = []
    for s in range(start, start + steps):
        (zero or opt.zero_grad)(set_to_none=set_to_none)
        for k in range(accumulate):
            i = (s * accumulate + k) % len(x)
            loss = sign * ((model(x[i], s) - y[i]) ** 2).mean()
            loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return np.array(losses)


def assert_same(a, b, tol):
    """Tensors/arrays equal to ``tol`` relative to the larger magnitude."""
    a = a.detach().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, float)
    b = b.detach().double().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, float)
    assert a.shape == b.shape
    scale = max(np.abs(b).max(initial=0.0), 1e-300)
    err = np.abs(a - b).max(initial=0.0)
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol:g} * {scale:.3g}"


def assert_models_same(m1, m2, tol):
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2
        assert_same(p1, p2, tol)


def sign_of(kwargs):
    return -1.0 if kwargs.get("maximize") else 1.0


# -- trajectories --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_matches_reference(name, kwargs, model_name, dtype):
    m1, m2 = make_models(MODELS[model_name], dtype)
    frozen_before = [p.detach().clone() for p in m1.parameters() if not p.requires_grad]
    flat, ref = make_pair(name, list(m1.parameters()), list(m2.parameters()), kwargs)
    data = batches(dtype)
    l1 = train(m1, flat, data, sign=sign_of(kwargs))
    l2 = train(m2, ref, data, sign=sign_of(kwargs))
    assert np.isfinite(l1).all()
    assert_same(l1, l2, rtol(dtype))
    assert_models_same(m1, m2, rtol(dtype))
    for before, p in zip(frozen_before, [p for p in m1.parameters() if not p.requires_grad]):
        assert torch.equal(before, p)


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_mixed_dtypes(name, kwargs):
    m1, m2 = make_models(Mixed, None)
    flat, ref = make_pair(name, list(m1.parameters()), list(m2.parameters()), kwargs)
    assert len(flat._buckets) == 2
    data = batches(torch.float64)
    assert_same(train(m1, flat, data, sign=sign_of(kwargs)), train(m2, ref, data, sign=sign_of(kwargs)), 2e-4)
    assert_models_same(m1, m2, 2e-4)  # the float64 layer's grads pass through float32


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_lr_scheduler(name, kwargs):
    m1, m2 = make_models(MLP, torch.float64)
    flat, ref = make_pair(name, list(m1.parameters()), list(m2.parameters()), kwargs)
    lr0 = flat.defaults["lr"]
    sched = [torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.7) for o in (flat, ref)]
    data = batches(torch.float64)
    l1 = train(m1, flat, data, scheduler=sched[0], sign=sign_of(kwargs))
    l2 = train(m2, ref, data, scheduler=sched[1], sign=sign_of(kwargs))
    assert flat.param_groups[0]["lr"] == ref.param_groups[0]["lr"] < lr0 / 100
    assert_same(l1, l2, 1e-12)
    assert_models_same(m1, m2, 1e-12)


def _cycles_momentum(name):
    return {"momentum", "betas"} & set(inspect.signature(getattr(ft, name)).parameters)


@pytest.mark.parametrize("name,kwargs", [c for c in CASES if _cycles_momentum(c[0])],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if _cycles_momentum(c[0])])
def test_one_cycle_scheduler_edits_momentum(name, kwargs):
    """OneCycleLR also cycles 'momentum' (or 'betas'); for SGD without momentum that
    turns momentum on mid-training, so the buffers start then, as in torch."""
    m1, m2 = make_models(MLP, torch.float64)
    flat, ref = make_pair(name, list(m1.parameters()), list(m2.parameters()), kwargs)
    lr0 = flat.defaults["lr"]
    sched = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=lr0, total_steps=STEPS) for o in (flat, ref)]
    data = batches(torch.float64)
    l1 = train(m1, flat, data, scheduler=sched[0], sign=sign_of(kwargs))
    l2 = train(m2, ref, data, scheduler=sched[1], sign=sign_of(kwargs))
    assert_same(l1, l2, 1e-12)
    assert_models_same(m1, m2, 1e-12)


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_param_groups(name, kwargs):
    m1, m2 = make_models(MLP, torch.float64)

    def groups(m):
        layers = m.net
        other = {k: v for k, v in kwargs.items() if k not in ("lr", "weight_decay")}
        lr = kwargs.get("lr", 1.0)
        return [
            {"params": list(layers[0].parameters()), "lr": lr / 3, **other},
            {"params": list(layers[2].parameters()), "weight_decay": 0.05},
            {"params": list(layers[4].parameters())},
        ]

    flat, ref = make_pair(name, groups(m1), groups(m2), kwargs)
    assert len(flat.param_groups) == 3
    data = batches(torch.float64)
    assert_same(train(m1, flat, data, sign=sign_of(kwargs)), train(m2, ref, data, sign=sign_of(kwargs)), 1e-12)
    assert_models_same(m1, m2, 1e-12)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_gradient_accumulation(name, kwargs, set_to_none):
    m1, m2 = make_models(Unused, torch.float64)
    flat, ref = make_pair(name, list(m1.parameters()), list(m2.parameters()), kwargs)
    data = batches(torch.float64)
    kw = dict(accumulate=2, set_to_none=set_to_none, sign=sign_of(kwargs))
    assert_same(train(m1, flat, data, **kw), train(m2, ref, data, **kw), 1e-12)
    assert_models_same(m1, m2, 1e-12)


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_module_zero_grad_and_replaced_grads(name, kwargs):
    """module.zero_grad() bypasses the optimizer; a user-assigned grad is copied in."""
    m1, m2 = make_models(MLP, torch.float64)
    flat, ref = make_pair(name, list(m1.parameters()), list(m2.parameters()), kwargs)
    data = batches(torch.float64)
    sign = sign_of(kwargs)
    assert_same(train(m1, flat, data, 10, zero=m1.zero_grad, sign=sign),
                train(m2, ref, data, 10, zero=m2.zero_grad, sign=sign), 1e-12)
    for m, o in ((m1, flat), (m2, ref)):
        o.zero_grad()
        (sign * m(data[0][0], 0).square().mean()).backward()
        for p in m.parameters():
            p.grad = p.grad * 0.5 + 0.01  # a new tensor, not a view of the flat buffer
        o.step()
    assert_models_same(m1, m2, 1e-12)
    for p, q in zip(m1.parameters(), m2.parameters()):  # the assigned grads stay, as in torch
        assert p.grad.untyped_storage().data_ptr() != flat._buckets[0].flat_grad.data_ptr()
        assert_same(p.grad, q.grad, 1e-12)
    assert_same(train(m1, flat, data, 10, start=11, sign=sign), train(m2, ref, data, 10, start=11, sign=sign), 1e-12)
    assert_models_same(m1, m2, 1e-12)


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_closure(name, kwargs):
    m1, m2 = make_models(MLP, torch.float64)
    flat, ref = make_pair(name, list(m1.parameters()), list(m2.parameters()), kwargs)
    x, y = batches(torch.float64)
    results = []
    for m, o in ((m1, flat), (m2, ref)):
        def closure():
            o.zero_grad()
            loss = sign_of(kwargs) * ((m(x[0], 0) - y[0]) ** 2).mean()
            loss.backward()
            return loss
        results.append([o.step(closure).item() for _ in range(5)])
    assert_same(results[0], results[1], 1e-12)
    assert_models_same(m1, m2, 1e-12)
    assert flat.step() is None


# -- checkpoints ---------------------------------------------------------------------------
def roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def reference_class(name):
    return getattr(torch.optim, name, None)


CHECKPOINT_CASES = [
    pytest.param(name, kwargs, direction, id=f"{case_id}-{direction}")
    for (name, kwargs), case_id in zip(CASES, CASE_IDS)
    for direction in ("flat->torch", "torch->flat", "flat->flat")
    if direction == "flat->flat" or reference_class(name) is not None  # Momentum: no torch twin
]


@pytest.mark.parametrize("name,kwargs,direction", CHECKPOINT_CASES)
def test_checkpoint_interchange(name, kwargs, direction):
    """Train 50 steps with one optimizer, save, load into the other, train 50 more: the
    result equals 100 uninterrupted steps of the reference."""
    src_cls, dst_cls = {
        "flat->torch": (getattr(ft, name), reference_class(name)),
        "torch->flat": (reference_class(name), getattr(ft, name)),
        "flat->flat": (getattr(ft, name), getattr(ft, name)),
    }[direction]
    data = batches(torch.float64)
    sign = sign_of(kwargs)
    m_ref, m = make_models(Unused, torch.float64)
    _, ref = make_pair(name, list(copy.deepcopy(m_ref).parameters()), list(m_ref.parameters()), kwargs)
    expected = train(m_ref, ref, data, sign=sign)

    src = src_cls(m.parameters(), **kwargs)
    first = train(m, src, data, 50, sign=sign)
    saved = roundtrip(src.state_dict())
    m_new = copy.deepcopy(m)
    dst = dst_cls(m_new.parameters(), **{**kwargs, "lr": 123.0})  # hyperparameters come from the checkpoint
    dst.load_state_dict(saved)
    assert dst.param_groups[0]["lr"] == src.param_groups[0]["lr"]
    second = train(m_new, dst, data, 50, start=50, sign=sign)
    assert_same(np.concatenate([first, second]), expected, 1e-12)
    assert_models_same(m_new, m_ref, 1e-12)


@pytest.mark.parametrize("name,kwargs", [c for c in CASES if reference_class(c[0])],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if reference_class(c[0])])
def test_state_dict_format_matches_torch(name, kwargs):
    m1, m2 = make_models(Unused, torch.float64)
    flat, ref = make_pair(name, list(m1.parameters()), list(m2.parameters()), kwargs)
    data = batches(torch.float64)
    for steps in (1, 2):  # after step 1 the unused head has no state in torch
        train(m1, flat, data, steps, sign=sign_of(kwargs))
        train(m2, ref, data, steps, sign=sign_of(kwargs))
        s1, s2 = flat.state_dict(), ref.state_dict()
        assert s1["param_groups"] == s2["param_groups"]
        assert s1["state"].keys() == s2["state"].keys()
        for pid, entry in s2["state"].items():
            assert s1["state"][pid].keys() == entry.keys()
            for key, value in entry.items():
                assert s1["state"][pid][key].dtype == value.dtype
                assert_same(s1["state"][pid][key], value, 1e-12)


def test_state_dict_is_a_snapshot_and_state_is_live():
    m, _ = make_models(MLP, torch.float64)
    opt = ft.SGD(m.parameters(), lr=0.1, momentum=0.9)
    train(m, opt, batches(torch.float64), 3)
    snapshot = opt.state_dict()
    p = next(m.parameters())
    live = opt.state[p]["momentum_buffer"]
    assert torch.equal(live, snapshot["state"][0]["momentum_buffer"])
    live.fill_(7.0)
    assert (opt.state[p]["momentum_buffer"] == 7).all()
    assert not (snapshot["state"][0]["momentum_buffer"] == 7).any()
    with pytest.raises(AttributeError, match="load_state_dict"):
        opt.state = {}


def test_load_state_dict_errors_change_nothing():
    m, _ = make_models(MLP, torch.float64)
    opt = ft.SGD(m.parameters(), lr=0.1, momentum=0.9)
    train(m, opt, batches(torch.float64), 3)
    before = opt.state_dict()
    bad = copy.deepcopy(before)
    bad["state"][1]["momentum_buffer"] = torch.zeros(2, 2, dtype=torch.float64)
    bad["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match=r"state\[1\]\['momentum_buffer'\] must be a floating-point tensor of shape"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(before)
    bad["param_groups"].append(bad["param_groups"][0])
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for pid, entry in before["state"].items():
        assert torch.equal(after["state"][pid]["momentum_buffer"], entry["momentum_buffer"])


# -- buffers, views, threads -----------------------------------------------------------------
def test_parameters_and_grads_are_views_of_flat_buffers():
    m, _ = make_models(MLP, torch.float32)
    opt = ft.SGD(m.parameters(), lr=0.1)
    (bucket,) = opt._buckets
    assert bucket.flat_param.dtype == torch.float32
    assert bucket.flat_param.data_ptr() % 64 == 0
    assert bucket.flat_param.numel() == sum(p.numel() for p in m.parameters())
    for p, view in zip(m.parameters(), bucket.param_views):
        assert p.data_ptr() == view.data_ptr()
        assert p.untyped_storage().data_ptr() == bucket.flat_param.data_ptr()
        assert p.grad is None  # no backward yet: as torch
    x = torch.randn(4, 5)
    m(x, 0).sum().backward()
    # Gradients stay where autograd put them (its own tensors, as with torch.optim) and
    # the kernel reads them there: the flat gradient buffer is not written...
    grads = [p.grad for p in m.parameters()]
    flat_grad_ptr = bucket.flat_grad.data_ptr()
    assert all(g.untyped_storage().data_ptr() != flat_grad_ptr for g in grads)
    opt.step()
    assert all(p.grad is g for p, g in zip(m.parameters(), grads))
    assert not bucket.opt.flat_grads.any()
    # ...unless skip_if_nonfinite, whose check reads the flat buffer: then they are copied.
    opt.step(skip_if_nonfinite=True)
    np.testing.assert_array_equal(bucket.opt.flat_grads, torch.cat([g.flatten() for g in grads]).numpy())
    opt.zero_grad(set_to_none=False)  # torch's: zeroed in place
    assert all(p.grad is g for p, g in zip(m.parameters(), grads))
    assert not any(g.any() for g in grads)
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_strided_gradients_are_read_as_their_values():
    """A gradient the user assigned with other strides (a transposed tensor) is read by
    value, as torch reads it; a dtype changed behind torch's setter is refused."""
    m1, m2 = make_models(MLP, torch.float64)
    flat, ref = make_pair("Adam", list(m1.parameters()), list(m2.parameters()), dict(lr=0.01))
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            grad = torch.randn(p1.shape[::-1], generator=g, dtype=torch.float64)
            if grad.dim() == 2:
                grad = grad.T
                assert not grad.is_contiguous()
            p1.grad, p2.grad = grad, grad.clone()
        flat.step()
        ref.step()
    assert_models_same(m1, m2, 1e-12)
    weight = m1.net[0].weight
    before = weight.detach().clone()
    weight.grad.data = weight.grad.data.float()
    with pytest.raises(RuntimeError, match=r"dtype torch.float32 does not match its parameter"):
        flat.step()
    assert torch.equal(weight, before)


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_step_without_any_gradient_changes_nothing(name, kwargs):
    """Before the first backward pass and after zero_grad(), as torch.optim."""
    m1, m2 = make_models(MLP, torch.float64)
    flat, ref = make_pair(name, list(m1.parameters()), list(m2.parameters()), kwargs)
    for _ in range(2):
        flat.step()
        ref.step()
        flat.zero_grad()
        ref.zero_grad()
    assert_models_same(m1, m2, 0)
    assert flat.state_dict()["state"].keys() == ref.state_dict()["state"].keys()


def test_threads_give_identical_results():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(200, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3))
    results = []
    for n_threads in (1, 2):
        m = copy.deepcopy(model)
        opt = ft.SGD(m.parameters(), lr=0.01, momentum=0.9, n_threads=n_threads)
        assert opt._buckets[0].flat_param.numel() > flatopt._kernels.PARALLEL_THRESHOLD
        x = torch.randn(8, 200, generator=torch.Generator().manual_seed(3))
        for _ in range(3):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(results[0], results[1])


IN_PLACE_CASES = CASES + [("NAdam", dict(lr=1e-2, decoupled_weight_decay=True, weight_decay=1e-2)),
                          ("RAdam", dict(lr=1e-2)), ("Adamax", dict(lr=1e-2)), ("Lion", dict(lr=1e-3))]


@pytest.mark.parametrize("half", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", IN_PLACE_CASES, ids=[c[0] + str(i) for i, c in enumerate(IN_PLACE_CASES)])
def test_gradients_read_in_place_match_the_flat_copy_bit_for_bit(name, kwargs, half):
    """The kernels read each gradient where autograd left it (a GradTable of sources) and
    get exactly what they get from the gradients copied into the flat buffer: a model that
    straddles the parallel threshold, 1 and 2 threads, two groups, gradients that are None
    on some steps (runs of parameters with different step counts) or strided; and a
    16-bit model (float32 master), whose 16-bit gradients are read in place through a
    HalfGrads."""
    def run(n_threads, in_place):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(130, 127), torch.nn.Tanh(), torch.nn.Linear(127, 9),
                                    torch.nn.Tanh(), torch.nn.Linear(9, 3))
        if half is not None:
            model.to(half)
        first, second = list(model.parameters())[:3], list(model.parameters())[3:]
        opt = getattr(ft, name)([{"params": first}, {"params": second, "lr": kwargs.get("lr", 1.0) / 2}],
                                **kwargs, n_threads=n_threads,
                                master_dtype=None if half is None else torch.float32)
        (bucket,) = opt._buckets
        assert bucket.reads_in_place
        assert bucket.flat_param.numel() > flatopt._kernels.PARALLEL_THRESHOLD
        bucket.reads_in_place = in_place
        x = torch.randn(16, 130, generator=torch.Generator().manual_seed(1)).to(half or torch.float32)
        for step in range(6):
            opt.zero_grad()
            model(x).float().square().mean().backward()
            if step % 3 == 1:
                model[2].weight.grad = None
                model[0].bias.grad = None
            if step == 4:
                model[0].weight.grad = model[0].weight.grad.T.contiguous().T  # strided
            opt.step()
        params = [p.detach().clone() for p in model.parameters()]
        return params, opt.state_dict()

    ref_params, ref_state = run(1, in_place=False)
    for n_threads in (1, 2):
        params, state = run(n_threads, in_place=True)
        assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
        for pid, entry in ref_state["state"].items():
            for key, value in entry.items():
                assert torch.equal(state["state"][pid][key], value), key
        if half is not None:
            assert all("master_param" in entry for entry in state["state"].values())


def test_tensor_lr_and_named_parameters():
    m1, m2 = make_models(MLP, torch.float64)
    flat = ft.SGD(m1.named_parameters(), lr=torch.tensor(0.05), momentum=0.9)
    ref = torch.optim.SGD(m2.named_parameters(), lr=torch.tensor(0.05), momentum=0.9)
    data = batches(torch.float64)
    assert_same(train(m1, flat, data, 20), train(m2, ref, data, 20), 1e-12)
    assert flat.state_dict()["param_groups"][0]["param_names"] == ref.state_dict()["param_groups"][0]["param_names"]


# -- API and errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in ft.__all__ if hasattr(torch.optim, n)])
def test_signature_is_torchs_plus_n_threads_and_master_dtype(name):
    ours = inspect.signature(getattr(ft, name))
    theirs = inspect.signature(getattr(torch.optim, name))
    assert list(ours.parameters)[:-2] == list(theirs.parameters)
    for p in theirs.parameters.values():
        assert ours.parameters[p.name].default == p.default
        assert ours.parameters[p.name].kind == p.kind
    assert list(ours.parameters)[-2:] == ["n_threads", "master_dtype"]
    for extra in ("n_threads", "master_dtype"):
        assert ours.parameters[extra].kind == inspect.Parameter.KEYWORD_ONLY
        assert ours.parameters[extra].default is None


def test_every_wrapper_has_a_numpy_twin():
    for name in ft.__all__:
        cls = getattr(ft, name)
        assert issubclass(cls, torch.optim.Optimizer)
        assert cls._numpy_class is getattr(flatopt, name)
        assert cls.__doc__


def test_import_flatopt_does_not_import_torch():
    code = "import sys, flatopt; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=None)


@pytest.mark.parametrize("first", ["empty", "float32"])
def test_a_step_error_names_the_torch_group(first):
    """The error of a hyperparameter changed between steps names the group the user sees,
    not its index among the groups of its dtype (it said param_groups[0] here)."""
    p0 = [] if first == "empty" else [torch.nn.Parameter(torch.zeros(3))]
    p1 = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = ft.Adam([{"params": p0}, {"params": [p1]}], lr=0.1)
    opt.param_groups[1]["lr"] = -1.0
    p1.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"param_groups\[1\] lr"):
        opt.step()
    assert torch.equal(p1, torch.zeros(3, dtype=torch.float64))


def test_errors():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="device meta"):
        ft.SGD([torch.nn.Parameter(torch.zeros(3, device="meta"))], lr=0.1)
    with pytest.raises(TypeError, match="float16"):
        ft.SGD([torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))], lr=0.1)
    with pytest.raises(TypeError, match="complex128"):
        ft.SGD([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex128))], lr=0.1)
    with pytest.raises(TypeError, match="int64"):
        ft.SGD([torch.zeros(3, dtype=torch.int64)], lr=0.1)
    with pytest.raises(ValueError, match=r"Invalid SGD defaults lr"):
        ft.SGD([p], lr=-1.0)
    with pytest.raises(ValueError, match=r"Invalid SGD param_groups\[1\] lr"):
        ft.SGD([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -1.0}], lr=0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        ft.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        ft.SGD([p], lr=0.1, differentiable=True)
    with pytest.raises(ValueError, match=r"Invalid Momentum defaults beta"):
        ft.Momentum([p], lr=0.1, beta=1.0)
    with pytest.raises(TypeError, match="lr"):
        ft.Momentum([p])  # lr is required, as in flatopt.Momentum
    with pytest.raises(TypeError, match="iterable of Tensors"):
        ft.SGD(p, lr=0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        ft.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="ordered collections"):
        ft.SGD([{"params": {p}}], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        ft.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ValueError, match="non-leaf"):
        ft.SGD([p * 2], lr=0.1)


def test_sparse_gradients_are_rejected_before_any_write():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Parameter(torch.ones(3))
    opt = ft.SGD([dense, *emb.parameters()], lr=0.1)
    before = emb.weight.detach().clone()
    (emb(torch.tensor([1, 2])).sum() + dense.sum()).backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    opt.zero_grad(set_to_none=False)  # the sparse gradient is zeroed in place: still rejected
    (emb(torch.tensor([1, 2])).sum() + dense.sum()).backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before) and torch.equal(dense, torch.ones(3))


def test_replaced_parameter_data_is_detected():
    m, _ = make_models(MLP, torch.float64)
    opt = ft.SGD(m.parameters(), lr=0.1)
    m.net[0].weight.data = m.net[0].weight.data.clone()
    with pytest.raises(RuntimeError, match="no longer views the optimizer's flat buffer"):
        opt.step()


def test_unfrozen_parameter_joins_training():
    """A parameter frozen at construction is skipped, then trained once unfrozen."""
    m1, m2 = make_models(Frozen, torch.float64)
    flat, ref = make_pair("SGD", list(m1.parameters()), list(m2.parameters()), dict(lr=0.05, momentum=0.9))
    data = batches(torch.float64)
    assert_same(train(m1, flat, data, 5), train(m2, ref, data, 5), 1e-12)
    m1.net[0].bias.requires_grad_(True)
    m2.net[0].bias.requires_grad_(True)
    assert_same(train(m1, flat, data, 20, start=5), train(m2, ref, data, 20, start=5), 1e-12)
    assert_models_same(m1, m2, 1e-12)
    assert m1.net[0].bias.grad is not None



@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_clip_grad_norm_and_create_graph_backward():
    """torch.nn.utils.clip_grad_norm_ edits the grad views in place; a create_graph=True
    backward makes grads out of place, which step() copies in."""
    m1, m2 = make_models(MLP, torch.float64)
    flat, ref = make_pair("SGD", list(m1.parameters()), list(m2.parameters()), dict(lr=0.05, momentum=0.9))
    x, y = batches(torch.float64)
    for s in range(20):
        for m, o in ((m1, flat), (m2, ref)):
            o.zero_grad(set_to_none=s % 2 == 0)
            ((m(x[s], s) - y[s]) ** 2).mean().backward(create_graph=s % 5 == 4)
            torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.05)
            o.step()
            for p in m.parameters():
                p.grad = p.grad.detach()  # drop the graph kept by create_graph
    assert_models_same(m1, m2, 1e-12)


def test_main_benchmark_times_flatopt_torch():
    """``python -m flatopt.bench`` has a flatopt-torch row next to torch.optim's."""
    from flatopt import bench
    optims = [o for o in bench.OPTIMIZERS.values() if o.torch is not None]
    rows = bench.run(optims, [bench.model_case(8)], ["float32"], 1, 0.001, use_torch=True, out=io.StringIO())
    timed = {(r["optimizer"], r["impl"]) for r in rows}
    assert all((o.name, "flatopt-torch") in timed for o in optims)


# ---- fused gradient hygiene (issue 7) --------------------------------------------------

def _hygiene_model(dtype=torch.float64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(dtype)
    x, y = torch.randn(16, 6, dtype=dtype), torch.randn(16, 2, dtype=dtype)
    return model, x, y


def test_fused_clip_matches_torch_clip():
    model, x, y = _hygiene_model()
    twin = copy.deepcopy(model)
    ours = flatopt.torch.Adam(model.parameters(), lr=0.05)
    theirs = torch.optim.Adam(twin.parameters(), lr=0.05, foreach=False)
    for _ in range(30):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            (100 * torch.nn.functional.mse_loss(m(x), y)).backward()
        before = [p.grad.clone() for p in model.parameters()]
        norm = ours.clip_grad_norm_(0.5)
        tnorm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        assert norm == pytest.approx(float(tnorm), rel=1e-12)
        for p, g in zip(model.parameters(), before):
            assert torch.equal(p.grad, g)  # the clip is folded into the step, not written
        ours.step()
        theirs.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_grad_norm_counts_none_as_zero_and_is_thread_independent():
    model, x, y = _hygiene_model()
    opt = flatopt.torch.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.mse_loss(model(x), y).backward()
    model[2].bias.grad = None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    expected = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    assert opt.grad_norm() == pytest.approx(expected, rel=1e-12)
    assert opt.grad_norm(float("inf")) == max(float(g.abs().max()) for g in grads)
    with flatopt.num_threads(1):
        one = opt.grad_norm()
    assert opt.grad_norm() == one


def test_grad_scale_and_skip_if_nonfinite():
    model, x, y = _hygiene_model()
    twin = copy.deepcopy(model)
    ours = flatopt.torch.SGD(model.parameters(), lr=0.1, momentum=0.9)
    theirs = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, foreach=False)
    scale = 1024.0
    for step in range(10):
        ours.zero_grad()
        theirs.zero_grad()
        (scale * torch.nn.functional.mse_loss(model(x), y)).backward()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        if step == 4:  # an overflowing step: skipped, nothing written
            next(model.parameters()).grad[0, 0] = float("inf")
            snapshot = [p.detach().clone() for p in model.parameters()]
            state = copy.deepcopy(ours.state_dict())
            ours.step(grad_scale=1 / scale, skip_if_nonfinite=True)
            assert ours.last_step_skipped and ours.skipped_steps == 1
            for p, s in zip(model.parameters(), snapshot):
                assert torch.equal(p, s)
            assert str(ours.state_dict()) == str(state)
            continue
        ours.step(grad_scale=1 / scale, skip_if_nonfinite=True)
        assert not ours.last_step_skipped
        theirs.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_hygiene_arguments_validated():
    model, _, _ = _hygiene_model()
    opt = flatopt.torch.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="skip_if_nonfinite"):
        opt.step(skip_if_nonfinite=1)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(grad_scale=float("nan"))
    with pytest.raises(ValueError, match="max_norm"):
        opt.clip_grad_norm_(-1.0)
    with pytest.raises(ValueError, match="norm_type"):
        opt.grad_norm(0)

"""flatopt.torch's usual step (``_FlatOptimizer._usual_step``, issue 16).

A step in which nothing changed since the last one (same hyperparameter objects, every
parameter with a contiguous gradient of its own shape) skips the general route's
per-parameter planning. These tests check that it is taken when it should be, that it
writes exactly what the general route writes (bit for bit, over training loops that
keep leaving and re-entering it), and that every change it could miss sends the step
back to the general route, which validates it before anything is written.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("flatopt.torch")
from flatopt import _kernels  # noqa: E402
from flatopt._tensor_grads import usual_grads  # noqa: E402
from flatopt.torch._base import _FlatOptimizer  # noqa: E402

# (name, kwargs): every class; NAdam has a per-run hook and never takes the usual route.
CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, amsgrad=True)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("RMSprop", dict(lr=1e-3, momentum=0.9, centered=True)),
    ("Adadelta", dict(lr=0.5)),
    ("Adagrad", dict(lr=0.05, lr_decay=1e-2)),
    ("Momentum", dict(lr=0.1)),
    ("NAdam", dict(lr=1e-2)),
    ("RAdam", dict(lr=1e-2)),
    ("Adamax", dict(lr=1e-2)),
    ("Lion", dict(lr=1e-3)),
]
IDS = [f"{n}{i}" for i, (n, _) in enumerate(CASES)]
USUAL_STEP = _FlatOptimizer._usual_step


def count_usual(monkeypatch, allow=True):
    """Count the steps that take the usual route; with ``allow=False``, send every step
    down the general route instead."""
    taken = []

    def spy(self):
        took = allow and USUAL_STEP(self)
        taken.append(took)
        return took

    monkeypatch.setattr(_FlatOptimizer, "_usual_step", spy)
    return taken


def train(name, kwargs, dtype, n_threads, steps=13):
    half = dtype in (torch.float16, torch.bfloat16)  # with a float32 master
    """A two-group model (straddling the parallel threshold) trained through what leaves
    the usual route for a step (a scheduler's new lr, an lr changed back to the object of
    earlier steps, a strided gradient, a checkpoint reload) or for good (a gradient that
    is None, after which the counts differ), and what does not (gradients zeroed in
    place rather than set to None, clipping)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(130, 127), torch.nn.Tanh(), torch.nn.Linear(127, 9),
                                torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(dtype)
    params = list(model.parameters())
    opt = getattr(ft, name)([{"params": params[:3]}, {"params": params[3:], "lr": kwargs["lr"] / 2}],
                            **kwargs, n_threads=n_threads, master_dtype=torch.float32 if half else None)
    assert opt._buckets[0].flat_param.numel() > _kernels.PARALLEL_THRESHOLD
    x = torch.randn(16, 130, generator=torch.Generator().manual_seed(1), dtype=dtype)
    first_lr = opt.param_groups[0]["lr"]
    for step in range(steps):
        opt.zero_grad(set_to_none=step != 8)
        model(x).float().square().mean().backward()
        if step == 3:
            opt.param_groups[0]["lr"] = first_lr * 0.5  # a scheduler's new float
        if step == 5:
            opt.param_groups[0]["lr"] = first_lr  # the very object of the first steps
            model[0].weight.grad = model[0].weight.grad.T.contiguous().T  # strided
        if step == 7:
            opt.clip_grad_norm_(0.5)  # a pending factor: the usual route applies it
        if step == 9:
            opt.load_state_dict(opt.state_dict())
        if step == 11:  # counts differ from here on: the general route for good
            model[2].weight.grad = None
        opt.step()
    return [p.detach().clone() for p in params], opt.state_dict()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_usual_route_writes_what_the_general_route_writes(name, kwargs, dtype, monkeypatch):
    general = count_usual(monkeypatch, allow=False)
    ref_params, ref_state = train(name, kwargs, dtype, n_threads=1)
    assert not any(general)
    for n_threads in (1, 2):
        taken = count_usual(monkeypatch)
        params, state = train(name, kwargs, dtype, n_threads)
        if name == "NAdam":
            assert not any(taken)
        else:  # but on the first step and on every step that changes something
            assert taken == [False, True, True, False, True, False, True, True, True, False, True, False, False]
        assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
        if dtype in (torch.float16, torch.bfloat16):
            assert all("master_param" in entry for entry in state["state"].values())
        assert state["param_groups"] == ref_state["param_groups"]
        for pid, entry in ref_state["state"].items():
            for key, value in entry.items():
                assert torch.equal(state["state"][pid][key], value), (pid, key)


def make_armed(n=5, **kwargs):
    p = torch.nn.Parameter(torch.linspace(-1, 1, n))
    opt = ft.Adam([p], lr=1e-2, **kwargs)
    p.grad = torch.ones(n)
    opt.step()
    opt.step()
    assert opt._buckets[0].usual is not None
    return p, opt


def test_an_invalid_change_raises_before_any_write_even_when_changed_back():
    p, opt = make_armed()
    first_lr = opt.param_groups[0]["lr"]
    before, state_before = p.detach().clone(), opt.state_dict()
    opt.param_groups[0]["lr"] = -1.0
    for _ in range(2):  # and again: a failed step arms nothing
        with pytest.raises(ValueError, match="lr"):
            opt.step()
        assert torch.equal(p.detach(), before)
        assert opt.state_dict()["state"][0]["step"] == state_before["state"][0]["step"]
    # Back to the object validated before: the NumPy group still holds -1.0, so the step
    # must copy and validate again, not trust that it was synced.
    opt.param_groups[0]["lr"] = first_lr
    q, twin = make_armed()  # the same steps, none of them failed
    opt.step()
    twin.step()
    assert torch.equal(p.detach(), q.detach()) and not torch.equal(p.detach(), before)


def test_betas_changed_in_place_or_replaced_are_validated():
    p, opt = make_armed()
    opt.param_groups[0]["betas"] = (1.5, 0.999)
    with pytest.raises(ValueError, match="betas"):
        opt.step()
    opt.param_groups[0]["betas"] = [0.9, 0.999]  # a list: never trusted by identity
    opt.step()
    opt.step()
    assert opt._buckets[0].usual is None
    opt.param_groups[0]["betas"][0] = 1.5
    with pytest.raises(ValueError, match="betas"):
        opt.step()


@pytest.mark.parametrize("change, error", [
    ("grad_shape", "does not match its parameter"),
    ("grad_dtype", "does not match its parameter"),
    ("rebound", "no longer views"),
])
def test_a_gradient_or_parameter_changed_behind_torchs_back_is_refused(change, error):
    p, opt = make_armed()
    before = p.detach().clone()
    if change == "grad_shape":
        p.grad.data = torch.ones(2, 3)  # .data bypasses torch's own grad checks
    elif change == "grad_dtype":
        p.grad.data = torch.ones(5, dtype=torch.float64)
    else:
        p.data = torch.zeros(5)
    with pytest.raises(RuntimeError, match=error):
        opt.step()
    if change != "rebound":
        assert torch.equal(p.detach(), before)


def test_usual_grads_checks_each_condition():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    grads = [torch.ones(3), torch.ones(2, 2)]
    for p, g in zip(params, grads):
        p.grad = g
    ptrs = [p.data_ptr() for p in params]
    sigs = [(torch.strided, torch.float32, p.shape) for p in params]
    sources = np.full(5, -1, dtype=np.intp)
    out = usual_grads(params, ptrs, sigs, sources)
    assert out == grads and all(a is b for a, b in zip(out, grads))
    assert list(sources) == [grads[0].data_ptr(), -1, grads[1].data_ptr(), -1, -1]
    assert usual_grads(params, [ptrs[0], ptrs[1] + 4], sigs, sources) is None
    assert usual_grads(params, ptrs, [sigs[0], (torch.strided, torch.float64, params[1].shape)], sources) is None
    assert usual_grads(params, ptrs, [sigs[0], (torch.strided, torch.float32, torch.Size([4]))], sources) is None
    params[1].grad = torch.ones(2, 2).T  # transposed: not contiguous
    assert usual_grads(params, ptrs, sigs, sources) is None
    params[1].grad = None
    assert usual_grads(params, ptrs, sigs, sources) is None
    assert usual_grads([], [], [], np.empty(1, dtype=np.intp)) == []
    with pytest.raises(ValueError, match="2 params need 2 data_ptrs"):
        usual_grads(params, ptrs[:1], sigs, sources)
    with pytest.raises(ValueError, match="4 sources"):
        usual_grads(params, ptrs, sigs, np.empty(3, dtype=np.intp))

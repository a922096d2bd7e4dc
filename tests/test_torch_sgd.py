"""flatopt.SGD against torch.optim.SGD: same data, same configuration, 100 steps."""

import numpy as np
import pytest

import flatopt

torch = pytest.importorskip("torch")

CONFIGS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "dampening": dict(lr=0.05, momentum=0.9, dampening=0.25),
    "nesterov": dict(lr=0.02, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.05, momentum=0.8, weight_decay=0.01),
    "maximize": dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
}
SHAPES = [(17, 5), (5,), (1,), (3, 4, 2)]


def _setup(seed, dtype):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(100)]
    return params, grads


def _torch_run(params, grads, config, groups=None, lr_change=None):
    tparams = [torch.tensor(p) for p in params]
    spec = tparams if groups is None else [{"params": tparams[a:b], **hp} for (a, b), hp in groups]
    opt = torch.optim.SGD(spec, foreach=False, **config)
    for step, gs in enumerate(grads):
        if lr_change and step == lr_change[0]:
            opt.param_groups[0]["lr"] = lr_change[1]
        for t, g in zip(tparams, gs):
            t.grad = torch.tensor(g)
        opt.step()
    return [t.numpy() for t in tparams]


def _flatopt_run(params, grads, config, groups=None, lr_change=None):
    spec = params if groups is None else [{"params": params[a:b], **hp} for (a, b), hp in groups]
    opt = flatopt.SGD(spec, **config)
    for step, gs in enumerate(grads):
        if lr_change and step == lr_change[0]:
            opt.param_groups[0]["lr"] = lr_change[1]
        opt.step(gs)
    return opt.params


def _assert_close(ours, theirs, rtol):
    for a, b in zip(ours, theirs):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_torch_float64(config):
    params, grads = _setup(0, np.float64)
    # torch's CPU kernels may use FMA where flatopt rounds twice: agreement is to a few
    # ulps per step, far inside 1e-12 relative after 100 steps.
    _assert_close(_flatopt_run(params, grads, config), _torch_run(params, grads, config), 1e-12)


def test_matches_torch_groups_and_lr_schedule():
    params, grads = _setup(1, np.float64)
    groups = [((0, 2), dict(weight_decay=0.01)), ((2, 4), dict(lr=0.01, nesterov=True))]
    config = dict(lr=0.05, momentum=0.9)
    ours = _flatopt_run(params, grads, config, groups, lr_change=(40, 0.005))
    theirs = _torch_run(params, grads, config, groups, lr_change=(40, 0.005))
    _assert_close(ours, theirs, 1e-12)


@pytest.mark.parametrize("config", [CONFIGS["nesterov"], CONFIGS["maximize"]])
def test_matches_torch_float32(config):
    params, grads = _setup(2, np.float32)
    # float32: each step rounds a few times at 2**-24 relative; 100 steps of a contraction
    # keep the difference well under 1e-5 relative.
    _assert_close(_flatopt_run(params, grads, config), _torch_run(params, grads, config), 1e-5)

"""flatopt.torch behaves as torch.optim where a training script can tell (issue 11, items 1-8).

Each test runs the same script against torch.optim and flatopt.torch (or states torch's
behaviour directly) and demands the same observable result.
"""

import copy
import functools
import io
import pickle
import warnings
from collections import defaultdict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("flatopt.torch")
import flatopt  # noqa: E402

# One configuration per torch.optim twin, with state that matters.
TWINS = {
    "SGD": dict(lr=0.05, momentum=0.9),
    "Adam": dict(lr=1e-2, amsgrad=True),
    "AdamW": dict(lr=1e-2),
    "RMSprop": dict(lr=1e-2, momentum=0.5, centered=True),
    "Adadelta": dict(lr=0.5),
    "Adagrad": dict(lr=0.05, initial_accumulator_value=0.1),
    "NAdam": dict(lr=1e-2, momentum_decay=0.01),
    "RAdam": dict(lr=1e-2, decoupled_weight_decay=True, weight_decay=0.01),
    "Adamax": dict(lr=1e-2),
}
TWIN_NAMES = list(TWINS)


def net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)


def data(n=12, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, 4, generator=g, dtype=dtype), torch.randn(n, 8, 2, generator=g, dtype=dtype)


def train(model, opt, batches, steps, start=0):
    x, y = batches
    for s in range(start, start + steps):
        opt.zero_grad()
        ((model(x[s % len(x)]) - y[s % len(x)]) ** 2).mean().backward()
        opt.step()


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def assert_close(a, b, rtol=1e-12):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-300)
    assert float((a - b).abs().max()) <= rtol * scale


def assert_state_dicts_close(ours, theirs):
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for pid, entry in theirs["state"].items():
        assert ours["state"][pid].keys() == entry.keys()
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert ours["state"][pid][key].dtype == value.dtype
                assert_close(ours["state"][pid][key], value)
            else:
                assert ours["state"][pid][key] == value


# -- 1. autograd's version counter --------------------------------------------------------------
@pytest.mark.parametrize("name", TWIN_NAMES)
def test_backward_through_saved_old_weights_raises_as_in_torch(name):
    for cls in (getattr(torch.optim, name), getattr(ft, name)):
        w = torch.nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
        opt = cls([w], **TWINS[name])
        loss = (w * w).sum()  # saves w for backward
        loss.backward(retain_graph=True)
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


# -- 2. checkpoints from other torch versions -----------------------------------------------------
NEWER_KEYS = ("maximize", "foreach", "differentiable", "capturable", "fused", "decoupled_weight_decay")


@pytest.mark.parametrize("name", TWIN_NAMES)
def test_checkpoint_without_newer_keys_loads_as_in_torch(name):
    model = net()
    src = getattr(torch.optim, name)(model.parameters(), **TWINS[name])
    train(model, src, data(), 3)
    old = copy.deepcopy(src.state_dict())
    for group in old["param_groups"]:
        for key in NEWER_KEYS:
            group.pop(key, None)
    m_ref, m = copy.deepcopy(model), copy.deepcopy(model)
    ref = getattr(torch.optim, name)(m_ref.parameters(), **TWINS[name])
    ours = getattr(ft, name)(m.parameters(), **TWINS[name])
    ref.load_state_dict(copy.deepcopy(old))
    ours.load_state_dict(copy.deepcopy(old))
    assert ours.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
    train(m_ref, ref, data(), 4, start=3)
    train(m, ours, data(), 4, start=3)
    assert_close(flat_params(m), flat_params(m_ref))


# -- 3. add_param_group ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in TWIN_NAMES if n != "Adagrad"])  # torch's Adagrad fails
def test_add_param_group_trains_as_in_torch(name):
    m_ref, m = net(), net()
    head_ref, head = m_ref[2], m[2]
    ref = getattr(torch.optim, name)(m_ref[0].parameters(), **TWINS[name])
    ours = getattr(ft, name)(m[0].parameters(), **TWINS[name])
    train(m_ref, ref, data(), 3)
    train(m, ours, data(), 3)
    lr = TWINS[name]["lr"] / 2
    ref.add_param_group({"params": list(head_ref.parameters()), "lr": lr})
    ours.add_param_group({"params": list(head.parameters()), "lr": lr})
    train(m_ref, ref, data(), 5, start=3)
    train(m, ours, data(), 5, start=3)
    assert_close(flat_params(m), flat_params(m_ref))
    assert_state_dicts_close(ours.state_dict(), ref.state_dict())
    # one flat buffer again: every parameter views it
    bucket, = ours._buckets
    assert all(p.data_ptr() == v.data_ptr() for p, v in zip(bucket.params, bucket.param_views))


def test_add_param_group_rejected_changes_nothing():
    model = net()
    opt = ft.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    train(model, opt, data(), 2)
    before = opt.state_dict()
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": -1.0})
    with pytest.raises(TypeError, match="float16"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))]})
    assert len(opt.param_groups) == 1 and [p.data_ptr() for p in model.parameters()] == ptrs
    assert_state_dicts_close(opt.state_dict(), before)


def test_adagrad_add_param_group_gets_fresh_state():
    model = net()
    opt = ft.Adagrad(model[0].parameters(), lr=0.1, initial_accumulator_value=0.25)
    train(model, opt, data(), 2)
    opt.add_param_group({"params": list(model[2].parameters())})
    assert (opt.state[model[2].weight]["sum"] == 0.25).all()
    train(model, opt, data(), 2, start=2)
    assert int(opt.state[model[2].weight]["step"]) == 2 and int(opt.state[model[0].weight]["step"]) == 4


# -- 4. opt.state is torch's mapping ---------------------------------------------------------------
def test_state_is_a_defaultdict_that_keeps_what_is_written():
    m_ref, m = net(), net()
    ref = torch.optim.SGD(m_ref.parameters(), lr=0.05, momentum=0.9)
    ours = ft.SGD(m.parameters(), lr=0.05, momentum=0.9)
    for opt, model in ((ref, m_ref), (ours, m)):
        assert isinstance(opt.state, defaultdict)
        assert opt.state[model[0].weight] == {}          # no state yet: an empty entry
        assert opt.state is opt.state                     # not rebuilt on access
        opt.state[model[0].weight]["note"] = "kept"       # as a state-dict hook would write
        train(model, opt, data(), 2)
        opt.state[model[0].bias]["momentum_buffer"] = torch.full((6,), 0.5, dtype=torch.float64)
        train(model, opt, data(), 2, start=2)
    assert ours.state[m[0].weight]["note"] == "kept"
    assert_state_dicts_close(ours.state_dict(), ref.state_dict())
    assert_close(flat_params(m), flat_params(m_ref))


# -- 5. copy and pickle ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TWIN_NAMES)
def test_deepcopy_with_the_model_trains_like_the_original(name):
    model = net()
    opt = getattr(ft, name)(model.parameters(), **TWINS[name])
    train(model, opt, data(), 3)
    model2, opt2 = copy.deepcopy((model, opt))
    assert [id(p) for g in opt2.param_groups for p in g["params"]] == [id(p) for p in model2.parameters()]
    assert not np.shares_memory(opt2._buckets[0].opt.flat_params, opt._buckets[0].opt.flat_params)
    train(model, opt, data(), 3, start=3)
    train(model2, opt2, data(), 3, start=3)
    assert torch.equal(flat_params(model2), flat_params(model))
    assert_state_dicts_close(opt2.state_dict(), opt.state_dict())


def test_deepcopy_alone_and_pickle():
    model = net()
    opt = ft.Adam(model.parameters(), lr=1e-2)
    train(model, opt, data(), 2)
    alone = copy.deepcopy(opt)  # as torch: its parameters are new tensors
    assert not any(p is q for p in alone.param_groups[0]["params"] for q in model.parameters())
    assert_state_dicts_close(alone.state_dict(), opt.state_dict())
    buf = io.BytesIO()
    pickle.dump(opt, buf)
    loaded = pickle.loads(buf.getvalue())
    assert_state_dicts_close(loaded.state_dict(), opt.state_dict())


@pytest.mark.parametrize("cls", [torch.optim.Adam, ft.Adam], ids=["torch", "flatopt"])
def test_copies_and_pickles_leave_the_hooks_behind(cls):
    """As torch.optim's __getstate__: a copy has no hooks (the original's would run on
    it), and an optimizer with a lambda hook pickles."""
    model = net()
    opt = cls(model.parameters(), lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load"))
    train(model, opt, data(), 1)
    assert calls == ["pre", "post"]
    loaded = pickle.loads(pickle.dumps(opt))
    model2, copied = copy.deepcopy((model, opt))
    for other in (loaded, copied):
        calls.clear()
        other.load_state_dict(other.state_dict())
        if other is copied:
            train(model2, copied, data(), 1)
        assert calls == []
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                     "_optimizer_state_dict_pre_hooks", "_optimizer_load_state_dict_pre_hooks"):
            assert len(getattr(other, name)) == 0


@pytest.mark.parametrize("name", TWIN_NAMES)
def test_param_groups_hold_torchs_keys_in_torchs_order_and_types(name):
    """The dicts a script or a state dict sees: the same keys in the same order, the same
    value types (torch stores betas given as a list as a tuple, for Adam and AdamW)."""
    kwargs = dict(TWINS[name])
    if name in ("Adam", "AdamW", "NAdam", "RAdam", "Adamax"):
        kwargs["betas"] = [0.8, 0.99]
    ref = getattr(torch.optim, name)(net().parameters(), **kwargs)
    ours = getattr(ft, name)(net().parameters(), **kwargs)
    for theirs, mine in ((ref.param_groups[0], ours.param_groups[0]), (ref.defaults, ours.defaults)):
        assert list(mine) == list(theirs)
        assert {k: type(v) for k, v in mine.items() if k != "params"} == \
            {k: type(v) for k, v in theirs.items() if k != "params"}
    assert ours.state_dict()["param_groups"] == ref.state_dict()["param_groups"]


# -- 6. param_names, duplicates, validation order -------------------------------------------------
def test_param_names_survive_loading_an_unnamed_state_dict():
    m_ref, m = net(), net()
    ref = torch.optim.Adam(m_ref.named_parameters(), lr=1e-2)
    ours = ft.Adam(m.named_parameters(), lr=1e-2)
    unnamed = torch.optim.Adam(net().parameters(), lr=1e-3).state_dict()
    ref.load_state_dict(copy.deepcopy(unnamed))
    ours.load_state_dict(copy.deepcopy(unnamed))
    assert ours.param_groups[0]["param_names"] == ref.param_groups[0]["param_names"] == ["0.weight", "0.bias",
                                                                                         "2.weight", "2.bias"]
    assert ours.state_dict()["param_groups"] == ref.state_dict()["param_groups"]


def test_parameter_listed_twice_keeps_one_id():
    p, q = (torch.nn.Parameter(torch.ones(3, dtype=torch.float64)) for _ in range(2))
    with pytest.warns(UserWarning, match="duplicate"):
        ref = torch.optim.SGD([p, p, q], lr=0.1)
    with pytest.warns(UserWarning, match="duplicate"):
        ours = ft.SGD([p, p, q], lr=0.1)
    assert ours.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
    assert ours.state_dict()["param_groups"][0]["params"] == [1, 1, 2]  # torch's numbering


@pytest.mark.parametrize("make", [
    lambda cls: cls(None, betas=(1.0, 0.0)),
    lambda cls: cls([torch.nn.Parameter(torch.ones(2))], betas=(torch.tensor(0.9), 0.999)),
    lambda cls: cls([torch.nn.Parameter(torch.ones(2))], betas=(0.9, torch.tensor(0.999))),
], ids=["betas-before-params", "mixed-betas-tensor-first", "mixed-betas-float-first"])
def test_hyperparameters_validated_first_with_torchs_exception(make):
    with pytest.raises(ValueError) as theirs:
        make(torch.optim.Adam)
    with pytest.raises(ValueError, match="beta"):
        make(ft.Adam)
    assert "beta" in str(theirs.value)


# -- 7. nothing half-done on error -----------------------------------------------------------------
def _mixed():
    a = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float32))
    return a, b


def test_construction_with_two_dtypes_rebinds_nothing_on_error():
    a, b = _mixed()
    ptrs = (a.data_ptr(), b.data_ptr())
    with pytest.raises(ValueError, match="lr.*overflows float32"):
        ft.SGD([a, b], lr=1e39)  # fits float64, not float32
    assert (a.data_ptr(), b.data_ptr()) == ptrs


def test_load_state_dict_checks_every_dtype_before_changing_anything():
    a, b = _mixed()
    opt = ft.SGD([a, b], lr=0.1, momentum=0.9)
    (a.sum() + b.sum()).backward()
    opt.step()
    before = opt.state_dict()
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["lr"] = 1e39
    with pytest.raises(ValueError, match="overflows float32"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == 0.1
    assert_state_dicts_close(opt.state_dict(), before)


def test_group_edit_checked_for_every_dtype_before_any_write():
    a, b = _mixed()
    opt = ft.SGD([a, b], lr=0.1)
    (a.sum() + b.sum()).backward()
    opt.param_groups[0]["lr"] = 1e39
    with pytest.raises(ValueError, match="overflows float32"):
        opt.step()
    assert (a == 1).all() and (b == 1).all()


# -- 8. Adagrad's initial accumulator, AMSGrad's NaN --------------------------------------------------
def test_adagrad_per_group_initial_accumulator_value_as_torch():
    m_ref, m = net(), net()
    groups = lambda model: [{"params": model[0].parameters()},  # noqa: E731
                            {"params": model[2].parameters(), "initial_accumulator_value": 0.5}]
    ref = torch.optim.Adagrad(groups(m_ref), lr=0.05, initial_accumulator_value=0.1)
    ours = ft.Adagrad(groups(m), lr=0.05, initial_accumulator_value=0.1)
    assert_state_dicts_close(ours.state_dict(), ref.state_dict())  # torch: 0.1 everywhere
    train(m_ref, ref, data(), 4)
    train(m, ours, data(), 4)
    assert_close(flat_params(m), flat_params(m_ref))


def test_amsgrad_propagates_nan_in_max_exp_avg_sq_as_torch():
    results = []
    for cls in (torch.optim.Adam, ft.Adam):
        w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        opt = cls([w], lr=0.1, amsgrad=True)
        w.grad = torch.ones(3, dtype=torch.float64)
        opt.step()
        opt.state[w]["max_exp_avg_sq"][1] = float("nan")
        opt.step()
        results.append(w.detach().clone())
    assert torch.isnan(results[0][1]) and torch.isnan(results[1][1])


# -- design: one step routine ---------------------------------------------------------------------------
def test_both_front_ends_step_through_the_numpy_step_routine(monkeypatch):
    calls = []
    original = flatopt.Optimizer._finish_step

    def spy(self, *args):
        calls.append(type(self).__name__)
        return original(self, *args)

    monkeypatch.setattr(flatopt.Optimizer, "_finish_step", spy)
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = ft.Adam([w], lr=0.1)
    w.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    flatopt.Adam([np.ones(3)], lr=0.1).step()
    assert calls == ["Adam", "Adam"]


def test_public_classes_are_written_out_with_torchs_signature():
    import inspect
    for name in TWIN_NAMES:
        cls = getattr(ft, name)
        assert "__init__" in cls.__dict__ and cls.__module__ == "flatopt.torch._optimizers"
        assert list(inspect.signature(cls).parameters)[:-2] == list(
            inspect.signature(getattr(torch.optim, name)).parameters)  # + n_threads, master_dtype
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        help_text = ft.Adam.__init__.__doc__ or ft.Adam.__doc__
    assert "torch.optim.Adam" in help_text


def test_before_update_hook_sees_each_runs_count():
    """``_before_update`` (NAdam's mu_product uses it) sees each run's count and parameter
    range, with the earlier runs already counted."""
    seen = []

    class Hooked(ft.Adam):
        def _before_update(self, bucket, gi, group, count, span):
            assert bucket is self._buckets[0]
            seen.append((count, span, bucket.counts.tolist()))

    a, b, c = (torch.nn.Parameter(torch.ones(2, dtype=torch.float64)) for _ in range(3))
    opt = Hooked([a, b, c], lr=0.1)
    for p in (a, b, c):
        p.grad = torch.ones(2, dtype=torch.float64)
    opt.step()                      # one run: counts 0
    b.grad = None
    opt.step()                      # runs [a] and [c], both at count 1
    assert seen == [(0, (0, 3), [0.0, 0.0, 0.0]), (1, (0, 1), [1.0, 1.0, 1.0]), (1, (2, 3), [2.0, 1.0, 1.0])]
    assert [int(opt.state[p]["step"]) for p in (a, b, c)] == [2, 1, 2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nadam_mu_product_is_per_parameter_under_a_momentum_schedule(dtype):
    """NAdam's mu_product depends on the beta1 of every step a parameter took: OneCycleLR
    moves beta1 each step while two parameters skip different steps, so they reach the
    same step count with different products (and must then be stepped apart). Each
    parameter's value, in ``opt.state[p]`` and the checkpoint, is torch's."""
    def run(cls, **kw):
        torch.manual_seed(0)
        a, b, c = (torch.nn.Parameter(torch.randn(5, dtype=dtype)) for _ in range(3))
        opt = cls([a, b, c], lr=0.1, **kw)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=12)
        for s in range(8):
            opt.zero_grad()
            (a.sum() ** 2 + (b ** 3).sum() + (a * c).sum()).backward()
            if s == 0:
                b.grad = None   # b skips step 0 ...
            if s == 3:
                a.grad = None   # ... and a step 3: the same count again, another history
            opt.step()
            sched.step()
        return [a, b, c], opt
    ref_params, ref = run(torch.optim.NAdam, foreach=False)
    params, opt = run(ft.NAdam)
    for p, q in zip(params, ref_params):
        assert_close(p.detach(), q.detach(), 1e-12 if dtype == torch.float64 else 1e-6)
        assert float(opt.state[p]["mu_product"]) == float(ref.state[q]["mu_product"])
    assert sorted(opt.state[params[0]]) == sorted(ref.state[ref_params[0]])
    saved, expected = opt.state_dict()["state"], ref.state_dict()["state"]
    for k in expected:
        assert saved[k]["mu_product"].dtype == expected[k]["mu_product"].dtype
        assert saved[k]["mu_product"].item() == expected[k]["mu_product"].item()


# Edits of a whole entry of opt.state (resetting a layer's moments after re-initialising
# or pruning it). torch's Adagrad creates its state at construction only and fails on a
# parameter whose entry was removed, so it is left out.
STATE_EDITS = {
    "del": lambda opt, p: opt.state.__delitem__(p),
    "assign-empty": lambda opt, p: opt.state.__setitem__(p, {}),
    "pop": lambda opt, p: opt.state.pop(p),
    "clear": lambda opt, p: opt.state.clear(),
}


@pytest.mark.parametrize("edit", STATE_EDITS)
@pytest.mark.parametrize("name", [n for n in TWIN_NAMES if n != "Adagrad"])
def test_removing_a_parameters_state_restarts_it_as_in_torch(name, edit):
    batches, models = data(), [net(), net()]
    opts = [getattr(torch.optim, name)(models[0].parameters(), **TWINS[name]),
            getattr(ft, name)(models[1].parameters(), **TWINS[name])]
    returned = []
    for model, opt in zip(models, opts):
        train(model, opt, batches, 3)
        returned.append(STATE_EDITS[edit](opt, list(model.parameters())[2]))
        train(model, opt, batches, 3, start=3)
    assert_close(flat_params(models[1]), flat_params(models[0]))
    assert_state_dicts_close(opts[1].state_dict(), opts[0].state_dict())
    if returned[0] is not None:  # pop: the entry as it was
        assert returned[1].keys() == returned[0].keys()
        for key, value in returned[0].items():
            assert_close(returned[1][key], value)


@pytest.mark.parametrize("name", TWIN_NAMES)
def test_assigning_a_parameters_entry_loads_it_as_in_torch(name):
    """A saved entry assigned back (one layer's state rewound) is what the next steps use."""
    batches, models = data(), [net(), net()]
    opts = [getattr(torch.optim, name)(models[0].parameters(), **TWINS[name]),
            getattr(ft, name)(models[1].parameters(), **TWINS[name])]
    for model, opt in zip(models, opts):
        train(model, opt, batches, 3)
        p = list(model.parameters())[0]
        saved = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
        train(model, opt, batches, 2, start=3)
        opt.state[p] = saved
        train(model, opt, batches, 2, start=5)
    assert_close(flat_params(models[1]), flat_params(models[0]))
    assert_state_dicts_close(opts[1].state_dict(), opts[0].state_dict())


def test_state_edits_keep_one_state_object_and_read_before_writing():
    """opt.state stays one object (code holds on to it); entries swapped in one update
    are read before either is overwritten; |= and setdefault edit through it; copies
    are plain defaultdicts; keys that are not parameters take any value."""
    a, b = (torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(2))
    opt = ft.Adam([a, b], lr=0.1)
    for k, p in enumerate((a, b)):
        p.grad = torch.full((3,), k + 1.0, dtype=torch.float64)
    opt.step()
    held = opt.state
    m_a, m_b = opt.state[a]["exp_avg"].clone(), opt.state[b]["exp_avg"].clone()
    opt.state.update({a: opt.state[b], b: opt.state[a]})
    assert torch.equal(opt.state[a]["exp_avg"], m_b) and torch.equal(opt.state[b]["exp_avg"], m_a)
    held |= {a: {}}
    assert opt.state is held and opt.state[a] == {} and float(opt.state[b]["step"]) == 1
    opt.step()
    assert float(opt.state[a]["step"]) == 1 and float(opt.state[b]["step"]) == 2
    del held[b]
    assert b not in opt.state and opt.state is held
    c = torch.nn.Parameter(torch.zeros(2))
    assert opt.state.setdefault("note", None) is None and opt.state.setdefault(c, {"x": 1}) == {"x": 1}
    copied = opt.state.copy()
    assert type(copied) is defaultdict and type(opt.state | {}) is defaultdict
    copied[a] = 5  # a plain dict: no checks


def two_parameters_stepped(cls, steps, after=None, **kw):
    """Two float64 parameters of one group stepped ``steps`` times with gradients
    ``1 + k``; ``after(k, opt, params)`` runs after step ``k``."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3, dtype=torch.float64)) for _ in range(2)]
    opt = cls(ps, lr=0.1, **kw)
    for k in range(steps):
        for p in ps:
            p.grad = torch.full((3,), 1.0 + k, dtype=torch.float64)
        opt.step()
        if after is not None:
            after(k, opt, ps)
    return ps, opt


def test_a_written_step_or_mu_product_is_what_the_next_step_uses():
    """Writing one parameter's step (or NAdam's mu_product) while its group is in step
    makes the next step plan its runs afresh, as torch reads each parameter's own."""
    for key in ("step", "mu_product"):
        def write(k, opt, ps, key=key):
            if k == 1:
                opt.state[ps[1]][key] = torch.tensor(0.3 if key == "mu_product" else 7.0)  # torch's dtype
        (ours, _), (theirs, _) = (two_parameters_stepped(cls, 4, write) for cls in (ft.NAdam, torch.optim.NAdam))
        for p, q in zip(ours, theirs):
            assert_close(p.detach(), q.detach())


def test_a_step_count_written_in_place_is_used():
    """``opt.state[p]["step"].fill_(0)`` on one parameter of a group in step: torch reads
    each parameter's own count, so the next steps must too (torch's version counter of
    the counts tells flatopt.torch it was written)."""
    def write(k, opt, ps):
        if k == 2:
            opt.state[ps[1]]["step"].fill_(0.0)
    (ours, opt), (theirs, ref) = (two_parameters_stepped(ft.Adam, 5, write),
                                  two_parameters_stepped(torch.optim.Adam, 5, write, foreach=False))
    assert [float(opt.state[p]["step"]) for p in ours] == [float(ref.state[p]["step"]) for p in theirs] == [5.0, 2.0]
    for p, q in zip(ours, theirs):
        assert_close(p.detach(), q.detach())


def test_nadam_mu_product_goes_through_the_load_hooks():
    """mu_product is part of the entries torch's load hooks see and may change."""
    make = functools.partial(two_parameters_stepped, steps=3)
    _, ref = make(torch.optim.NAdam, foreach=False)
    saved = ref.state_dict()
    for e in saved["state"].values():
        del e["mu_product"]
    results = []
    for cls, kw in ((torch.optim.NAdam, dict(foreach=False)), (ft.NAdam, {})):
        ps, opt = make(cls, **kw)
        opt.state["ema"] = {"decay": 0.99}   # a key that is not a parameter, in the checkpoint

        def fill(o, sd):
            for e in sd["state"].values():
                if isinstance(e.get("step"), torch.Tensor):
                    e.setdefault("mu_product", torch.tensor(0.25))
        seen = []
        opt.register_load_state_dict_pre_hook(fill)
        opt.register_load_state_dict_post_hook(lambda o: seen.append(float(o.state_dict()["state"][0]["mu_product"])))
        sd = copy.deepcopy(saved)
        sd["state"]["ema"] = {"decay": 0.5}
        opt.load_state_dict(sd)
        results.append((seen, [float(opt.state[p]["mu_product"]) for p in ps], opt.state["ema"]))
    assert results[0] == results[1] == ([0.25], [0.25, 0.25], {"decay": 0.5})


def _nadam_resumed(cls, how, **kw):
    """Float64 parameters a, b, c under ``cls`` (torch's NAdam or ours) through 3 steps, a
    change ``how``, then 30 more steps of every parameter; the parameters and optimizer."""
    torch.manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.randn(3, dtype=torch.float64)) for _ in range(3))

    def steps(opt, ps, n, start=0):
        for k in range(start, start + n):
            for i, p in enumerate(ps):
                p.grad = None if (how == "absent" and p is b and k < 3) else \
                    torch.full((3,), 1.0 + k + i, dtype=torch.float64)
            opt.step()

    opt = cls([a, b], lr=0.1, **kw)
    steps(opt, [a, b], 3)
    if how == "written":  # a whole entry (a key of a live entry is copied into, in its dtype)
        opt.state[b] = {**opt.state[b], "mu_product": torch.tensor(0.5, dtype=torch.float64)}
    else:
        resumed = cls([a, b], lr=0.1, **kw)
        resumed.load_state_dict(opt.state_dict())  # torch casts mu_product to float64
        opt = resumed
    if how == "added":
        opt.add_param_group({"params": [c]})
    if how == "copied":
        (a, b), opt = copy.deepcopy(([a, b], opt))
    ps = [a, b, c] if how == "added" else [a, b]
    steps(opt, ps, 30, start=3)
    return ps, opt


def test_nadam_mu_product_takes_the_default_dtype_of_its_first_step():
    """torch makes a parameter's mu_product at its first step, in the default scalar dtype
    of then: set to float64 after the optimizer was built (or after a parameter's state
    was removed), the product rounds in float64."""
    def run(cls, **kw):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(3, dtype=torch.float64)) for _ in range(2)]
        opt = cls(ps, lr=0.1, **kw)
        previous = torch.get_default_dtype()
        try:
            torch.set_default_dtype(torch.float64)
            for k in range(40):
                if k == 20:
                    del opt.state[ps[1]]
                for p in ps:
                    p.grad = torch.full((3,), 1.0 + k, dtype=torch.float64)
                opt.step()
        finally:
            torch.set_default_dtype(previous)
        return ps, opt
    (ours, opt), (theirs, ref) = run(ft.NAdam), run(torch.optim.NAdam, foreach=False)
    for p, q in zip(ours, theirs):
        assert opt.state[p]["mu_product"].dtype == ref.state[q]["mu_product"].dtype == torch.float64
        assert float(opt.state[p]["mu_product"]) == float(ref.state[q]["mu_product"])
        assert_close(p.detach(), q.detach())


@pytest.mark.parametrize("how", ["added", "absent", "copied", "written"])
def test_nadam_mu_product_rounds_in_torchs_dtype_for_each_parameter(how):
    """Each parameter's mu_product is a scalar of its own dtype in torch, which decides how
    the running product rounds: a loaded one is cast to the parameter's dtype (float64
    here), one made by a parameter's first step has torch's default dtype (float32), also
    after a load (a parameter added then, or without state in the checkpoint), an entry
    assigned keeps its tensor's dtype, and a deep copy keeps each. flatopt.torch follows each
    parameter's: the products are torch's exactly, the parameters to 1e-12 (a product
    rounded in the other dtype moves them by about 6e-11 after 30 steps)."""
    ours, opt = _nadam_resumed(ft.NAdam, how)
    theirs, ref = _nadam_resumed(torch.optim.NAdam, how, foreach=False)
    for p, q in zip(ours, theirs):
        assert float(opt.state[p]["mu_product"]) == float(ref.state[q]["mu_product"])
        assert_close(p.detach(), q.detach())
    saved, expected = opt.state_dict()["state"], ref.state_dict()["state"]
    assert [e["mu_product"].dtype for e in saved.values()] == [e["mu_product"].dtype for e in expected.values()]


def test_state_entries_stay_the_objects_code_holds():
    """An entry held by the caller stays opt.state[p] through edits of other entries and
    add_param_group's repack (torch's entries change only when replaced); state given to
    a parameter before its group is added is what its first step uses; copies keep the
    keys that are not parameters; a shallow copy is refused (it cannot own the buffers)."""
    a, b, q = (torch.nn.Parameter(torch.ones(3, dtype=torch.float64)) for _ in range(3))
    opt = ft.Adam([a, b], lr=0.1)
    for p in (a, b):
        p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    held = opt.state[a]
    held["note"] = "kept"
    del opt.state[b]
    opt.state[q] = {"step": torch.tensor(10.0), "exp_avg": torch.ones(3, dtype=torch.float64),
                    "exp_avg_sq": torch.ones(3, dtype=torch.float64)}
    opt.add_param_group({"params": [q]})
    assert opt.state[a] is held and held["note"] == "kept"
    held["exp_avg"] = torch.full((3,), 7.0, dtype=torch.float64)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], torch.full((3,), 7.0, dtype=torch.float64))
    q.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert float(opt.state[q]["step"]) == 11.0
    opt.state["extra"] = 123
    assert copy.deepcopy(opt).state["extra"] == 123 and pickle.loads(pickle.dumps(opt)).state["extra"] == 123
    with pytest.raises(TypeError, match="deepcopy"):
        copy.copy(opt)
    other, c = ft.Adam([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))], lr=0.1), torch.nn.Parameter(
        torch.ones(3, dtype=torch.float64))
    other.state[c] = held   # another optimizer's live entry, for a parameter it adds later
    other.add_param_group({"params": [c]})
    assert opt.state[a] is held and other.state[c] is not held
    assert torch.equal(other.state[c]["exp_avg"], held["exp_avg"])
    before = held["exp_avg"].clone()
    other.state[c]["exp_avg"].fill_(5.0)   # other's buffers, not opt's
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], before)


def test_entries_swapped_one_assignment_at_a_time():
    """``x, y = opt.state[p], opt.state[q]; opt.state[p] = y; opt.state[q] = x``: an entry
    replaced keeps its values for whoever holds it, as torch's dicts do."""
    results = []
    for cls, kw in ((torch.optim.Adam, dict(foreach=False)), (ft.Adam, {})):
        p, q = (torch.nn.Parameter(torch.zeros(3)) for _ in range(2))
        opt = cls([p, q], lr=0.1, **kw)
        p.grad, q.grad = torch.ones(3), torch.full((3,), 3.0)
        opt.step()
        x, y = opt.state[p], opt.state[q]
        opt.state[p] = opt.state[p]   # a no-op
        same = opt.state[p] is x
        opt.state[p] = y
        opt.state[q] = x
        current = opt.state[p]
        popped = opt.state.pop(p)
        results.append((same, popped is current, [float(popped["exp_avg"][0]), float(opt.state[q]["exp_avg"][0])]))
    assert results[0] == results[1] == (True, True, [pytest.approx(0.3), pytest.approx(0.1)])


def test_replaced_lists_of_empty_groups_and_loads_are_checked():
    a, c = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = ft.Adam([a], lr=0.1)
    opt.add_param_group({"params": []})
    a.grad = torch.ones(2)
    opt.step()
    saved = opt.state_dict()
    opt.param_groups[1]["params"] = [c]
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\] was replaced"):
        opt.step()
    saved["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\] was replaced"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.1  # nothing applied


def test_assigning_a_bad_entry_raises_and_changes_nothing():
    model = net()
    opt = ft.Adam(model.parameters(), lr=0.1)
    train(model, opt, data(), 2)
    p = next(model.parameters())
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="exp_avg"):
        opt.state[p] = {"step": torch.tensor(2.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(p.shape)}
    with pytest.raises(TypeError, match="must be a dict"):
        opt.state[p] = 5
    assert_state_dicts_close(opt.state_dict(), before)
    opt.state["note"] = "kept"  # keys that are not parameters are stored as given
    assert opt.state_dict()["state"]["note"] == "kept"
    assert isinstance(copy.deepcopy(opt.state), defaultdict)


def test_group_params_cannot_change_behind_the_optimizers_back():
    """torch steps whatever group["params"] holds; flatopt.torch packed the parameters
    when the group was added, so a change would silently not be stepped: it raises
    (in place at once, a replaced list at the next step), and add_param_group works."""
    a, b, c = (torch.nn.Parameter(torch.ones(2, dtype=torch.float64)) for _ in range(3))
    opt = ft.SGD([a, b], lr=0.1)
    group = opt.param_groups[0]
    for edit in (lambda: group["params"].append(c), lambda: group["params"].remove(a),
                 lambda: group["params"].__setitem__(0, c), lambda: group["params"].pop()):
        with pytest.raises(TypeError, match="add_param_group"):
            edit()
    assert group["params"] == [a, b] and type(copy.deepcopy(group["params"])) is list
    for p in (a, b, c):
        p.grad = torch.ones(2, dtype=torch.float64)
    group["params"] = [a, b]          # the same parameters in a new list: fine
    opt.step()
    group["params"] = [a, c]          # others: refused before anything is written
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\] was replaced"):
        opt.step()
    assert torch.equal(a.detach(), torch.full((2,), 0.9, dtype=torch.float64))
    group["params"] = [a, b]
    opt.add_param_group({"params": [c]})
    opt.step()
    assert [float(p.detach()[0]) for p in (a, b, c)] == pytest.approx([0.8, 0.8, 0.9])


def test_transposed_parameter_data_is_refused():
    """p.data replaced by a transposed view of the same memory: the flat buffer would be
    updated in another element order than the gradient's."""
    for grads in ("autograd", "contiguous, by hand"):  # the general and the usual step
        lin = torch.nn.Linear(3, 3).double()
        opt = ft.SGD(lin.parameters(), lr=0.1)
        lin.weight.data = lin.weight.data.t()
        if grads == "autograd":
            lin(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
        else:
            for p in lin.parameters():
                p.grad = torch.ones(p.shape, dtype=torch.float64)
        with pytest.raises(RuntimeError, match="in its order"):
            opt.step()


def test_errors_name_the_hyperparameter_and_the_overlap():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="lr must be a number or a one-element tensor"):
        ft.Adam([p], lr=torch.tensor([0.1, 0.2]))
    base = torch.zeros(6)
    with pytest.raises(ValueError, match="share memory .*overlapping views"):
        ft.SGD([torch.nn.Parameter(base[:4]), torch.nn.Parameter(base[2:])], lr=0.1)


def test_torch_clip_factor_does_not_survive_zero_grad():
    """Item 9 for flatopt.torch: a clip factor belongs to the gradients it measured."""
    models = [net(), net()]
    opts = [ft.SGD(m.parameters(), lr=0.1) for m in models]
    x, y = data()
    ((models[0](x[0]) - y[0]) ** 2).sum().mul(100).backward()
    opts[0].clip_grad_norm_(1e-3)   # a tiny factor, pending
    opts[0].zero_grad()             # the batch is dropped
    for m, opt in zip(models, opts):
        opt.zero_grad()
        ((m(x[1]) - y[1]) ** 2).mean().backward()
        opt.step()
    assert torch.equal(flat_params(models[0]), flat_params(models[1]))


# -- torch's step wrapper: hooks and profiler label ----------------------------------------
from torch.optim.optimizer import (register_optimizer_step_post_hook,  # noqa: E402
                                   register_optimizer_step_pre_hook)


def _stepped_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    model(torch.randn(2, 4)).sum().backward()
    return model


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_step_hooks_run_as_in_torch(name):
    """Instance and global pre/post hooks run in torch's order, a pre-hook may replace the
    arguments, and the step without hooks (which skips torch's wrapper) updates alike."""
    results = []
    for make in (getattr(flatopt.torch, name), getattr(torch.optim, name)):
        model = _stepped_model()
        opt = make(model.parameters(), lr=0.1)
        calls = []
        handles = [
            opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre")),
            opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post")),
            register_optimizer_step_pre_hook(
                lambda o, args, kwargs: calls.append("global pre")),
            register_optimizer_step_post_hook(
                lambda o, args, kwargs: calls.append("global post")),
            # replaces the arguments: step(closure) returns the closure's value
            opt.register_step_pre_hook(lambda o, args, kwargs: ((o, lambda: 7.0), kwargs)),
        ]
        try:
            loss = opt.step()
        finally:
            for h in handles:
                h.remove()
        assert calls == ["global pre", "pre", "post", "global post"]
        assert loss == 7.0
        opt.step()  # no hooks left
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_step_profiler_label_as_in_torch():
    model = _stepped_model()
    opt = flatopt.torch.Adam(model.parameters(), lr=0.1)
    opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert "Optimizer.step#Adam.step" in {e.name for e in prof.events()}
    assert type(opt).step.hooked  # torch did not wrap it again


@pytest.mark.parametrize("profiled", [False, True])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_as_in_torch(monkeypatch, set_to_none, profiled):
    """zero_grad leaves the gradients as torch's does; torch's own zero_grad (and with it
    the profiler label) runs exactly when it can be observed or must zero in place, and
    the usual call skips its wrapper."""
    calls = []
    torch_zero_grad = torch.optim.Optimizer.zero_grad

    def spy(self, set_to_none=True):
        calls.append(set_to_none)
        torch_zero_grad(self, set_to_none)

    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", spy)
    grads = []
    for make in (flatopt.torch.Adam, torch.optim.Adam):
        model = _stepped_model()
        opt = make(model.parameters(), lr=0.1)
        opt.step()
        model.weight.grad.add_(1.0)
        if profiled:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                opt.zero_grad(set_to_none)
            assert f"Optimizer.zero_grad#{make.__name__}.zero_grad" in {e.name for e in prof.events()}
        else:
            opt.zero_grad(set_to_none)
        grads.append([p.grad for p in model.parameters()])
    flat_grads, torch_grads = grads
    for a, b in zip(flat_grads, torch_grads):
        assert (a is None) == (b is None) == set_to_none
        if not set_to_none:
            assert torch.equal(a, b) and not a.any()
    # flatopt.torch's call, then torch.optim's own
    assert calls == ([set_to_none] if profiled or not set_to_none else []) + [set_to_none]

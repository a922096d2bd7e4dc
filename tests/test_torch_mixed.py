"""flatopt.torch with 16-bit models and float32 master weights (issue 13, item 3).

Reference, independent of flatopt's conversion kernels: the same flatopt.torch optimizer
on a float32 model holding the master weights (its float32 step is checked against
torch.optim in test_torch.py), stepped with the 16-bit gradients widened by torch, then
torch's own cast of its weights to 16 bits. Master and 16-bit parameters must match it bit
for bit over many steps; torch.optim's float32 optimizer checks the trajectory loosely.
"""

import copy
import pickle

import pytest

torch = pytest.importorskip("torch")
import flatopt.torch as ft  # noqa: E402

pytest.importorskip("ml_dtypes", reason="bfloat16 parameters need ml_dtypes")

HALF = [torch.bfloat16, torch.float16]
CASES = [
    ("Adam", dict(lr=1e-2, weight_decay=0.01)),
    ("AdamW", dict(lr=1e-2, amsgrad=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.05)),
    ("RMSprop", dict(lr=1e-3, centered=True)),
    ("Adagrad", dict(lr=0.05)),
    ("NAdam", dict(lr=1e-2)),
    ("Lion", dict(lr=1e-3)),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CASES]


class Net(torch.nn.Module):
    """Two layers, and a bias that some steps leave without a gradient."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 33)
        self.b = torch.nn.Linear(33, 3)
        self.extra = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x, s):
        y = self.b(torch.tanh(self.a(x)))
        return y + self.extra if s % 3 else y


def models(half, seed=0):
    torch.manual_seed(seed)
    m16 = Net().to(half)
    m32 = copy.deepcopy(m16).float()  # the master weights start as the widened 16-bit ones
    return m16, m32


def data(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(steps)]


def bits(t):
    return t.detach().contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_matches(m16, m32, opt, half):
    for p16, p32 in zip(m16.parameters(), m32.parameters()):
        assert torch.equal(bits(p16), bits(p32.detach().to(half)))
        assert torch.equal(bits(opt.state[p16]["master_param"]), bits(p32))


def step_pair(m16, m32, flat, ref, x, y, s):
    for o in (flat, ref):
        o.zero_grad()
    loss = ((m16(x.to(m16.a.weight.dtype), s) - y.to(m16.a.weight.dtype)) ** 2).mean()
    loss.backward()
    for p16, p32 in zip(m16.parameters(), m32.parameters()):  # the widened 16-bit gradients
        p32.grad = None if p16.grad is None else p16.grad.float()
    flat.step()
    ref.step()


def adam_pair(half, n_batches, trained):
    """A 16-bit model with flatopt.torch's mixed Adam and its float32 reference, trained
    together on the first ``trained`` of ``n_batches`` batches."""
    m16, m32 = models(half)
    flat = ft.Adam(m16.parameters(), lr=1e-2, master_dtype=torch.float32)
    ref = ft.Adam(m32.parameters(), lr=1e-2)
    batches = data(n_batches)
    for s, (x, y) in enumerate(batches[:trained]):
        step_pair(m16, m32, flat, ref, x, y, s)
    return m16, m32, flat, ref, batches


def step_alone(model, opt, x, y, s):
    """One step of ``opt`` (any optimizer) on 16-bit ``model``."""
    half = model.a.weight.dtype
    opt.zero_grad()
    ((model(x.to(half), s) - y.to(half)) ** 2).mean().backward()
    opt.step()


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("half", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_matches_the_float32_step_and_torch_cast(name, kwargs, half, n_threads):
    m16, m32 = models(half)
    cls = getattr(ft, name)
    flat = cls(m16.parameters(), **kwargs, n_threads=n_threads, master_dtype=torch.float32)
    ref = cls(m32.parameters(), **kwargs, n_threads=1)
    for s, (x, y) in enumerate(data(200)):
        step_pair(m16, m32, flat, ref, x, y, s)
    assert_matches(m16, m32, flat, half)
    if "step" in ref.state[m32.extra]:  # skipped on the steps it had no gradient, as in torch
        assert flat.state[m16.extra]["step"] == ref.state[m32.extra]["step"] < 200


@pytest.mark.parametrize("half", HALF, ids=["bf16", "fp16"])
def test_close_to_torch_optim_in_float32(half):
    """The loose check against torch.optim itself: its float32 Adam on the master."""
    m16, m32 = models(half)
    flat = ft.Adam(m16.parameters(), lr=1e-2, master_dtype=torch.float32)
    ref = torch.optim.Adam(m32.parameters(), lr=1e-2)
    for s, (x, y) in enumerate(data(50)):
        step_pair(m16, m32, flat, ref, x, y, s)
    for p16, p32 in zip(m16.parameters(), m32.parameters()):
        torch.testing.assert_close(flat.state[p16]["master_param"], p32.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("half", HALF, ids=["bf16", "fp16"])
def test_state_dict_carries_the_master_and_resumes_exactly(half):
    m16, m32, flat, ref, batches = adam_pair(half, 40, 20)
    saved = pickle.loads(pickle.dumps(flat.state_dict()))
    entry = saved["state"][0]
    assert entry["master_param"].dtype == torch.float32 and entry["exp_avg"].dtype == torch.float32
    assert not torch.equal(entry["master_param"].to(half).float(), entry["master_param"])  # finer than 16 bits
    # a new model from the 16-bit weights, a new optimizer, the checkpoint loaded
    m16b = copy.deepcopy(m16)
    resumed = ft.Adam(m16b.parameters(), lr=1e-2, master_dtype=torch.float32)
    resumed.load_state_dict(saved)
    for s, (x, y) in enumerate(batches[20:], start=20):
        step_pair(m16, m32, flat, ref, x, y, s)
        step_alone(m16b, resumed, x, y, s)
    assert_matches(m16, m32, flat, half)
    for p, q in zip(m16.parameters(), m16b.parameters()):
        assert torch.equal(bits(p), bits(q))
    copied = copy.deepcopy(resumed)
    for p, q in zip(resumed.param_groups[0]["params"], copied.param_groups[0]["params"]):
        assert torch.equal(bits(resumed.state[p]["master_param"]), bits(copied.state[q]["master_param"]))


def test_a_torch_checkpoint_loads_with_the_parameters_as_master():
    """torch.optim's state dict has no master: the 16-bit weights, widened, become it."""
    m16, _ = models(torch.bfloat16)
    twin = copy.deepcopy(m16)
    ref = torch.optim.Adam(twin.parameters(), lr=1e-2)
    ((twin(torch.ones(2, 6, dtype=torch.bfloat16), 1)).sum()).backward()
    ref.step()
    flat = ft.Adam(m16.parameters(), lr=1e-2, master_dtype=torch.float32)
    flat.load_state_dict(ref.state_dict())
    for p in m16.parameters():
        assert torch.equal(flat.state[p]["master_param"], p.detach().float())
        assert flat.state[p]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("half", HALF, ids=["bf16", "fp16"])
def test_nonfinite_gradient_skips_with_nothing_written(half):
    m16, _ = models(half)
    opt = ft.Adam(m16.parameters(), lr=1e-2, master_dtype=torch.float32)
    (m16(torch.ones(2, 6, dtype=half), 1).sum()).backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    params = [bits(p).clone() for p in m16.parameters()]
    opt.zero_grad()
    (m16(torch.ones(2, 6, dtype=half), 1).sum()).backward()
    m16.a.weight.grad[0, 0] = float("inf")
    opt.step(skip_if_nonfinite=True)
    assert opt.last_step_skipped and opt.skipped_steps == 1
    assert all(torch.equal(bits(p), b) for p, b in zip(m16.parameters(), params))
    after = opt.state_dict()["state"][0]
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_bad_input_is_refused_before_anything_changes():
    m16, _ = models(torch.bfloat16)
    before = [bits(p).clone() for p in m16.parameters()]
    ptrs = [p.data_ptr() for p in m16.parameters()]
    with pytest.raises(TypeError, match="16-bit parameters need float32 master weights, pass master_dtype=torch.float32"):
        ft.Adam(m16.parameters(), lr=1e-2)
    with pytest.raises(TypeError, match="master_dtype must be None or torch.float32, got torch.float16"):
        ft.Adam(m16.parameters(), lr=1e-2, master_dtype=torch.float16)
    with pytest.raises(TypeError, match="master_dtype must be None or torch.float32"):
        ft.SGD(m16.parameters(), lr=1e-2, master_dtype="float32")
    ints = torch.nn.Parameter(torch.zeros(3, dtype=torch.int16), requires_grad=False)
    with pytest.raises(TypeError, match=r"has dtype torch.int16; flatopt.torch supports float32"):
        ft.SGD([ints], lr=1e-2, master_dtype=torch.float32)
    assert [p.data_ptr() for p in m16.parameters()] == ptrs  # nothing rebound
    assert all(torch.equal(bits(p), b) for p, b in zip(m16.parameters(), before))


def test_mixed_dtypes_in_one_model():
    """bf16 weights beside float32 ones (a float32 norm layer, say): one bucket each; the
    float32 ones have no master and step as usual."""
    torch.manual_seed(0)
    w16 = torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
    w32 = torch.nn.Parameter(torch.randn(4))
    r16 = torch.nn.Parameter(w16.detach().float().clone())
    r32 = torch.nn.Parameter(w32.detach().clone())
    opt = ft.Adam([w16, w32], lr=1e-2, master_dtype=torch.float32)
    ref = ft.Adam([r16, r32], lr=1e-2)
    for s in range(10):
        for o in (opt, ref):
            o.zero_grad()
        (w16.float().square().sum() + w32.square().sum() * s).backward()
        r16.grad, r32.grad = w16.grad.float(), w32.grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(bits(w16), bits(r16.detach().to(torch.bfloat16)))
    assert torch.equal(w32, r32)
    assert "master_param" not in opt.state[w32]


def reconciled(master, half16):
    """The master after other code wrote 16-bit weights ``half16`` (flatopt.torch's rule):
    kept where it still rounds to them, the weights widened elsewhere."""
    keep = bits(master.to(half16.dtype)) == bits(half16)
    return torch.where(keep, master, half16.float())


@pytest.mark.parametrize("half", HALF, ids=["bf16", "fp16"])
def test_weights_written_by_other_code_are_stepped_from(half):
    """model.load_state_dict() or an in-place edit after the optimizer exists: the next
    step starts from the new 16-bit weights, as torch.optim's would (it used to rewrite
    them from the stale master: the edit was silently undone)."""
    m16, m32, flat, ref, batches = adam_pair(half, 12, 6)
    m16.load_state_dict(models(half, seed=3)[0].state_dict())
    with torch.no_grad():
        m16.b.weight[0].mul_(0)
    changed = 0
    with torch.no_grad():
        for p16, p32 in zip(m16.parameters(), m32.parameters()):
            new = reconciled(p32.detach(), p16.detach())
            changed += int((new != p32).sum())
            p32.copy_(new)
    assert changed > 100  # the reference moved: the edits were real
    for s, (x, y) in enumerate(batches[6:], start=6):
        step_pair(m16, m32, flat, ref, x, y, s)
    assert_matches(m16, m32, flat, half)


@pytest.mark.parametrize("half", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("model_first", [True, False], ids=["model-first", "optimizer-first"])
def test_resumes_exactly_whichever_is_loaded_first(half, model_first):
    """torch.optim does not care whether the model or the optimizer is loaded first; nor
    does flatopt: the loaded master is kept where it rounds to the loaded weights."""
    m16, m32, flat, ref, batches = adam_pair(half, 30, 15)
    saved_model = copy.deepcopy(m16.state_dict())
    saved = pickle.loads(pickle.dumps(flat.state_dict()))
    m16b = models(half, seed=7)[0]  # other weights until the checkpoint is loaded
    resumed = ft.Adam(m16b.parameters(), lr=1e-2, master_dtype=torch.float32)
    if model_first:
        m16b.load_state_dict(saved_model)
        resumed.load_state_dict(saved)
    else:
        resumed.load_state_dict(saved)
        m16b.load_state_dict(saved_model)
    for s, (x, y) in enumerate(batches[15:], start=15):
        step_pair(m16, m32, flat, ref, x, y, s)
        step_alone(m16b, resumed, x, y, s)
    assert_matches(m16b, m32, resumed, half)


def test_a_master_that_went_through_torch_optim_is_reconciled():
    """flatopt -> torch.optim -> flatopt: torch.optim carries the master_param entry along
    (cast to bf16) without updating it; the weights it trained win over that stale master."""
    half = torch.bfloat16
    m16, _ = models(half)
    flat = ft.Adam(m16.parameters(), lr=1e-2, master_dtype=torch.float32)
    batches = data(16)
    for s, (x, y) in enumerate(batches[:5]):
        step_alone(m16, flat, x, y, s)
    plain = torch.optim.Adam(m16.parameters(), lr=1e-2)
    plain.load_state_dict(flat.state_dict())
    for s, (x, y) in enumerate(batches[5:15], start=5):
        step_alone(m16, plain, x, y, s)
    checkpoint = plain.state_dict()
    assert checkpoint["state"][0]["master_param"].dtype == half  # carried along, stale
    m32 = copy.deepcopy(m16).float()
    resumed = ft.Adam(m16.parameters(), lr=1e-2, master_dtype=torch.float32)
    resumed.load_state_dict(checkpoint)
    ref = ft.Adam(m32.parameters(), lr=1e-2)  # from the trained weights, widened
    ref.load_state_dict(checkpoint)
    step_pair(m16, m32, resumed, ref, *batches[15], 15)
    assert_matches(m16, m32, resumed, half)


def test_sgd_momentum_of_a_parameter_not_yet_stepped_is_not_history():
    """A parameter without a gradient so far has an entry for its master only: a zero
    momentum_buffer in it would make its first step after a reload (or a deepcopy, or an
    add_param_group) use ``momentum*0 + (1-dampening)*g`` instead of torch's ``g``."""
    half = torch.bfloat16
    m16, m32 = models(half)
    kwargs = dict(lr=0.05, momentum=0.9, dampening=0.5)
    flat = ft.SGD(m16.parameters(), **kwargs, master_dtype=torch.float32)
    ref = ft.SGD(m32.parameters(), **kwargs)
    batches = data(6)
    step_pair(m16, m32, flat, ref, *batches[0], 0)  # step 0: no gradient for m16.extra
    assert set(flat.state[m16.extra]) == {"master_param"}
    assert m32.extra not in ref.state
    for how in ("load", "deepcopy"):
        if how == "load":
            m16b = copy.deepcopy(m16)
            resumed = ft.SGD(m16b.parameters(), **kwargs, master_dtype=torch.float32)
            resumed.load_state_dict(flat.state_dict())
        else:
            m16b, resumed = copy.deepcopy((m16, flat))
        m32b = copy.deepcopy(m32)
        refb = ft.SGD(m32b.parameters(), **kwargs)
        refb.load_state_dict(ref.state_dict())
        for s, (x, y) in enumerate(batches[1:], start=1):
            step_pair(m16b, m32b, resumed, refb, x, y, s)
        assert_matches(m16b, m32b, resumed, half)


def test_a_torch_checkpoint_loaded_before_the_model_steps_from_the_model():
    """torch.optim's checkpoint has no master: loaded before the model's weights, the
    master must still become those weights, not the ones the model had at load time."""
    half = torch.bfloat16
    m16 = models(half)[0]
    plain = torch.optim.Adam(m16.parameters(), lr=1e-2)
    batches = data(8)
    for s, (x, y) in enumerate(batches[:6]):
        step_alone(m16, plain, x, y, s)
    m16b = models(half, seed=7)[0]
    resumed = ft.Adam(m16b.parameters(), lr=1e-2, master_dtype=torch.float32)
    resumed.load_state_dict(plain.state_dict())
    m16b.load_state_dict(m16.state_dict())
    m32 = copy.deepcopy(m16).float()
    ref = ft.Adam(m32.parameters(), lr=1e-2)
    ref.load_state_dict(plain.state_dict())
    for s, (x, y) in enumerate(batches[6:], start=6):
        step_pair(m16b, m32, resumed, ref, x, y, s)
    assert_matches(m16b, m32, resumed, half)


def test_a_master_edited_before_the_first_step_is_kept():
    """No 16-bit weight was written: an edit of the live master stands (the first step
    took every master for stale and replaced it by the weights)."""
    half = torch.bfloat16
    m16 = models(half)[0]
    opt = ft.SGD(m16.parameters(), lr=0.0, master_dtype=torch.float32)
    new = torch.randn(m16.a.weight.shape)
    opt.state[m16.a.weight]["master_param"].copy_(new)
    step_alone(m16, opt, *data(1)[0], 1)
    assert torch.equal(opt.state[m16.a.weight]["master_param"], new)
    assert torch.equal(bits(m16.a.weight), bits(new.to(half)))


@pytest.mark.parametrize("action", ["state-entry", "state-pop", "add-param-group", "deepcopy", "pickle"])
def test_a_write_survives_a_reinstall_of_the_state(action):
    """Between a write to the 16-bit weights and the next step, every way the state is
    installed again (an opt.state edit, add_param_group, a copy) keeps the write pending:
    the next step starts from the written weights."""
    half = torch.bfloat16
    m16 = models(half)[0]
    opt = ft.SGD(m16.parameters(), lr=0.0, momentum=0.9, master_dtype=torch.float32)
    step_alone(m16, opt, *data(1)[0], 1)
    with torch.no_grad():
        m16.a.weight.fill_(0.5)
    if action == "state-entry":
        opt.state[m16.b.bias] = {"momentum_buffer": torch.zeros(3)}
    elif action == "state-pop":
        opt.state.pop(m16.b.bias)
    elif action == "add-param-group":
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=half))]})
    else:
        m16, opt = (copy.deepcopy((m16, opt)) if action == "deepcopy"
                    else pickle.loads(pickle.dumps((m16, opt))))
    step_alone(m16, opt, *data(1)[0], 1)
    assert bool((m16.a.weight == 0.5).all())
    assert bool((opt.state[m16.a.weight]["master_param"] == 0.5).all())


@pytest.mark.parametrize("action", ["add-param-group", "deepcopy"])
def test_data_replaced_before_a_repack_is_stepped_from(action):
    """``p.data`` replaced (no version counter sees it), then add_param_group or a copy,
    which rebind the parameters: the new values are where the next step starts, as in
    torch.optim (the master was carried over as if it still agreed with them)."""
    half = torch.bfloat16
    m16 = models(half)[0]
    opt = ft.SGD(m16.parameters(), lr=0.0, master_dtype=torch.float32)
    step_alone(m16, opt, *data(1)[0], 1)
    m16.a.weight.data = torch.full_like(m16.a.weight, 0.5)
    if action == "add-param-group":
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=half))]})
    else:
        m16, opt = copy.deepcopy((m16, opt))
    step_alone(m16, opt, *data(1)[0], 1)
    assert bool((m16.a.weight == 0.5).all())


# Edits of a parameter's whole entry (resetting a layer's optimizer history). The master
# is the parameter's weights, not its history: torch, with no master, keeps the weights.
ENTRY_EDITS = {
    "del": lambda opt, p, saved: opt.state.__delitem__(p),
    "assign-empty": lambda opt, p, saved: opt.state.__setitem__(p, {}),
    "clear": lambda opt, p, saved: opt.state.clear(),
    "assign-saved": lambda opt, p, saved: opt.state.__setitem__(
        p, {k: v for k, v in saved.items() if k != "master_param"}),
}


@pytest.mark.parametrize("edit", ENTRY_EDITS)
@pytest.mark.parametrize("half", HALF, ids=["bf16", "fp16"])
def test_an_entry_edit_restarts_the_history_and_keeps_the_master(half, edit):
    """The same edit on the float32 reference's entry: the 16-bit weights and masters stay
    bit for bit the reference's (an edit used to round the master to the 16-bit weights)."""
    m16, m32, flat, ref, batches = adam_pair(half, 16, 3)
    saved = [{k: v.clone() for k, v in o.state[m.a.weight].items()} for o, m in ((flat, m16), (ref, m32))]
    for s, (x, y) in enumerate(batches[3:8], start=3):
        step_pair(m16, m32, flat, ref, x, y, s)
    for o, m, kept in ((flat, m16, saved[0]), (ref, m32, saved[1])):
        ENTRY_EDITS[edit](o, m.a.weight, kept)
    assert_matches(m16, m32, flat, half)
    for s, (x, y) in enumerate(batches[8:], start=8):
        step_pair(m16, m32, flat, ref, x, y, s)
    assert_matches(m16, m32, flat, half)


@pytest.mark.parametrize("half", HALF, ids=["bf16", "fp16"])
def test_an_assigned_master_meets_the_weights_as_a_loaded_one(half):
    """An entry assigned with its own master (a layer's entry rewound, weights not): as a
    checkpoint's, the master is kept where it rounds to today's weights and is the weights
    elsewhere; the state is the entry's."""
    m16, m32, flat, ref, batches = adam_pair(half, 16, 3)
    saved = {k: v.clone() for k, v in flat.state[m16.a.weight].items()}
    saved_ref = {k: v.clone() for k, v in ref.state[m32.a.weight].items()}
    for s, (x, y) in enumerate(batches[3:8], start=3):
        step_pair(m16, m32, flat, ref, x, y, s)
    flat.state[m16.a.weight] = saved
    ref.state[m32.a.weight] = saved_ref
    with torch.no_grad():
        m32.a.weight.copy_(reconciled(saved["master_param"], m16.a.weight.detach()))
    assert not torch.equal(m32.a.weight, saved["master_param"])  # both rules matter here
    for s, (x, y) in enumerate(batches[8:], start=8):
        step_pair(m16, m32, flat, ref, x, y, s)
    assert_matches(m16, m32, flat, half)


def test_a_mixed_checkpoint_keeps_its_master_in_an_optimizer_without_one():
    """Loaded into float32 parameters, a mixed checkpoint's "master_param" is kept as an
    entry's other keys are, as torch.optim keeps it, and saved again."""
    m16 = models(torch.bfloat16)[0]
    opt = ft.Adam(m16.parameters(), lr=1e-2, master_dtype=torch.float32)
    step_alone(m16, opt, *data(1)[0], 1)
    saved = opt.state_dict()
    for cls in (ft.Adam, torch.optim.Adam):
        m32 = copy.deepcopy(m16).float()
        other = cls(m32.parameters(), lr=1e-2)
        other.load_state_dict(copy.deepcopy(saved))
        resaved = other.state_dict()["state"]
        assert all("master_param" in e for e in resaved.values()), cls
        assert torch.equal(resaved[0]["master_param"], saved["state"][0]["master_param"])


def test_a_group_may_repeat_the_optimizers_master_dtype():
    """torch's ZeroRedundancyOptimizer gives each local group its defaults, master_dtype
    among them: a group's master_dtype equal to the optimizer's is accepted (in the
    constructor and add_param_group), another is refused by name, nothing changed."""
    a, b = (torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16)) for _ in range(2))
    opt = ft.Adam([{"params": [a], "master_dtype": torch.float32}], master_dtype=torch.float32)
    opt.add_param_group({"params": [b], "master_dtype": torch.float32})
    with pytest.raises(ValueError, match=r"param_groups\[2\]: master_dtype=None differs from the optimizer's"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "master_dtype": None})
    assert len(opt.param_groups) == 2
    with pytest.raises(ValueError, match="master_dtype=torch.float32 differs"):
        ft.Adam([{"params": [torch.nn.Parameter(torch.ones(2))], "master_dtype": torch.float32}])


def test_a_checkpoint_whose_groups_hold_master_dtype_loads_anywhere():
    """torch's ZeroRedundancyOptimizer saves its defaults, master_dtype and n_threads among
    them, in every group: they are the optimizer's own, not the checkpoint's, so any
    flatopt.torch optimizer loads it (torch.optim does)."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = ft.Adam([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group.update(master_dtype=torch.float32, n_threads=1)
    for cls in (ft.Adam, torch.optim.Adam):
        other = cls([torch.nn.Parameter(torch.ones(3))], lr=0.1)
        other.load_state_dict(copy.deepcopy(saved))
        assert torch.equal(other.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])
        if cls is ft.Adam:
            assert "master_dtype" not in other.param_groups[0]

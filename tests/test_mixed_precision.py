"""Mixed precision: float16/bfloat16 parameters with float32 master weights (issue 13).

The reference is independent of flatopt's conversion kernels: the float32 NumPy
optimizer run on the same float32 master with float32 gradients widened from the same
16-bit gradients (by torch, or ml_dtypes/NumPy without torch), followed by torch's cast
of the master to 16 bits. The mixed step must match it bit for bit, master and 16-bit
parameters, for every optimizer, size, block boundary and thread count.
"""

import copy
import pickle

import numpy as np
import pytest

import flatopt
import flatopt.keras as K
from flatopt._dispatch import kernels
from flatopt._kernels import PARALLEL_THRESHOLD

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # optional dependency: the bfloat16 tests skip
    ml_dtypes = BF16 = None

try:
    import torch
except ImportError:
    torch = None

HALF = [pytest.param("fp16", id="fp16"),
        pytest.param("bf16", id="bf16",
                     marks=pytest.mark.skipif(BF16 is None, reason="ml_dtypes not installed"))]
SIZES = [0, 1, 7, 4097, PARALLEL_THRESHOLD - 1, PARALLEL_THRESHOLD + 1, 2**17 + 3]


def half_dtype(name):
    return np.dtype(np.float16) if name == "fp16" else BF16


def kind_of(name):
    return kernels.KIND_FP16 if name == "fp16" else kernels.KIND_BF16


def torch_dtype(name):
    return torch.float16 if name == "fp16" else torch.bfloat16


# -- the independent reference conversions ------------------------------------------------
def contiguous(a):
    """``a`` as a C-contiguous array of the same shape (np.ascontiguousarray makes 0-d 1-d)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous and a.flags.writeable else a.copy()


def widen_ref(x16, name):
    """float32 values of a 16-bit array (exact either way)."""
    if torch is not None:
        t = torch.from_numpy(contiguous(x16).view(np.int16)).view(torch_dtype(name))
        return t.to(torch.float32).numpy()
    return np.asarray(x16).astype(np.float32)


def narrow_ref(x32, name):
    """Bit patterns (uint16) of ``x32`` cast to 16 bits: torch's cast, else ml_dtypes' or
    NumPy's ``astype`` (round-to-nearest-even too)."""
    x32 = contiguous(np.asarray(x32, dtype=np.float32))
    if torch is not None:
        return torch.from_numpy(x32).to(torch_dtype(name)).view(torch.int16).numpy().view(np.uint16)
    return x32.astype(half_dtype(name)).view(np.uint16)


def bits(a):
    return contiguous(a).view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


# -- every optimizer ------------------------------------------------------------------------
CASES = [
    ("SGD", flatopt.SGD, dict(lr=0.01)),
    ("SGD-nesterov", flatopt.SGD, dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("SGD-dampening", flatopt.SGD, dict(lr=0.01, momentum=0.9, dampening=0.5)),
    ("Momentum", flatopt.Momentum, dict(lr=0.01, weight_decay=0.01)),
    ("Adam", flatopt.Adam, dict(lr=1e-2, weight_decay=0.01)),
    ("Adam-amsgrad", flatopt.Adam, dict(lr=1e-2, amsgrad=True, maximize=True)),
    ("AdamW", flatopt.AdamW, dict(lr=1e-2)),
    ("RMSprop", flatopt.RMSprop, dict(lr=1e-2, momentum=0.9, centered=True)),
    ("Adadelta", flatopt.Adadelta, dict(weight_decay=0.01)),
    ("Adagrad", flatopt.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    ("NAdam", flatopt.NAdam, dict(lr=1e-2)),
    ("NAdam-decoupled", flatopt.NAdam, dict(weight_decay=0.01, decoupled_weight_decay=True)),
    ("RAdam", flatopt.RAdam, dict(lr=1e-2)),
    ("Adamax", flatopt.Adamax, dict(weight_decay=0.01)),
    ("Lion", flatopt.Lion, dict(lr=1e-3, weight_decay=0.1)),
    ("keras.SGD", K.SGD, dict(learning_rate=0.01, momentum=0.9, nesterov=True)),
    ("keras.Adam", K.Adam, dict(amsgrad=True)),
    ("keras.AdamW", K.AdamW, {}),
    ("keras.RMSprop", K.RMSprop, dict(momentum=0.5, centered=True, weight_decay=0.01)),
    ("keras.Adadelta", K.Adadelta, dict(learning_rate=1.0, weight_decay=0.01)),
    ("keras.Adagrad", K.Adagrad, dict(learning_rate=0.1)),
    ("keras.Adamax", K.Adamax, {}),
    ("keras.Nadam", K.Nadam, {}),
    ("keras.Lion", K.Lion, dict(weight_decay=0.01)),
]
CASE_IDS = [c[0] for c in CASES]
ADAM = ("Adam", flatopt.Adam, dict(lr=1e-2, weight_decay=0.01))


def make_params(rng, shapes, name):
    return [np.asarray(rng.standard_normal(s), np.float32).astype(half_dtype(name)) for s in shapes]


def make_grads(rng, shapes, name, scale=1e-1):
    return [np.asarray(rng.standard_normal(s) * scale, np.float32).astype(half_dtype(name))
            for s in shapes]


def make_pair(case, params16, name, n_threads, groups=None):
    """(mixed optimizer on the 16-bit params, float32 reference on their widened values)."""
    _, cls, kwargs = case
    masters = [widen_ref(p, name) for p in params16]
    if groups is None:
        opt = cls(params16, **kwargs, master_dtype=np.float32, n_threads=n_threads)
        ref = cls(masters, **kwargs, n_threads=1)
    else:  # groups: a list of (slice of params, overrides)
        opt = cls([{"params": params16[sl], **o} for sl, o in groups], **kwargs,
                  master_dtype=np.float32, n_threads=n_threads)
        ref = cls([{"params": masters[sl], **o} for sl, o in groups], **kwargs, n_threads=1)
    return opt, ref


def step_both(opt, ref, grads16, name, **kwargs):
    taken = opt.step(grads16, **kwargs)
    assert ref.step([widen_ref(g, name) for g in grads16], **kwargs) == taken
    return taken


def assert_same(opt, ref, name):
    assert opt.master_params.dtype == np.float32
    np.testing.assert_array_equal(bits(opt.master_params), bits(ref.flat_params))
    np.testing.assert_array_equal(bits(opt.flat_params), narrow_ref(ref.flat_params, name))
    for p, r in zip(opt.params, ref.params):  # the views the model uses
        assert p.dtype == half_dtype(name) and p.shape == r.shape
    for key, value in ref.state.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(bits(opt.state[key]), bits(value), err_msg=key)
        else:
            assert opt.state[key] == value, key


# -- the conversion kernels against torch's casts -------------------------------------------
def awkward_f32():
    """float32 bit patterns where rounding to 16 bits is hard: ties, overflow, subnormals."""
    rng = np.random.default_rng(1)
    special = [0x00000000, 0x00000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000,
               0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x3F800000, 0x3F808000, 0x3F818000,
               0x3F807FFF, 0x3F808001]
    around = [0x33000000, 0x33800000, 0x387FC000, 0x38800000, 0x477FE000, 0x477FF000,
              0x47800000, 0x7F7F8000, 0x7F7F7FFF, 0x7F7FC000, 0x00010000, 0x00008000]
    u = np.concatenate([
        np.array(special, np.uint32),
        *[np.arange(c - 300, c + 300, dtype=np.int64).astype(np.uint32) for c in around],
        # every tie and near-tie for both formats: low 13/16 bits at the half-way points
        (rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32) & ~np.uint32(0x1FFF))
        | np.uint32(0x1000),
        (rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32) & ~np.uint32(0xFFFF))
        | np.uint32(0x8000),
        rng.integers(0, 2**32, 200000, dtype=np.uint64).astype(np.uint32),
    ])
    return np.concatenate([u, u | np.uint32(0x80000000)])


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("name", HALF)
def test_narrow16_matches_torch_cast(name, n_threads):
    u = awkward_f32()
    out = np.full(u.shape[0], 0xABCD, np.uint16)
    kernels.narrow16(u, out, kind_of(name), n_threads)
    ref = narrow_ref(u.view(np.float32), name)
    nan = np.isnan(u.view(np.float32))
    assert nan.sum() > 100
    np.testing.assert_array_equal(out[~nan], ref[~nan])
    # NaN stays NaN. torch's own bits for NaN differ between its scalar and vector paths
    # (bfloat16: 0x7FC0 vs 0xFFFF; float16: 0x7E00 vs the payload kept). flatopt gives
    # bfloat16 c10's scalar 0x7FC0, and float16 what F16C's vcvtps2ph gives (the avx2 and
    # avx512 builds use it; the baseline build computes the same bits): the sign, quiet,
    # and the payload's top 10 bits.
    if name == "bf16":
        expected_nan = np.uint16(0x7FC0)
    else:
        expected_nan = ((u[nan] >> 16) & 0x8000 | 0x7E00 | (u[nan] >> 13) & 0x3FF).astype(np.uint16)
    np.testing.assert_array_equal(out[nan], expected_nan)
    assert np.isnan(out[nan].view(half_dtype(name)).astype(np.float32)).all()


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("name", HALF)
def test_widen16_is_exact_for_every_16_bit_pattern(name):
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    for n_threads in (1, 2):
        out = np.zeros(2**16 + 5, np.uint32)  # out may be longer
        kernels.widen16(every, out, kind_of(name), n_threads)
        np.testing.assert_array_equal(out[:2**16], bits(widen_ref(every.view(half_dtype(name)), name)))
        assert not out[2**16:].any()
    # and narrowing what was widened gives the pattern back (NaNs made quiet)
    back = np.empty(2**16, np.uint16)
    kernels.narrow16(out[:2**16], back, kind_of(name), 1)
    finite = ~np.isnan(every.view(half_dtype(name)).astype(np.float32))
    np.testing.assert_array_equal(back[finite], every[finite])


@pytest.mark.parametrize("name", HALF)
def test_count_nonfinite16(name):
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    expected = int((~np.isfinite(every.view(half_dtype(name)).astype(np.float32))).sum())
    big = np.tile(every, 2)
    for n_threads in (1, 2):
        assert kernels.count_nonfinite16(every, kind_of(name), n_threads) == expected
        assert kernels.count_nonfinite16(big, kind_of(name), n_threads) == 2 * expected


# -- every optimizer, 200 steps ------------------------------------------------------------------
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("name", HALF)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_200_steps_match_float32_optimizer_then_cast(case, name, n_threads):
    rng = np.random.default_rng(13)
    shapes = [(3, 7), (4097,), (), (0,), (PARALLEL_THRESHOLD + 5,)]
    opt, ref = make_pair(case, make_params(rng, shapes, name), name, n_threads)
    np.testing.assert_array_equal(bits(opt.master_params), bits(ref.flat_params))
    for t in range(200):
        grads = make_grads(rng, shapes, name)
        if t % 2:  # the model writes into opt.grads
            for view, g in zip(opt.grads, grads):
                view[...] = g
            assert opt.step() is True
            ref.step([widen_ref(g, name) for g in grads])
        else:
            step_both(opt, ref, grads, name)
        if t in (0, 199):
            assert_same(opt, ref, name)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("name", HALF)
@pytest.mark.parametrize("size", SIZES, ids=[f"n{n}" for n in SIZES])
@pytest.mark.parametrize("case", [ADAM, CASES[1], CASES[10]], ids=["Adam", "SGD-nesterov", "NAdam"])
def test_sizes_and_block_boundaries(case, name, size, n_threads):
    rng = np.random.default_rng(size)
    shapes = [(size,)]
    opt, ref = make_pair(case, make_params(rng, shapes, name), name, n_threads)
    for _ in range(5):
        step_both(opt, ref, make_grads(rng, shapes, name), name)
    assert_same(opt, ref, name)


@pytest.mark.parametrize("name", HALF)
@pytest.mark.parametrize("case", [CASES[1], CASES[10], CASES[-2]], ids=["SGD", "NAdam", "keras.Nadam"])
def test_pieces_and_groups(case, name):
    """Groups of sizes around the kernels' pieces (1024 elements), per-group step state
    (SGD's first-step flags, NAdam's running products) advanced once per step."""
    rng = np.random.default_rng(5)
    shapes = [(2500,), (999,), (1,), (4001,)]
    lr_key = "learning_rate" if case[0].startswith("keras") else "lr"
    groups = [(slice(0, 2), {lr_key: 0.02}), (slice(2, 3), {}), (slice(3, 4), {lr_key: 0.005})]
    for n_threads in (1, 2):
        opt, ref = make_pair(case, make_params(rng, shapes, name), name, n_threads, groups)
        for _ in range(20):
            step_both(opt, ref, make_grads(rng, shapes, name), name)
        assert_same(opt, ref, name)


# -- loss scaling, skipping, clipping -----------------------------------------------------------
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("name", HALF)
def test_nonfinite_16_bit_grad_skips_bit_identically(name, bad):
    rng = np.random.default_rng(2)
    shapes = [(PARALLEL_THRESHOLD + 9,), (5,)]
    opt, ref = make_pair(ADAM, make_params(rng, shapes, name), name, 2)
    for _ in range(3):
        step_both(opt, ref, make_grads(rng, shapes, name, scale=1024.0), name,
                  grad_scale=1 / 1024, skip_if_nonfinite=True)
    before = [opt.master_params.copy(), opt.flat_params.copy()] + [
        v.copy() for v in opt.state.values() if isinstance(v, np.ndarray)]
    grads = make_grads(rng, shapes, name, scale=1024.0)
    grads[0][PARALLEL_THRESHOLD] = bad
    assert opt.step(grads, grad_scale=1 / 1024, skip_if_nonfinite=True) is False
    after = [opt.master_params, opt.flat_params] + [
        v for v in opt.state.values() if isinstance(v, np.ndarray)]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(bits(a), bits(b))
    assert opt.skipped_steps == 1 and opt.state["step"] == 3
    # 65520 overflows float16: a large finite float32 gradient becomes inf and is skipped too
    step_both(opt, ref, make_grads(rng, shapes, name, scale=1024.0), name,
              grad_scale=1 / 1024, skip_if_nonfinite=True)
    assert_same(opt, ref, name)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("name", HALF)
def test_grad_norm_and_clipping_read_the_16_bit_grads(name, n_threads):
    rng = np.random.default_rng(3)
    shapes = [(2**17 + 3,), (3, 3)]
    opt, ref = make_pair(ADAM, make_params(rng, shapes, name), name, n_threads)
    for norm_type in (2.0, 1.0, np.inf, 3.0):
        grads = make_grads(rng, shapes, name)
        for view, r, g in zip(opt.grads, ref.grads, grads):
            view[...] = g
            r[...] = widen_ref(g, name)
        assert opt.grad_norm(norm_type) == ref.grad_norm(norm_type)
        assert opt.clip_grad_norm_(0.5, norm_type) == ref.clip_grad_norm_(0.5, norm_type)
        opt.step()
        ref.step()
        assert_same(opt, ref, name)


# -- checkpoints, copies, adoption --------------------------------------------------------------
@pytest.mark.parametrize("name", HALF)
@pytest.mark.parametrize("case", [ADAM, CASES[10], CASES[-2]], ids=["Adam", "NAdam", "keras.Nadam"])
def test_state_dict_round_trip_is_bit_exact(case, name):
    rng = np.random.default_rng(4)
    shapes = [(4097,), (2, 3)]
    params = make_params(rng, shapes, name)
    opt = case[1](params, **case[2], master_dtype=np.float32)
    grads = [make_grads(rng, shapes, name) for _ in range(100)]
    for g in grads[:50]:
        opt.step(g)
    sd = pickle.loads(pickle.dumps(opt.state_dict()))
    assert sd["master_params"].dtype == np.float32
    np.testing.assert_array_equal(bits(sd["master_params"]), bits(opt.master_params))
    # a fresh optimizer (other starting params) loads it: master restored, 16-bit params
    # rewritten from it
    other = case[1](make_params(rng, shapes, name), **case[2], master_dtype=np.float32)
    other.load_state_dict(sd)
    np.testing.assert_array_equal(bits(other.master_params), bits(opt.master_params))
    np.testing.assert_array_equal(bits(other.flat_params), bits(opt.flat_params))
    twin = copy.deepcopy(opt)
    for g in grads[50:]:
        opt.step(g)
        other.step(g)
        twin.step(g)
    for o in (other, twin):
        np.testing.assert_array_equal(bits(o.master_params), bits(opt.master_params))
        np.testing.assert_array_equal(bits(o.flat_params), bits(opt.flat_params))
        for key, value in opt.state.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(bits(o.state[key]), bits(value))
            else:
                assert o.state[key] == value
        assert all(p.base is not None and np.shares_memory(p, o.flat_params) for p in o.params)


@pytest.mark.parametrize("name", HALF)
def test_load_state_dict_checks_the_master_before_writing(name):
    rng = np.random.default_rng(6)
    opt = flatopt.Adam(make_params(rng, [(10,)], name), master_dtype=np.float32)
    opt.step(make_grads(rng, [(10,)], name))
    sd = opt.state_dict()
    before = [opt.master_params.copy(), opt.flat_params.copy()]
    for bad, exc in [(sd["master_params"][:5], ValueError),
                     (sd["master_params"].astype(np.float64), TypeError)]:
        with pytest.raises(exc, match="master_params"):
            opt.load_state_dict({**sd, "master_params": bad})
    plain = {k: v for k, v in sd.items() if k not in ("master_params", "params_dtype")}
    with pytest.raises(ValueError, match="saved by an optimizer without master_dtype"):
        opt.load_state_dict(plain)
    mine = half_dtype(name).name
    other = "float16" if mine == "bfloat16" else "bfloat16"
    # The other 16-bit format: the master would round to other values (1e6 is inf in float16).
    with pytest.raises(ValueError, match=f"saved with '{other}' parameters; this optimizer's are {mine}"):
        opt.load_state_dict({**sd, "params_dtype": other})
    np.testing.assert_array_equal(bits(opt.master_params), bits(before[0]))
    np.testing.assert_array_equal(bits(opt.flat_params), bits(before[1]))
    # and a mixed optimizer's state dict refused by a float32 one, saying why
    single = flatopt.Adam([np.zeros(10, np.float32)])
    single.step([np.ones(10, np.float32)])
    with pytest.raises(ValueError, match="saved by an optimizer with master_dtype"):
        single.load_state_dict(sd)
    assert sd["params_dtype"] == mine
    # saved before the 16-bit dtype was recorded: loads (unchecked), as it did
    old = {k: v for k, v in sd.items() if k != "params_dtype"}
    opt.load_state_dict(old)
    np.testing.assert_array_equal(bits(opt.master_params), bits(sd["master_params"]))


@pytest.mark.parametrize("name", HALF)
def test_adopt_updates_the_callers_16_bit_arrays(name):
    rng = np.random.default_rng(7)
    flat = np.zeros(30, half_dtype(name))
    flat[...] = make_params(rng, [(30,)], name)[0]
    views = [flat[:10].reshape(2, 5), flat[10:]]
    opt, ref = make_pair(ADAM, views, name, 1)
    opt2 = flatopt.Adam(views, **ADAM[2], master_dtype=np.float32, adopt=True)
    assert opt2.adopted and np.shares_memory(opt2.flat_params, flat)
    for _ in range(3):
        grads = make_grads(rng, [(2, 5), (20,)], name)
        step_both(opt, ref, grads, name)
        opt2.step(grads)
    np.testing.assert_array_equal(bits(flat), bits(opt.flat_params))
    assert_same(opt, ref, name)


def test_float32_params_have_no_master():
    opt = flatopt.Adam([np.zeros(3, np.float32)])
    assert opt.master_params is None and "master_params" not in opt.state_dict()


# -- bad input: a clear error naming the argument, nothing written ---------------------------
def _bad_cases():
    f16 = np.ones(4, np.float16)
    cases = [
        ([np.ones(4, np.int16)], dict(master_dtype=np.float32), TypeError, r"params\[0\].*int16"),
        ([np.ones(4, np.int16)], {}, TypeError, r"params\[0\].*int16"),
        ([f16], {}, TypeError, r"master_dtype=np.float32 \(or dtype=np.float32 to train float32 copies"),
        ([f16], dict(master_dtype=np.float16), TypeError, "master_dtype must be np.float32"),
        ([f16], dict(master_dtype=np.float64), TypeError, "master_dtype must be np.float32"),
        ([f16], dict(master_dtype="not a dtype"), TypeError, "master_dtype"),
        ([f16], dict(master_dtype=np.float32, dtype=np.float32), TypeError, "master_dtype"),
        ([np.ones(4, np.float32)], dict(master_dtype=np.float32), TypeError,
         r"params\[0\].*float32.*master_dtype"),
        ([f16, np.ones(4, np.float64)], dict(master_dtype=np.float32), TypeError,
         r"params\[1\].*float64.*master_dtype"),
    ]
    if BF16 is not None:
        cases.append(([f16, np.ones(4, BF16)], dict(master_dtype=np.float32), TypeError,
                      "share one 16-bit dtype.*bfloat16.*float16"))
        cases.append(([np.ones(4, BF16)], {}, TypeError, "bfloat16.*master_dtype"))
    return cases


@pytest.mark.parametrize("params, kwargs, exc, match", _bad_cases())
def test_bad_construction_raises_naming_the_argument(params, kwargs, exc, match):
    copies = [p.copy() for p in params]
    with pytest.raises(exc, match=match):
        flatopt.Adam(params, **kwargs)
    for p, c in zip(params, copies):
        np.testing.assert_array_equal(p.view(np.uint8), c.view(np.uint8))


@pytest.mark.parametrize("name", HALF)
def test_dtype_converts_16_bit_params_as_any_real_arrays(name):
    """dtype=np.float32 trains float32 copies (as it converts int32 or float64 arrays);
    flatten converts them too. The values are the 16-bit ones, exactly widened."""
    rng = np.random.default_rng(12)
    params = make_params(rng, [(3, 2), (5,)], name)
    opt = flatopt.Adam(params, dtype=np.float32)
    assert opt.master_params is None and opt.flat_params.dtype == np.float32
    widened = np.concatenate([p.astype(np.float32).ravel() for p in params])
    np.testing.assert_array_equal(bits(opt.flat_params), bits(widened))
    flat, _ = flatopt.flatten(params, dtype=np.float64)
    np.testing.assert_array_equal(flat, widened.astype(np.float64), strict=True)


@pytest.mark.parametrize("name", HALF)
def test_grads_list_of_the_other_16_bit_format_is_converted(name):
    """A list of gradients is copied into the 16-bit flat_grads, converted (rounded) to
    its dtype as NumPy casts, bfloat16 included."""
    other = "bf16" if name == "fp16" else "fp16"
    if BF16 is None:
        pytest.skip("ml_dtypes not installed")
    rng = np.random.default_rng(13)
    opt = flatopt.Adam(make_params(rng, [(6,)], name), master_dtype=np.float32)
    twin = copy.deepcopy(opt)
    g = make_grads(rng, [(6,)], other)[0]
    opt.step([g])
    twin.step(g.astype(np.float32).astype(half_dtype(name)))
    np.testing.assert_array_equal(bits(opt.master_params), bits(twin.master_params))


@pytest.mark.parametrize("name", HALF)
def test_adopting_16_bit_params_explains_without_pointing_at_flatten(name):
    rng = np.random.default_rng(14)
    params = make_params(rng, [(3,), (4,)], name)
    with pytest.raises(ValueError, match="not back-to-back views of one flat buffer, in order. Pass adopt=False"):
        flatopt.Adam(params, master_dtype=np.float32, adopt=True)


@pytest.mark.parametrize("name", HALF)
def test_bad_grads_raise_before_writing(name):
    rng = np.random.default_rng(8)
    opt = flatopt.Adam(make_params(rng, [(6,)], name), master_dtype=np.float32)
    before = [opt.master_params.copy(), opt.flat_params.copy()]
    for grads, exc, match in [
        (np.zeros(6, np.float32), TypeError, "grads must have dtype"),
        (np.zeros(5, half_dtype(name)), ValueError, "length 6"),
        (np.zeros((2, 3), half_dtype(name)), ValueError, "1-D"),
        ([np.zeros(6, np.int8).astype(object)], TypeError, r"grads\[0\]"),
        (opt.flat_params, ValueError, "share memory"),
    ]:
        with pytest.raises(exc, match=match):
            opt.step(grads)
    assert opt.state["step"] == 0
    np.testing.assert_array_equal(bits(opt.master_params), bits(before[0]))
    np.testing.assert_array_equal(bits(opt.flat_params), bits(before[1]))


def test_flat_16_bit_grads_are_read_directly():
    rng = np.random.default_rng(9)
    shapes = [(5,), (7,)]
    opt, ref = make_pair(ADAM, make_params(rng, shapes, "fp16"), "fp16", 1)
    g = make_grads(rng, [(12,)], "fp16")[0]
    g.flags.writeable = False
    opt.step(g)
    ref.step(widen_ref(g, "fp16"))
    assert_same(opt, ref, "fp16")
    assert not opt.flat_grads.any()  # read directly, not copied in



# -- runs of parameters (the step routine flatopt.torch drives) --------------------------------
@pytest.mark.parametrize("case", [c for c in CASES if not c[0].startswith("keras.")],
                         ids=[c[0] for c in CASES if not c[0].startswith("keras.")])
@pytest.mark.parametrize("name", HALF)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_runs_match_the_whole_group_step(case, name, n_threads):
    """The mixed step over runs (a group split in two at a parameter boundary, each run at
    the group's step, as flatopt.torch passes them) writes what the whole-group step
    writes, bit for bit."""
    rng = np.random.default_rng(5)
    shapes = [(3,), (65536 * n_threads + 5,), (7, 9)]
    params16 = make_params(rng, shapes, name)
    whole, _ = make_pair(case, [p.copy() for p in params16], name, n_threads)
    split, _ = make_pair(case, [p.copy() for p in params16], name, n_threads)
    cut = whole.layout.offsets[1]
    for step in range(1, 6):
        grads16 = make_grads(rng, shapes, name)
        assert whole.step(grads16)
        for view, g in zip(split.grads, grads16):
            view[...] = g
        grad_scale = split._begin_step(1.0, False)
        runs = [(0, 0, cut, step, step == 1), (0, cut, split.layout.size, step, step == 1)]
        # Per-group plain state (NAdam's running product) belongs to the caller for runs:
        # each run starts from the value before the step, as flatopt.torch's hook does.
        before = {k: copy.deepcopy(split._state[k]) for k in split._plain_state}

        def before_run(gi, group, count, before=before):
            for k, values in before.items():
                split._state[k][gi] = values[gi]
        assert split._finish_step(split.flat_grads, runs, grad_scale, False, n_threads,
                                  before_run)
        dict.__setitem__(split._state, "step", step)  # the caller keeps the counts
        np.testing.assert_array_equal(bits(split.master_params), bits(whole.master_params))
        np.testing.assert_array_equal(bits(split.flat_params), bits(whole.flat_params))
        for key, value in whole.state.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(split.state[key], value, err_msg=key)

"""A parallel kernel splits its range into chunks dealt round robin to the threads
(``_kernels.chunks``). Every element must be stepped exactly once whatever the split:
on buffers of several chunks a thread, every optimizer (the NumPy API, flatopt.keras,
flatopt.torch reading autograd's gradients in place, and with 16-bit parameters) gives
bit-identical results on 1, 2 and 3 threads. The one-thread run is the reference: it
steps the whole range in one serial call, and its formulas are tested against the NumPy
and torch references elsewhere."""

import numpy as np
import pytest

import flatopt
import flatopt.keras as fk
from flatopt import _kernels
from flatopt._kernels import CHUNK_ELEMENTS, PARALLEL_THRESHOLD

from test_adversarial import OPTIMIZERS, VALID_KWARGS

N = 6 * CHUNK_ELEMENTS + 7  # 3 chunks a thread on 2 threads, 2 on 3
SHAPES = [(N - 1003,), (17, 59)]  # a tensor boundary inside the last chunk
THREADS = (1, 2, 3)
parallel = pytest.mark.skipif(not flatopt.openmp_enabled(), reason="serial build")


def test_chunk_counts():
    count = lambda n, t: len(_kernels.chunks(n, t))  # noqa: E731
    assert count(PARALLEL_THRESHOLD - 1, 2) == 1
    assert count(PARALLEL_THRESHOLD, 2) == 2
    assert count(4 * CHUNK_ELEMENTS - 1, 2) == 2
    assert count(N, 2) == 6
    assert count(N, 3) == 6
    assert count(6 * CHUNK_ELEMENTS, 3) == 6
    assert count(N, 1) == 1
    assert sum(int(np.prod(s)) for s in SHAPES) == N


@pytest.mark.parametrize("n", [0, 7, PARALLEL_THRESHOLD - 1, PARALLEL_THRESHOLD, PARALLEL_THRESHOLD + 5,
                               2**17 + 3, N, 3_233_802, 2**25 + 3568])
@pytest.mark.parametrize("n_threads", [1, 2, 3, 4, 64])
def test_chunks_tile_the_range_on_cache_lines_and_balance_the_threads(n, n_threads):
    ranges = _kernels.chunks(n, n_threads)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(lo % 16 == 0 for lo, _ in ranges)
    assert all(lo < hi for lo, hi in ranges) or ranges == [(0, 0)]
    assert len(ranges) % n_threads == 0 or len(ranges) == 1
    per_thread = [sum(hi - lo for lo, hi in ranges[t::n_threads]) for t in range(n_threads)]
    if len(ranges) > 1:
        assert max(per_thread) - min(per_thread) <= 32 * len(ranges) // n_threads  # 15 a boundary


def _arrays(dtype, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def _assert_same(runs):
    for t in THREADS[1:]:
        for got, want in zip(runs[t], runs[1]):
            np.testing.assert_array_equal(got, want, strict=True)


def _step_numpy_api(cls, params, grads):
    """Step ``cls`` over ``params`` (arrays or groups) with each flat gradient of ``grads``
    on every thread count, and check the parameters agree bit for bit."""
    runs = {}
    for t in THREADS:
        copies = [{**g, "params": [a.copy() for a in g["params"]]} if isinstance(g, dict)
                  else g.copy() for g in params]
        opt = cls(copies, **VALID_KWARGS[cls.__name__], n_threads=t)
        for g in grads:
            opt.flat_grads[:] = g
            opt.step()
        runs[t] = [opt.flat_params.copy()]
    _assert_same(runs)


@parallel
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_api(cls, dtype):
    grads = [np.concatenate([g.ravel() for g in _arrays(dtype, s)]) for s in (1, 2, 3)]
    _step_numpy_api(cls, _arrays(dtype, 0), grads)


@parallel
@pytest.mark.parametrize("cls", [flatopt.Adam, flatopt.SGD], ids=lambda c: c.__name__)
def test_numpy_api_second_group_mid_cache_line(cls):
    """Two parameter groups: the kernel steps the second (several chunks a thread) as a
    range that starts 1003 elements into the buffer, off any cache line."""
    rng = np.random.default_rng(0)
    small, large = (rng.standard_normal(s).astype(np.float32) for s in [(17, 59), (N - 1003,)])
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(3)]
    _step_numpy_api(cls, [{"params": [small]}, {"params": [large], "lr": 0.05}], grads)


@parallel
@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop", "Adadelta", "Adagrad", "Adamax",
                                  "Nadam", "Lion"])
def test_keras(name):
    kw = {"SGD": dict(momentum=0.9, nesterov=True), "RMSprop": dict(momentum=0.9, centered=True)}
    grads = [_arrays(np.float32, s) for s in (1, 2, 3)]
    runs = {}
    for t in THREADS:
        opt = getattr(fk, name)(_arrays(np.float32, 0), **kw.get(name, {}), weight_decay=0.01,
                                n_threads=t)
        for g in grads:
            opt.step(g)
        runs[t] = [opt.flat_params.copy()]
    _assert_same(runs)


@parallel
@pytest.mark.parametrize("half", [None, "bfloat16"])
def test_torch_adapter(half):
    """Gradients read where autograd left them (a table of sources); with 16-bit
    parameters, float32 masters and the 16-bit copies written in the same pass."""
    torch = pytest.importorskip("torch")
    ft = pytest.importorskip("flatopt.torch")
    dtype = getattr(torch, half) if half else torch.float32
    if half:
        pytest.importorskip("ml_dtypes", reason="bfloat16 parameters need ml_dtypes")
    runs = {}
    for t in THREADS:
        params = [torch.nn.Parameter(torch.from_numpy(a).to(dtype)) for a in _arrays(np.float32, 0)]
        kw = dict(master_dtype=torch.float32) if half else {}
        opt = ft.Adam(params, lr=1e-2, weight_decay=0.01, n_threads=t, **kw)
        for s in (1, 2, 3):
            for p, g in zip(params, _arrays(np.float32, s)):
                p.grad = torch.from_numpy(g).to(dtype)
            opt.step()
        runs[t] = [p.detach().float().numpy().copy() for p in params]
        if half:
            runs[t] += [opt.state[p]["master_param"].numpy().copy() for p in params]
    _assert_same(runs)

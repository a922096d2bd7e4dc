"""Safety: concurrent steps in Python threads, fork after a parallel step, no per-step
allocation, and (opt-in) index arithmetic past 2**31 elements."""

import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import numpy as np
import pytest

import flatopt
import flatopt.functional as F
import reference as ref
from test_adversarial import OPTIMIZERS, VALID_KWARGS
from flatopt._kernels import PARALLEL_THRESHOLD

BIG = PARALLEL_THRESHOLD * 8 + 5  # large enough for the kernels to open a parallel region
SRC = os.path.join(os.path.dirname(flatopt.__file__), os.pardir)  # the flatopt under test, for subprocesses


def _grads(n, steps, dtype, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) for _ in range(steps)]


# ---- two optimizers stepping at the same time in two Python threads ----------------------

@pytest.mark.parametrize("n_threads", [1, 2])
def test_concurrent_steps_match_sequential_runs(n_threads):
    """The kernels release the GIL: two optimizers stepping at once in two threads must
    give exactly what each gives alone (no shared scratch state, no lost writes)."""
    steps, dtype = 20, np.float32
    specs = [(flatopt.SGD, dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3)),
             (flatopt.Momentum, dict(lr=0.02, beta=0.8, maximize=True))]
    grads = [_grads(BIG, steps, dtype, seed) for seed in range(len(specs))]
    start = [np.random.default_rng(10 + i).standard_normal(BIG).astype(dtype) for i in range(len(specs))]

    def make(i):
        cls, kwargs = specs[i]
        return cls([start[i].copy()], n_threads=n_threads, **kwargs)

    alone = []
    for i in range(len(specs)):
        opt = make(i)
        for g in grads[i]:
            opt.step(g, grad_scale=0.5)
        alone.append(opt)

    together = [make(i) for i in range(len(specs))]
    barrier = threading.Barrier(len(specs))
    errors = []

    def run(i):
        try:
            barrier.wait(timeout=30)
            for g in grads[i]:
                together[i].step(g, grad_scale=0.5)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(b.flat_params, a.flat_params, strict=True)
        np.testing.assert_array_equal(b.state["momentum_buffer"], a.state["momentum_buffer"], strict=True)


def test_concurrent_functional_calls_on_disjoint_halves():
    """Two threads updating the two halves of one buffer through the functional API."""
    dtype, n = np.float64, 2 * BIG
    rng = np.random.default_rng(3)
    param, velocity = rng.standard_normal(n).astype(dtype), np.zeros(n, dtype)
    grads = _grads(n, 10, dtype, 4)
    expected_p, expected_v = param.copy(), velocity.copy()
    for g in grads:
        expected_p, expected_v = ref.momentum(expected_p, g, expected_v, lr=0.1, beta=0.9)

    def run(half):
        sl = slice(0, BIG) if half == 0 else slice(BIG, n)
        for g in grads:
            F.momentum_(param[sl], g[sl], velocity[sl], lr=0.1, beta=0.9, n_threads=2)

    threads = [threading.Thread(target=run, args=(h,)) for h in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    np.testing.assert_array_equal(param, expected_p, strict=True)
    np.testing.assert_array_equal(velocity, expected_v, strict=True)


# ---- fork after a parallel step ----------------------------------------------------------

FORK_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import flatopt, flatopt.functional as F
    sys.path.insert(0, {tests!r})
    import reference as ref

    n = {n}
    rng = np.random.default_rng(0)
    p, g, v = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    if {parent_parallel}:
        F.momentum_(p, g, v, lr=0.1, n_threads=2)  # the parent opens a parallel region
    expected_p, expected_v = ref.momentum(p, g, v, lr=0.1, beta=0.9)
    expected_opt = ref.momentum(p, g, np.zeros_like(v), lr=0.1, beta=0.9)[0]
    p0 = p.copy()
    parent_threads = flatopt.get_num_threads()
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)  # a hung child must not outlive the test
        try:
            F.momentum_(p, g, v, lr=0.1, n_threads=2)  # an explicit request for 2 threads
            opt = flatopt.Momentum([p0], lr=0.1)        # and the default thread count
            opt.step(g)
            ok = (np.array_equal(p, expected_p) and np.array_equal(v, expected_v)
                  and np.array_equal(opt.flat_params, expected_opt))
            print("child", flatopt.get_num_threads(), ok, flush=True)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("parent", parent_threads, os.waitstatus_to_exitcode(status), flush=True)
""")


def _run(code, timeout=90, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.pathsep.join(
                              [os.path.abspath(SRC), os.environ.get("PYTHONPATH", "")]), **env})


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
@pytest.mark.parametrize("parent_parallel", [True, False], ids=["after-parallel", "no-parallel-before"])
def test_forked_child_can_step(parent_parallel):
    """GNU libgomp's thread pool does not survive fork(): a child stepping on 2 threads
    after the parent ran a parallel region used to hang forever. flatopt now runs such a
    child serially (same results); a child of a parent that never ran a parallel region
    keeps its threads."""
    tests = os.path.dirname(os.path.abspath(__file__))
    out = _run(FORK_SCRIPT.format(tests=tests, n=BIG, parent_parallel=parent_parallel))
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line)
    parent_threads, child_status = map(int, lines["parent"].split())
    assert child_status == 0 and "child" in lines, out
    child_threads, ok = lines["child"].split()
    assert ok == "True"
    if not flatopt.openmp_enabled():
        assert parent_threads == int(child_threads) == 1
    else:
        assert parent_threads == 2
        assert int(child_threads) == (1 if parent_parallel else 2)


SPAWN_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp
    import numpy as np
    import flatopt, flatopt.functional as F

    def work(n):
        p, g, v = np.ones(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.float32)
        F.momentum_(p, g, v, lr=0.5, beta=0.5, n_threads=2)
        return flatopt.get_num_threads(), float(p[-1])

    if __name__ == "__main__":
        p = np.ones({n}, np.float32)
        F.momentum_(p, p.copy(), np.zeros_like(p), lr=0.1, n_threads=2)
        with mp.get_context("spawn").Pool(1) as pool:
            print(*pool.apply(work, ({n},)))
""")


def test_spawned_child_keeps_its_threads(tmp_path):
    """The recommended way to start workers: spawn (or forkserver) starts a fresh
    interpreter with a fresh OpenMP runtime, so the child runs on all its threads."""
    script = tmp_path / "spawn_child.py"
    script.write_text(SPAWN_SCRIPT.format(n=BIG))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90,
                         env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.pathsep.join(
                             [os.path.abspath(SRC), os.environ.get("PYTHONPATH", "")])})
    assert out.returncode == 0, out.stderr
    threads, last = out.stdout.split()
    assert int(threads) == (2 if flatopt.openmp_enabled() else 1)
    assert float(last) == np.float32(1) - np.float32(0.5) * np.float32(0.5)


# ---- no allocation proportional to the buffer size per step ------------------------------

N_ALLOC = 2**20
# Bytes of peak growth over 100 steps, for a 4 or 8 MiB buffer: a per-element allocation
# would be megabytes. One-off interpreter allocations (a free list growing, a cache entry)
# have measured up to ~4.1 KB here once in a full run, hence 16 KiB.
ALLOC_LIMIT = 16384


def _peak_growth(fn, repeats=100):
    fn()  # warm up: lazily allocated state, caches
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(repeats):
            fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


def _alloc_cases():
    """name -> a call to repeat: every optimizer in the adversarial table, several ways."""
    rng = np.random.default_rng(0)
    p = rng.standard_normal(N_ALLOC).astype(np.float32)
    g = rng.standard_normal(N_ALLOC).astype(np.float32)
    ro = g.copy()
    ro.setflags(write=False)
    v = np.zeros_like(p)
    cases = {
        "functional-momentum": lambda: F.momentum_(p, g, v, lr=1e-3, n_threads=2),
        "functional-sgd": lambda: F.sgd_(p, g, v, lr=1e-3, momentum=0.9, step=2, n_threads=1),
    }
    for cls in OPTIMIZERS:
        if cls.__name__ not in VALID_KWARGS:
            continue
        # two groups; tiny lr so that 100 steps stay finite whatever the optimizer
        half = N_ALLOC // 2
        opt = cls([{"params": [p[:half].copy()]}, {"params": [p[half:].copy()]}],
                  n_threads=1, **{**VALID_KWARGS[cls.__name__], "lr": 1e-6})
        opt.flat_grads[:] = g
        name = cls.__name__
        cases[f"{name}-step"] = opt.step
        cases[f"{name}-step-flat-readonly-scaled"] = lambda opt=opt: opt.step(ro, grad_scale=0.5)
        cases[f"{name}-step-grad-views"] = lambda opt=opt: opt.step(opt.grads)
        if hasattr(opt, "clip_grad_norm_"):
            cases[f"{name}-clip-skip-step"] = lambda opt=opt: (opt.clip_grad_norm_(1.0),
                                                               opt.step(skip_if_nonfinite=True))
    return cases


ALLOC_CASES = _alloc_cases()


@pytest.mark.parametrize("name", list(ALLOC_CASES))
def test_step_does_not_allocate_per_element(name):
    growth = _peak_growth(ALLOC_CASES[name])
    assert growth < ALLOC_LIMIT, f"{name}: peak grew by {growth} bytes over 100 calls"


def test_allocation_measurement_can_see_a_buffer_sized_temporary():
    """The control for the test above: a NumPy step allocates whole temporaries."""
    rng = np.random.default_rng(0)
    p, g, v = (rng.standard_normal(N_ALLOC).astype(np.float32) for _ in range(3))
    growth = _peak_growth(lambda: ref.momentum(p, g, v, lr=1e-3), repeats=3)
    assert growth >= N_ALLOC * 4


# ---- index arithmetic past 2**31 elements (opt-in: ~17 GB of memory) ---------------------

def _mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@pytest.mark.skipif(os.environ.get("FLATOPT_BIGMEM") != "1",
                    reason="needs ~17 GB of memory; set FLATOPT_BIGMEM=1 to run")
@pytest.mark.parametrize("n_threads", [2])
def test_momentum_past_2_31_elements(n_threads):
    """Step a float32 buffer of more than 2**31 elements and check the elements on both
    sides of 2**31 and at the very end (an int32 index would wrap to negative); then the
    norm and non-finite count over it."""
    n = 2**31 + 2**16 + 3
    need = 2 * n * 4 + 2**30  # param and velocity are written; grad stays mostly zero pages
    available = _mem_available()
    if available is not None and available < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB available, have {available / 2**30:.1f} GiB")
    param, grad, velocity = (np.zeros(n, np.float32) for _ in range(3))
    spots = [np.arange(0, 8), np.arange(2**31 - 8, 2**31 + 8), np.arange(n - 8, n)]
    rng = np.random.default_rng(0)
    for idx in spots:
        param[idx] = rng.standard_normal(idx.size)
        grad[idx] = rng.standard_normal(idx.size)
        velocity[idx] = rng.standard_normal(idx.size)
    expected = [ref.momentum(param[idx], grad[idx], velocity[idx], lr=0.5, beta=0.75, weight_decay=0.25)
                for idx in spots]
    F.momentum_(param, grad, velocity, lr=0.5, beta=0.75, weight_decay=0.25, n_threads=n_threads)
    for idx, (p, v) in zip(spots, expected):
        np.testing.assert_array_equal(param[idx], p, strict=True)
        np.testing.assert_array_equal(velocity[idx], v, strict=True)
    # elements in between were zero and stay zero (nothing written out of place)
    for i in (2**30, 2**31 - 9, 2**31 + 8, n - 9):
        assert param[i] == 0 and velocity[i] == 0
    # the read-only reductions index past 2**31 too (blocks, partial sums, counts)
    grad[[2**31 + 1, n - 1]] = [-7.5, 9.25]
    assert F.grad_norm(grad, float("inf"), n_threads=n_threads) == 9.25
    expected_sq = float(np.sum([np.sum(grad[idx].astype(np.float64) ** 2) for idx in spots]))
    assert F.grad_norm(grad, 2.0, n_threads=n_threads) == pytest.approx(np.sqrt(expected_sq), rel=1e-12)
    velocity[[2**31, n - 1]] = [np.nan, np.inf]
    assert F.count_nonfinite(velocity, n_threads=n_threads) == 2

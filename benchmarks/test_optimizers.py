"""pytest-benchmark suite: every optimizer x dtype x size x threads, flatopt vs NumPy
(and torch.optim's fused/foreach implementations when installed).

Run (not part of the test suite, never asserts a time):
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m pytest benchmarks/ --benchmark-group-by=param:case
"""

import numpy as np
import pytest

import flatopt
from flatopt import bench

try:
    import torch
except ImportError:
    torch = None

IMPLS = ["flatopt", "numpy", "torch-foreach", "torch-fused"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(bench.OPTIMIZERS))
def test_step(benchmark, name, dtype, n_threads, impl, case):
    optim = bench.OPTIMIZERS[name]
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(dtype) for s in case.shapes]
    grads = [(rng.standard_normal(s) * 1e-3).astype(dtype) for s in case.shapes]
    if impl == "flatopt":
        opt = optim.flatopt(arrays, n_threads)
        for view, g in zip(opt.grads, grads):
            view[...] = g
        step = opt.step
    elif impl == "numpy":
        p, g = flatopt.flatten(arrays)[0], flatopt.flatten(grads)[0]
        step = optim.numpy(p, g)
    else:
        if torch is None:
            pytest.skip("torch is not installed")
        steps = bench._torch_impls(optim, torch, arrays, grads, n_threads)
        if impl not in steps:
            pytest.skip(f"torch has no {impl} {name}")
        step = steps[impl]
    benchmark.extra_info["bytes_per_step"] = optim.bytes_per_step(case.size, np.dtype(dtype).itemsize)
    benchmark(step)

"""The benchmark's NumPy baselines compute the same step as flatopt (an honest baseline),
and the main command runs."""

import io

import numpy as np
import pytest

from flatopt import bench


@pytest.mark.parametrize("name", sorted(bench.CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_baseline_matches_flatopt(name, dtype):
    case = bench.CASES[name]
    rng = np.random.default_rng(0)
    n = 1000
    p = rng.standard_normal(n).astype(dtype)
    opt = case.make_flatopt(p.copy(), 1)
    p_np, scratch = p.copy(), np.empty(n, dtype)
    state = [np.zeros(n, dtype) for _ in range(case.n_state)]
    for step in range(5):
        g = rng.standard_normal(n).astype(dtype)
        opt.step(g)
        if step == 0 and name == "sgd-momentum":
            state[0][:] = g  # torch's first step: the buffer is the gradient
            np.subtract(p_np, 1e-3 * g, out=p_np)
            continue
        case.numpy_step(p_np, g, state, scratch)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(opt.flat_params, p_np, rtol=rtol)


def test_main_command_runs():
    out = io.StringIO()
    rows = bench.run(list(bench.CASES.values()), [7, 1000], ["float32"], 1, 0.001,
                     use_torch=False, out=out)
    assert {r["impl"] for r in rows} == {"numpy", "flatopt"}
    assert all(r["seconds"] > 0 and r["gbps"] > 0 for r in rows)
    assert "sgd-momentum" in out.getvalue()

"""The benchmark's NumPy baselines compute the same step as flatopt (an honest baseline),
the model-shaped cases have the advertised size, and the main command runs."""

import io

import numpy as np
import pytest

from flatopt import bench


@pytest.mark.parametrize("name", sorted(bench.OPTIMIZERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_baseline_matches_flatopt(name, dtype):
    optim = bench.OPTIMIZERS[name]
    rng = np.random.default_rng(0)
    n = 1000
    p = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    opt = optim.flatopt([p.copy()], 1)
    opt.flat_grads[:] = g
    p_np = p.copy()
    numpy_step = optim.numpy(p_np, g)
    if name == "sgd-momentum":
        # The baseline times the steady state (buf = m*buf + g from a zero buffer); skip
        # torch's first-step rule (buf = g) in flatopt so both start alike.
        opt.state["momentum_buffer_initialized"][0] = True
    for _ in range(5):
        opt.step()
        numpy_step()
    rtol = 2e-5 if dtype == np.float32 else 1e-12
    # Adam-like steps move every element by ~lr whatever its size, so an element passing
    # near zero keeps a few float32 ulps of the step (~1e-9) as absolute difference, which
    # no rtol accepts; atol covers that and is far below rtol * |p| for the rest.
    atol = 1e-8 if dtype == np.float32 else 0.0
    np.testing.assert_allclose(opt.flat_params, p_np, rtol=rtol, atol=atol)


def test_model_cases_have_168_tensors():
    assert len(bench.transformer_shapes(128)) == 168
    assert bench.model_case(768).size == 12 * (12 * 768**2 + 11 * 768)  # ~85M elements
    assert bench.flat_case(2**20).size == 2**20


def test_main_command_runs():
    out = io.StringIO()
    optims = list(bench.OPTIMIZERS.values())
    rows = bench.run(optims, [bench.flat_case(7), bench.model_case(8)], ["float32"], 1, 0.001,
                     use_torch=False, out=out)
    assert {r["impl"] for r in rows} == {"numpy", "flatopt"}
    assert all(r["seconds"] > 0 and r["gbps"] > 0 and r["bandwidth_gbps"] > 0 for r in rows)
    assert len(rows) == 2 * 2 * len(optims)
    assert "sgd-momentum" in out.getvalue()


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = bench.run([bench.OPTIMIZERS["momentum"]], [bench.flat_case(n) for n in (7, 1000)],
                     ["float32", "float64"], 1, 0.001, use_torch=False, out=io.StringIO())
    path = tmp_path / "bench.png"
    bench.plot(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

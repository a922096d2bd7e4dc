"""The benchmark's NumPy baselines compute the same step as flatopt (an honest baseline),
the model-shaped cases have the advertised size, and the main command runs."""

import io
import os
import statistics
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from flatopt import bench

from conftest import SIZES


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


def test_baselines_and_reference_get_flatopts_allocation():
    """Large arrays of the NumPy baselines and of the a += b reference start 64-byte
    aligned and at different offsets within their pages, as flatopt's own buffers do."""
    p = bench._copy(np.arange(2**18, dtype=np.float32))
    np.testing.assert_array_equal(p, np.arange(2**18, dtype=np.float32))
    step = bench.numpy_adam(p, bench._zeros(p))
    fn, nbytes = bench.bandwidth_step(2**19, np.float32, 1)
    arrays = [c.cell_contents for f in (step, fn) for c in f.__closure__
              if isinstance(c.cell_contents, np.ndarray) and c.cell_contents.nbytes >= 2**20]
    assert len(arrays) >= 4 + 2  # p, g, m, v (+ tmp) and the reference's a, b
    starts = [a.ctypes.data for a in arrays]
    assert all(s % 64 == 0 for s in starts)
    assert len({s % 4096 for s in starts}) == len(starts) or len(starts) > 8
    fn()
    a, b = [c.cell_contents for c in fn.__closure__ if isinstance(c.cell_contents, np.ndarray)]
    assert a.shape == b.shape == (2**18,) and nbytes == 3 * 2**18 * 4
    np.testing.assert_array_equal(a, 1)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_adam_traffic_reference_updates_three_arrays(n, dtype, n_threads):
    """bench_large's ceiling moves Adam's bytes: three arrays += a fourth, all of them."""
    fn, nbytes = bench.adam_traffic_step(n, dtype, n_threads)
    cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__)))
    p, m, v, g = (cells[k] for k in "pmvg")
    assert all(a.shape == (max(n, 1),) and a.dtype == dtype for a in (p, m, v, g))
    rng = np.random.default_rng(n)
    for a in (p, m, v, g):
        a[:] = rng.standard_normal(a.size)
    want = [p + g, m + g, v + g]
    g0 = g.copy()
    fn()
    for got, w in zip((p, m, v), want):
        np.testing.assert_array_equal(got, w)
    np.testing.assert_array_equal(g, g0)
    assert nbytes == 7 * max(n, 1) * np.dtype(dtype).itemsize


def test_adam_traffic_reference_refuses_arrays_of_different_lengths():
    from flatopt._dispatch import kernels
    a, c, d, b = (np.zeros(n, np.float32) for n in (8, 8, 7, 8))
    with pytest.raises(ValueError, match="stream_add3: expected four arrays of one length, got 8, 8, 7 and 8"):
        kernels.stream_add3(a, c, d, b, 1)


def test_header_names_isa_and_cpu():
    from flatopt._dispatch import ISA

    line = bench.header(1)
    assert f"({ISA} kernels" in line
    assert f"CPU: {bench.cpu_model()}" in line
    assert bench.cpu_model().strip()


def test_header_names_torchs_cpu_kernels_and_the_load():
    torch = pytest.importorskip("torch")
    line = bench.header(1, torch)
    assert f"torch's CPU kernels: {torch.backends.cpu.get_cpu_capability()}" in line
    assert f"on {len(os.sched_getaffinity(0))} CPUs" in line


def test_busy_note_only_when_more_runs_than_there_are_cpus():
    assert bench.busy_note((2.4, 2)) == ""
    note = bench.busy_note((3.3, 2))
    assert "busy (1-minute load 3.3 on 2 CPUs)" in note and "measure again" in note


ZEN1 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n"
ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n\nHardware\t: Some SoC\n"


@pytest.mark.parametrize("text, expected", [
    (ZEN1 + "\n" + ZEN4.replace(": 0", ": 1"), "AMD EPYC (family 23, model 1)"),
    (ZEN4, "AMD EPYC (family 25, model 17)"),
    ("model name\t: Intel(R) Xeon(R)\n", "Intel(R) Xeon(R)"),  # no numbers: the name alone
    (ARM, "Some SoC"),
])
def test_cpu_model_tells_microarchitectures_apart(tmp_path, text, expected):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert bench.cpu_model(path) == expected


def test_cpu_model_without_cpuinfo_falls_back(tmp_path):
    assert bench.cpu_model(tmp_path / "missing").strip()


def test_header_says_whether_torch_asks_for_huge_pages(monkeypatch):
    fake_torch = types.SimpleNamespace(__version__="9.9")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert "torch 9.9 (huge pages, THP_MEM_ALLOC_ENABLE)" in bench.header(1, fake_torch)
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert "torch 9.9 (4 KiB pages, THP_MEM_ALLOC_ENABLE)" in bench.header(1, fake_torch)
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    assert "(4 KiB pages" in bench.header(1, fake_torch)
    assert "torch not used" in bench.header(1)


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_torch_is_imported_asking_for_huge_pages_unless_told_otherwise(preset, expected):
    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = ("import os, sys; from flatopt import bench; assert 'torch' not in sys.modules; "
            "bench._import_torch(True); print(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == expected


def test_progress_reports_on_stderr_only_after_the_delay():
    quiet = io.StringIO()
    p = bench.Progress([1, 1], out=quiet, delay=3600)
    p.next("a")
    p.next("b")
    p.finish()
    assert quiet.getvalue() == ""
    err = io.StringIO()
    p = bench.Progress([1, 3], out=err, delay=0)
    p.next("first task")
    p.next("second task")
    p.finish()
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("[1/2] first task (")
    assert lines[1].startswith("[2/2] second task (") and "s left" in lines[1]
    assert lines[2].startswith("done in ")


def test_crossover_table():
    out = io.StringIO()
    optims = [bench.OPTIMIZERS["sgd-momentum"], bench.OPTIMIZERS["adam"]]
    rows = bench.crossover(optims, [1, 3, 100], np.float32, 1, 0.001, out=out)
    assert [(r["optimizer"], r["size"]) for r in rows] == [
        (o.name, n) for o in optims for n in (1, 3, 100)]
    assert all(r["flatopt"] > 0 and r["numpy"] > 0 and r["speedup"] > 0 for r in rows)
    text = out.getvalue()
    assert "crossover, adam, float32" in text
    assert ("at least as fast at every size" in text) or ("slower at" in text)


def test_crossover_table_with_the_torch_adapter():
    torch = pytest.importorskip("torch")
    out = io.StringIO()
    optims = [bench.OPTIMIZERS["adam"], bench.OPTIMIZERS["momentum"]]  # momentum: no torch twin
    rows = bench.crossover(optims, [1, 100], np.float32, 1, 0.001, out=out, torch=torch)
    assert [("flatopt_torch" in r) for r in rows] == [True, True, False, False]
    assert all(r["flatopt_torch"] > 0 for r in rows[:2])
    text = out.getvalue()
    assert "crossover, adam, float32: us per step, flatopt.step() vs in-place NumPy, and flatopt.torch" in text
    header, first = text.split("\n")[2:4]
    assert header.split()[-2:] == ["fo.torch", "adapter"]
    t_flat, t_torch, adapter = (float(first.split()[i]) for i in (1, 4, 5))
    assert adapter == pytest.approx(t_torch - t_flat, abs=0.011)
    assert "fo.torch" not in text.split("crossover, momentum")[1]


def test_time_interleaved_times_each_function():
    calls = [0, 0, 0]

    def counter(i, seconds):
        def fn():
            calls[i] += 1
            time.sleep(seconds)
        return fn

    times = bench.time_interleaved([counter(0, 0), counter(1, 2e-3), counter(2, 0)], 0.01)
    assert len(times) == 3 and all(c >= 5 for c in calls)
    assert times[1] >= 2e-3 > 10 * max(times[0], times[2])


def test_main_quick_without_torch_keeps_stdout_clean(capsys):
    rows = bench.main(["--quick", "--no-torch", "--optimizers", "momentum", "--dtypes", "float32"])
    captured = capsys.readouterr()
    assert captured.out.startswith("flatopt ")
    assert "crossover, momentum" in captured.out
    assert "end to end" not in captured.out  # needs torch
    assert "[1/" not in captured.out  # progress goes to stderr, if anywhere
    assert {r["case"] for r in rows} == {"flat 2**10", "flat 2**16", "crossover"}


@pytest.mark.parametrize("name", sorted(n for n, o in bench.OPTIMIZERS.items() if o.torch is not None))
def test_every_torch_arm_computes_the_same_step(name):
    """The rows compared are the same computation: every torch variant the benchmark
    times, flatopt.torch and flatopt (built by the benchmark's own functions) end with
    the same parameters as torch's for-loop after a few steps (float64: any difference
    in hyperparameters or skipped work would show far above rounding). torch's default
    dtype float64: NAdam's mu_product is kept in it, and in double by flatopt's float64
    NumPy class."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("flatopt.torch")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _check_arms_agree(torch, bench.OPTIMIZERS[name])
    finally:
        torch.set_default_dtype(default)


def _check_arms_agree(torch, optim):
    rng = np.random.default_rng(1)
    shapes = [(7, 5), (5,), (300,)]
    arrays = [rng.standard_normal(s) for s in shapes]
    grads = [rng.standard_normal(s) * 1e-1 for s in shapes]
    impls = bench._torch_impls(optim, torch, arrays, grads, 1)
    assert "torch-forloop" in impls and "flatopt-torch" in impls
    impls["flatopt-torch"]()   # the torch variants took one step when they were built
    numpy_opt = optim.flatopt([a.copy() for a in arrays], 1)
    for view, g in zip(numpy_opt.grads, grads):
        view[...] = g
    numpy_opt.step()
    for _ in range(4):
        for step in impls.values():
            step()
        numpy_opt.step()
    expected = np.concatenate([p.detach().numpy().ravel()
                               for p in impls["torch-forloop"].__self__.param_groups[0]["params"]])
    for impl, step in impls.items():
        got = np.concatenate([p.detach().numpy().ravel() for p in step.__self__.param_groups[0]["params"]])
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14, err_msg=impl)
    np.testing.assert_allclose(numpy_opt.flat_params, expected, rtol=1e-12, atol=1e-14, err_msg="flatopt")


def test_deepspeed_is_optional(monkeypatch):
    monkeypatch.delitem(bench._DEEPSPEED, "cls", raising=False)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes the import fail
    assert bench.deepspeed_cpu_adam() is None


def test_deepspeed_row_for_float32_adam(monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("flatopt.torch")
    made = []

    def fake_cpu_adam(params, lr, weight_decay, adamw_mode):  # DeepSpeedCPUAdam's keywords
        made.append(adamw_mode)
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    monkeypatch.setitem(bench._DEEPSPEED, "cls", fake_cpu_adam)
    case = bench.flat_case(100)
    rows = bench.run_case(bench.OPTIMIZERS["adam"], case, np.float32, 1, 0.001, torch, True)
    assert "deepspeed" in {r["impl"] for r in rows} and made == [False]
    rows = bench.run_case(bench.OPTIMIZERS["adam"], case, np.float64, 1, 0.001, torch, True)
    assert "deepspeed" not in {r["impl"] for r in rows}  # DeepSpeed steps float32 only
    rows = bench.run_case(bench.OPTIMIZERS["adam"], case, np.float32, 1, 0.001, torch, False)
    assert "deepspeed" not in {r["impl"] for r in rows}


def test_main_runs_the_end_to_end_loop_at_each_width(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("flatopt.torch")
    rows = bench.main(["--quick", "--no-crossover", "--optimizers", "momentum", "--dtypes", "float32",
                       "--e2e-widths", "8", "12", "--e2e-rounds", "3"])
    e2e = [r for r in rows if r["case"] == "end to end"]
    # 64*w + w + 2*w (LayerNorm) + w*10 + 10 parameters for depth 2: w*w + 3*w more
    sizes = [64 * w + 3 * w + (w * w + 3 * w) + 10 * w + 10 for w in (8, 12)]
    assert [r["size"] for r in e2e] == [n for n in sizes for _ in range(2)]
    assert all(len(r["round_ratios"]) == 3 for r in e2e[1::2])
    out = capsys.readouterr().out
    assert out.count("end to end: MLP 64-") == 2 and out.count("over 3 rounds, flatopt.torch faster in ") == 2


def test_e2e_rounds_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--e2e-rounds", "0"])
    assert "--e2e-rounds: expected a positive number of rounds, got 0" in capsys.readouterr().err


def test_end_to_end_times_each_phase():
    torch = pytest.importorskip("torch")
    pytest.importorskip("flatopt.torch")
    out = io.StringIO()
    rows = bench.end_to_end(torch, 1, steps=2, rounds=1, width=8, depth=1, batch=4, out=out)
    assert [r["impl"] for r in rows] == ["torch.optim.Adam(fused=True)", "flatopt.torch.Adam"]
    for r in rows:
        assert all(r[p] > 0 for p in ("zero_grad", "forward", "backward", "step", "seconds"))
    assert "end to end" in out.getvalue() and "backward" in out.getvalue()


def test_paired_rounds_compares_medians_round_by_round():
    # Two rounds of three steps; the second round is twice as slow for both runs (a machine
    # that drifted), which the per-round ratio cancels and the pooled medians would not.
    base = {"step": [3e-3, 3e-3, 9e-3, 6e-3, 6e-3, 6e-3], "total": [10e-3, 11e-3, 10e-3, 20e-3, 22e-3, 20e-3]}
    ours = {"step": [1e-3, 2e-3, 1e-3, 2e-3, 4e-3, 2e-3], "total": [8e-3, 9e-3, 8e-3, 16e-3, 18e-3, 16e-3]}
    got = bench.paired_rounds(base, ours, steps=3)
    assert got["round_ratios"] == pytest.approx([0.8, 0.8])
    assert got["ratio"] == pytest.approx(0.8)
    assert got["step_saving"] == pytest.approx((2e-3 + 4e-3) / 2)   # 3-1 and 6-2 (ms)
    assert got["total_saving"] == pytest.approx((2e-3 + 4e-3) / 2)  # 10-8 and 20-16


def test_end_to_end_prints_the_paired_comparison():
    torch = pytest.importorskip("torch")
    pytest.importorskip("flatopt.torch")
    out = io.StringIO()
    rows = bench.end_to_end(torch, 1, steps=3, rounds=2, width=8, depth=1, batch=4, out=out)
    assert len(rows[1]["round_ratios"]) == 2 and "paired by round" in out.getvalue()
    assert rows[1]["ratio"] == statistics.median(rows[1]["round_ratios"])

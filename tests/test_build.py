"""What the installed build is made of, and that it lives well beside PyTorch.

These tests run against whatever ``flatopt`` is importable: a source build in CI, or an
installed wheel (``tools/check_wheel.sh``, cibuildwheel's ``test-command``). Set
``FLATOPT_EXPECT_OPENMP=1`` (or ``0``) to make the OpenMP expectation a hard failure: a
wheel that silently lost its OpenMP runtime still passes every numerical test.
"""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest

import flatopt

REQUIRED_KEYS = {
    "version", "openmp", "openmp_version", "openmp_runtime", "compiler", "cflags",
    "ldflags", "platform", "wheel_tag", "default_n_threads", "python",
}


def _build_config():
    try:
        from flatopt._build_config import BUILD_CONFIG
    except ImportError:
        pytest.fail("flatopt._build_config is missing: the package was not built by setup.py")
    return BUILD_CONFIG


def test_build_info_has_the_documented_keys():
    info = flatopt.build_info()
    assert REQUIRED_KEYS <= set(info), sorted(REQUIRED_KEYS - set(info))
    assert info["version"] == flatopt.__version__
    assert info["compiler"], "the compiler used for the build is not recorded"
    assert info["default_n_threads"] >= 1


def test_version_is_single_sourced():
    from importlib import metadata

    from flatopt._version import __version__

    assert flatopt.__version__ == __version__
    if flatopt.build_info()["wheel_tag"] is not None:  # installed: metadata must agree
        assert metadata.version("flatopt") == __version__


def test_show_config_prints_every_key(capsys):
    flatopt.show_config()
    out = capsys.readouterr().out
    for key in flatopt.build_info():
        assert key in out


def test_openmp_matches_the_build_config():
    config = _build_config()
    info = flatopt.build_info()
    assert flatopt.openmp_enabled() is bool(config["openmp"]) is info["openmp"]
    if info["openmp"]:
        assert info["openmp_version"] and info["openmp_version"] >= 200203
        assert any("openmp" in flag for flag in info["cflags"]), info["cflags"]
    else:
        assert info["openmp_version"] is None
        assert info["openmp_runtime"] is None
        assert flatopt.get_num_threads() == 1
        with flatopt.num_threads(4):
            assert flatopt.get_num_threads() == 1


def test_openmp_as_expected():
    expected = os.environ.get("FLATOPT_EXPECT_OPENMP", "").strip()
    if expected not in {"0", "1"}:
        pytest.skip("FLATOPT_EXPECT_OPENMP is not set to 0 or 1")
    assert flatopt.openmp_enabled() is (expected == "1"), flatopt.build_info()


def test_openmp_runtime_is_identified():
    pytest.importorskip("threadpoolctl")
    if not flatopt.openmp_enabled():
        pytest.skip("serial build")
    runtime = flatopt.build_info()["openmp_runtime"]
    assert runtime and not runtime.startswith("unknown"), runtime


def test_wheel_tag_names_this_interpreter():
    tag = flatopt.build_info()["wheel_tag"]
    if tag is None:
        pytest.skip("not installed from a wheel")
    python_tags, _abi_tags, platform_tags = tag.split("-")
    assert f"cp{sys.version_info[0]}{sys.version_info[1]}" in python_tags.split(".")
    assert platform_tags != "any"


def _level_module(level):
    """The kernel module of an ISA level ("baseline", "avx2", ...)."""
    try:
        from flatopt._dispatch import MODULES
    except ImportError:
        MODULES = {}
    default = "flatopt._kernels" if level == "baseline" else f"flatopt._kernels_{level}"
    return MODULES.get(level, default)


def test_every_isa_variant_built_is_installed():
    info = flatopt.build_info()
    if "isa_available" not in info:
        pytest.skip("this build has no ISA dispatch")
    available = list(info["isa_available"])
    for level in available:
        importlib.import_module(_level_module(level))
    assert "baseline" in available
    built = info.get("isa_built") or _build_config().get("isa_built")
    if built is not None:  # a wheel that lost a kernel module still imports: catch it here
        assert sorted(built) == sorted(available), (built, available)
    assert info["isa"] in info["isa_supported"]
    assert set(info["isa_supported"]) <= set(available)


# -- coexistence with PyTorch -------------------------------------------------------

COEXIST = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        if sys.argv[1] == "flatopt":
            import flatopt, torch
        else:
            import torch, flatopt
        import numpy as np

        n = 1 << 18  # above flatopt's parallel threshold: both OpenMP pools start
        rng = np.random.default_rng(0)
        p0 = rng.standard_normal(n).astype(np.float32)
        g = rng.standard_normal(n).astype(np.float32)

        opt = flatopt.SGD([p0], lr=0.1, momentum=0.9, n_threads=2)
        w = torch.nn.Parameter(torch.from_numpy(p0.copy()))
        topt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        torch.set_num_threads(2)
        a = torch.randn(512, 512)
        for _ in range(3):  # interleave: each runtime's pool wakes after the other's
            opt.grads[0][...] = g
            opt.step()
            w.grad = torch.from_numpy(g.copy())
            topt.step()
            a = torch.tanh(a @ a)
        np.testing.assert_allclose(opt.params[0], w.detach().numpy(), rtol=1e-5, atol=1e-6)
        try:
            from threadpoolctl import threadpool_info
            pools = threadpool_info()
        except ImportError:
            pools = []
    for w in caught:
        print(f"WARNING {w.category.__name__}: {w.message}", file=sys.stderr)
    runtimes = sorted({p["filepath"] for p in pools if p["user_api"] == "openmp"})
    print("openmp runtimes:", runtimes)
    # Two copies of LLVM's libomp abort a process sooner or later; the macOS wheel shares
    # torch's (tools/macos_share_libomp.py). Two libgomp copies on Linux are harmless.
    if sys.platform == "darwin" and len(runtimes) > 1:
        sys.exit("two OpenMP runtimes loaded")
    print("OK")
    """
)

# What an OpenMP runtime, threadpoolctl or torch says when two thread pools collide.
BAD_WORDS = ("oversubscri", "omp: error", "omp: warning", "omp: info", "libgomp:",
             "known to be incompatible", "duplicate_lib")


@pytest.mark.parametrize("first", ["flatopt", "torch"])
def test_coexists_with_torch(first):
    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if k != "KMP_DUPLICATE_LIB_OK"}
    proc = subprocess.run([sys.executable, "-c", COEXIST, first], capture_output=True,
                          text=True, timeout=300, env=env)
    report = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert proc.stdout.rstrip().endswith("OK"), report
    lowered = (proc.stdout + proc.stderr).lower()
    assert not [w for w in BAD_WORDS if w in lowered], report

"""What the installed build is made of, and that it lives well beside PyTorch.

These tests run against whatever ``flatopt`` is importable: a source build in CI, or an
installed wheel (``tools/check_wheel.sh``, cibuildwheel's ``test-command``). Set
``FLATOPT_EXPECT_OPENMP=1`` (or ``0``) to make the OpenMP expectation a hard failure: a
wheel that silently lost its OpenMP runtime still passes every numerical test.
"""

import glob
import importlib
import importlib.util
import os
import platform
import shutil
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


def test_extensions_carry_debug_sections_only_in_a_debug_build():
    """A release build passes -g0 after the interpreter's own -g (setup.py's
    ``_speed_flags``): the installed extensions have no DWARF sections. A ``build_ext
    --debug`` build records no -g0 and keeps them."""
    readelf = shutil.which("readelf")
    if not sys.platform.startswith("linux") or readelf is None:
        pytest.skip("needs Linux and binutils' readelf")
    release = "-g0" in _build_config()["cflags"]
    paths = sorted(glob.glob(os.path.join(os.path.dirname(flatopt.__file__), "*.so")))
    assert paths, "no extension modules beside flatopt/__init__.py"
    for path in paths:
        sections = subprocess.run([readelf, "-S", "-W", path], capture_output=True, text=True,
                                  check=True).stdout
        assert (".debug_info" in sections) is not release, (path, release)


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
        # Only a level this CPU runs may be imported: a module built for another may
        # execute its instructions already while it initialises (SIGILL, not an error).
        if level in info["isa_supported"]:
            importlib.import_module(_level_module(level))
        else:
            assert importlib.util.find_spec(_level_module(level)) is not None, level
    assert "baseline" in available
    built = info.get("isa_built") or _build_config().get("isa_built")
    if built is not None:  # a wheel that lost a kernel module still imports: catch it here
        assert sorted(built) == sorted(available), (built, available)
    assert info["isa"] in info["isa_supported"]
    assert set(info["isa_supported"]) <= set(available)


X86_LEVELS = {"avx2", "avx512"}


def _arch(name):
    name = name.lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name, name)


def test_build_info_reports_only_this_platforms_isa_levels():
    """A build for aarch64 (cross-built on x86-64, tools/check_wheel_aarch64.sh) has one
    ISA level, the baseline: no x86 level may be listed as built, installed or supported,
    and the recorded target machine is the one running it, not the build machine."""
    config = _build_config()
    info = flatopt.build_info()
    machine = config.get("machine")
    if machine is None or "build_machine" not in config:
        pytest.skip("a build record from before targets were recorded")
    assert _arch(platform.machine()) in machine.split("+"), (machine, platform.machine())
    if machine != "x86_64":
        for key in ("isa_built", "isa_available", "isa_supported"):
            assert info[key] == ["baseline"], (key, info[key])
        assert info["isa"] == "baseline"
        assert not X86_LEVELS & set(config.get("isa_flags", {})), config["isa_flags"]
    else:
        assert set(info["isa_built"]) <= {"baseline"} | X86_LEVELS, info["isa_built"]
        assert set(config["isa_flags"]) == set(info["isa_built"]) - {"baseline"}, config


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


# -- setup.py's probes (source tree only: an installed wheel has no setup.py) ---------

SETUP_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's namespace, loaded without building anything (cythonize and setup stubbed)."""
    if not os.path.isfile(SETUP_PY):
        pytest.skip("no setup.py here: testing an installed build")
    pytest.importorskip("setuptools")
    import types

    fake_build = types.ModuleType("Cython.Build")
    fake_build.cythonize = lambda exts, **kwargs: exts
    monkeypatch.setitem(sys.modules, "Cython", types.ModuleType("Cython"))
    monkeypatch.setitem(sys.modules, "Cython.Build", fake_build)
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    for name in ("FLATOPT_NO_OPENMP", "FLATOPT_REQUIRE_OPENMP", "ARCHFLAGS"):
        monkeypatch.delenv(name, raising=False)
    namespace = {"__name__": "flatopt_setup", "__file__": SETUP_PY}
    with open(SETUP_PY) as f:
        exec(compile(f.read(), SETUP_PY, "exec"), namespace)
    return namespace


class FakeCompiler:
    """A unix compiler whose "executables" are not for this machine (as in a cross build):
    compiling and linking succeed, running what was linked fails."""

    compiler_type = "unix"

    def __init__(self, exe="cc"):
        self.compiler = [exe]

    def compile(self, sources, output_dir=None, extra_postargs=None):
        os.makedirs(output_dir, exist_ok=True)
        objects = [os.path.join(output_dir, os.path.basename(s) + ".o") for s in sources]
        for obj in objects:
            open(obj, "wb").close()
        return objects

    def link_executable(self, objects, name, extra_preargs=None, extra_postargs=None):
        with open(name, "wb") as f:  # an ELF header for aarch64: "Exec format error" here
            f.write(b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\xb7\x00" + bytes(44))
        os.chmod(name, 0o755)


@pytest.mark.skipif(sys.platform == "win32", reason="unix compiler driver")
def test_cross_build_openmp_probe_links_without_running(setup_py, capsys):
    compiler = FakeCompiler()
    assert setup_py["_probe_openmp"](compiler, ["-fopenmp"], ["-fopenmp"], run=False)
    # the same probe, run: the program cannot execute here, so the probe fails (loudly)
    assert not setup_py["_probe_openmp"](compiler, ["-fopenmp"], ["-fopenmp"], run=True)
    assert "OpenMP probe failed" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="unix compiler driver")
@pytest.mark.parametrize("triple, arch", [("aarch64-linux-gnu", "aarch64"),
                                          ("x86_64-pc-linux-gnu", "x86_64")])
def test_target_arch_is_the_compilers(setup_py, tmp_path, triple, arch):
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\n[ "$1" = -dumpmachine ] && echo {triple}\n')
    cc.chmod(0o755)
    compiler = FakeCompiler(str(cc))
    assert setup_py["_target_arch"](compiler) == arch
    if arch != "x86_64":  # no avx2/avx512 variants for an aarch64 target, whatever the host
        assert setup_py["_isa_variants"](compiler, arch) == {}
    if setup_py["_normalize_arch"](platform.machine()) == "x86_64":
        assert setup_py["_cross_compiling"](arch) is (arch != "x86_64")


def test_required_openmp_fails_the_build_when_the_probe_fails(setup_py, monkeypatch):
    from setuptools import Distribution

    monkeypatch.setenv("FLATOPT_REQUIRE_OPENMP", "1")
    build = setup_py["BuildExt"](Distribution())
    build.compiler = FakeCompiler()
    build.extensions = []
    globals_ = setup_py["BuildExt"].build_extensions.__globals__
    monkeypatch.setitem(globals_, "_probe_openmp", lambda *args, **kwargs: False)
    monkeypatch.setitem(globals_, "_target_arch", lambda compiler: "aarch64")
    written = []
    monkeypatch.setattr(build, "_write_build_config", lambda *args: written.append(args),
                        raising=False)
    with pytest.raises(RuntimeError, match="FLATOPT_REQUIRE_OPENMP"):
        build.build_extensions()
    assert not written, "a serial build went ahead"

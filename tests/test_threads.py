"""Thread-count control, OpenMP detection, build information."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import flatopt


def run_python(code, **env):
    full_env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=full_env, timeout=120, check=True)
    return out.stdout.strip()


def test_set_and_context_manager():
    default = flatopt.get_num_threads()
    assert default >= 1
    with flatopt.num_threads(1):
        assert flatopt.get_num_threads() == 1
    assert flatopt.get_num_threads() == default
    previous = flatopt.set_num_threads(3)
    try:
        assert flatopt.get_num_threads() == (3 if flatopt.openmp_enabled() else 1)
    finally:
        flatopt.set_num_threads(previous)
    assert flatopt.get_num_threads() == default


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-2, ValueError), (1025, ValueError), (1.5, TypeError),
                                      ("2", TypeError), (True, TypeError)])
def test_bad_thread_counts(bad, exc):
    with pytest.raises(exc, match="n must be None or a positive int"):
        flatopt.set_num_threads(bad)
    with pytest.raises(exc, match="n_threads"):
        flatopt.SGD([np.zeros(2)], n_threads=bad)


@pytest.mark.skipif(not flatopt.openmp_enabled(), reason="serial build")
def test_default_honours_omp_num_threads():
    code = "import flatopt; print(flatopt.get_num_threads())"
    assert run_python(code, OMP_NUM_THREADS="1") == "1"
    assert run_python(code, OMP_NUM_THREADS="3") == "3"
    # beyond what set_num_threads takes: capped, so that set_num_threads(get_num_threads()) works
    code = "import flatopt; n = flatopt.get_num_threads(); flatopt.set_num_threads(n); print(n)"
    assert run_python(code, OMP_NUM_THREADS="3000") == "1024"


@pytest.mark.skipif(not flatopt.openmp_enabled(), reason="serial build")
def test_default_honours_threadpoolctl():
    pytest.importorskip("threadpoolctl")
    code = (
        "import flatopt, threadpoolctl\n"
        "before = flatopt.get_num_threads()\n"
        "with threadpoolctl.threadpool_limits(1, user_api='openmp'):\n"
        "    inside = flatopt.get_num_threads()\n"
        "print(before, inside, flatopt.get_num_threads())\n"
    )
    before, inside, after = map(int, run_python(code, OMP_NUM_THREADS="2").split())
    assert (before, inside, after) == (2, 1, 2)


def test_build_info_and_show_config(capsys):
    info = flatopt.build_info()
    for key in ("version", "openmp", "openmp_runtime", "compiler", "cflags", "default_n_threads"):
        assert key in info
    assert info["version"] == flatopt.__version__
    assert info["openmp"] is flatopt.openmp_enabled()
    assert info["default_n_threads"] == flatopt.get_num_threads()
    json.dumps(info)  # plain data
    flatopt.show_config()
    out = capsys.readouterr().out
    assert "openmp" in out and flatopt.__version__ in out

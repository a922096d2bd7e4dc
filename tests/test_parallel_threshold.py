"""The serial threshold grows with the thread count: a kernel goes parallel only when
every thread gets at least MIN_ELEMENTS_PER_THREAD elements."""

import subprocess
import sys
import textwrap

import pytest

import flatopt
from flatopt import _kernels


def test_threshold_is_per_thread():
    per = _kernels.MIN_ELEMENTS_PER_THREAD
    assert _kernels.PARALLEL_THRESHOLD == 2 * per
    assert _kernels.parallel_threshold(2) == 2 * per
    assert _kernels.parallel_threshold(4) == 4 * per
    assert _kernels.parallel_threshold(1) == 2 * per  # one thread never goes parallel


@pytest.mark.skipif(not flatopt.openmp_enabled(), reason="serial build")
@pytest.mark.parametrize("n_threads, extra, parallel", [(4, -1, False), (4, 0, True), (2, -1, False), (2, 0, True)])
def test_kernel_goes_parallel_exactly_at_the_threshold(n_threads, extra, parallel):
    # A fresh process, since parallel_used() stays True once any region has opened.
    code = textwrap.dedent(f"""
        import numpy as np
        from flatopt._dispatch import kernels
        n = kernels.parallel_threshold({n_threads}) + ({extra})
        p, g, v = (np.zeros(n, np.float32) for _ in range(3))
        kernels.momentum(p, g, v, 0.1, 0.9, 0.0, False, 1.0, {n_threads})
        print(kernels.parallel_used())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(parallel)

"""kernels.gather_bytes: gradients copied from where a framework left them into the flat
buffer (flatopt.torch's step), against NumPy's slice assignment."""

import numpy as np
import pytest

from flatopt._dispatch import kernels
from flatopt._kernels import PARALLEL_THRESHOLD


def gather_reference(out, arrays, offsets):
    out = out.copy()
    for a, o in zip(arrays, offsets):
        out[o:o + a.size] = a.ravel()
    return out


def table(arrays, offsets, dtype):
    item = np.dtype(dtype).itemsize
    sources = np.array([a.ctypes.data for a in arrays], dtype=np.intp)
    starts = np.concatenate(([0], np.cumsum([a.size * item for a in arrays]))).astype(np.intp)
    return sources, np.asarray(offsets, dtype=np.intp) * item, starts


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("sizes", [[], [0], [1], [7, 0, 4097], [PARALLEL_THRESHOLD - 1, 1],
                                   [PARALLEL_THRESHOLD + 1, 3, 2**17 + 3], [5] * 300],
                         ids=lambda s: f"{len(s)}-segments-{sum(s)}")
def test_matches_slice_assignment(dtype, n_threads, sizes):
    rng = np.random.default_rng(len(sizes))
    arrays = [rng.integers(1, 1000, n).astype(dtype) for n in sizes]
    offsets, o = [], 3  # gaps between segments (as aligned layouts have), left untouched
    for a in arrays:
        offsets.append(o)
        o += a.size + 5
    out = np.full(o + 2, 7, dtype=dtype)
    expected = gather_reference(out, arrays, offsets)
    sources, out_offsets, starts = table(arrays, offsets, dtype)
    kernels.gather_bytes(out.view(np.uint8), sources, out_offsets, starts, out.itemsize, n_threads)
    np.testing.assert_array_equal(out, expected)

"""Shared test parameters: the awkward sizes, dtypes and thread counts every kernel meets."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from flatopt._kernels import PARALLEL_THRESHOLD

SIZES = [0, 1, 7, 4097, PARALLEL_THRESHOLD - 1, PARALLEL_THRESHOLD + 1, 2**17 + 3]
DTYPES = [np.float32, np.float64]
THREADS = [1, 2]


@pytest.fixture(params=SIZES, ids=lambda n: f"n{n}")
def size(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture(params=THREADS, ids=lambda t: f"t{t}")
def n_threads(request):
    return request.param


def readonly_memmap(tmp_path, array, name="grad.bin"):
    """A read-only memory-mapped copy of ``array``."""
    path = tmp_path / name
    array.tofile(path)
    return np.memmap(path, dtype=array.dtype, mode="r", shape=array.shape)


def snapshot(*arrays):
    """Copies of ``arrays``, to check later that nothing was written."""
    return [np.array(a, copy=True) for a in arrays]


def assert_unchanged(arrays, copies):
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(np.asarray(a), c, strict=True)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example_module(name):
    """``examples/<name>.py`` imported as a module, and a mark that skips the tests when it
    is not beside the tests (the installed-wheel runs copy only tests/)."""
    path = EXAMPLES / f"{name}.py"
    skip = pytest.mark.skipif(not path.is_file(), reason=f"{path} not found "
                              "(the installed-wheel runs copy only tests/)")

    def load():
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return path, skip, load

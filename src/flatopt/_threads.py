"""Thread-count control: one helper decides how many OpenMP threads a kernel uses."""

import contextlib
import numbers

from ._openmp_helpers import omp_max_threads, openmp_enabled

_default_n_threads = None  # set by set_num_threads(); None follows OpenMP


def check_n_threads(n_threads, name="n_threads"):
    """Return ``n_threads`` if it is None or a positive int, else raise naming ``name``."""
    if n_threads is None:
        return None
    if isinstance(n_threads, bool) or not isinstance(n_threads, numbers.Integral):
        raise TypeError(f"{name} must be None or a positive int, got {n_threads!r}")
    if n_threads < 1:
        raise ValueError(f"{name} must be None or a positive int, got {n_threads!r}")
    return int(n_threads)


def effective_n_threads(n_threads=None):
    """The thread count a kernel will use for a request of ``n_threads``.

    ``None`` means the default: the value of :func:`set_num_threads` if one was set,
    otherwise ``omp_get_max_threads()``, which honours ``OMP_NUM_THREADS`` and
    threadpoolctl limits. A serial build always uses 1 thread. ``n_threads`` must already
    be validated (see :func:`check_n_threads`).
    """
    if not openmp_enabled():
        return 1
    if n_threads is None:
        n_threads = _default_n_threads
        if n_threads is None:
            return omp_max_threads()
    return n_threads


def get_num_threads():
    """The number of threads kernels use when ``n_threads=None`` (1 for a serial build)."""
    return effective_n_threads(None)


def set_num_threads(n):
    """Set the default thread count for every kernel call with ``n_threads=None``.

    ``None`` restores the default: ``omp_get_max_threads()`` (``OMP_NUM_THREADS``,
    threadpoolctl). Returns the previous setting (an int, or None).
    """
    global _default_n_threads
    previous = _default_n_threads
    _default_n_threads = check_n_threads(n, "n")
    return previous


@contextlib.contextmanager
def num_threads(n):
    """Context manager: use ``n`` threads by default inside the ``with`` block."""
    previous = set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(previous)


__all__ = ["get_num_threads", "set_num_threads", "num_threads", "openmp_enabled"]

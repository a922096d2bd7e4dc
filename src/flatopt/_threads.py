"""Thread-count control: one helper decides how many OpenMP threads a kernel uses."""

from __future__ import annotations

import contextlib
import numbers
import os
import sys
from collections.abc import Iterator

from ._openmp_helpers import omp_max_threads, openmp_enabled

_default_n_threads: int | None = None  # set by set_num_threads(); None follows OpenMP
# Requests beyond this are rejected: no machine today has more cores to give a memory-bound
# kernel, and libgomp aborts the whole process when it cannot create the threads asked for.
MAX_THREADS = 1024

# True in a child created by os.fork() after this process ran a parallel region. GNU
# libgomp keeps its thread pool across fork() although the threads do not survive it, so
# the child's next parallel region waits forever for them; such a child runs serially.
_serial_after_fork = False


def _after_fork_in_child() -> None:
    global _serial_after_fork
    kernel_modules = [m for name, m in list(sys.modules.items())
                      if name.startswith("flatopt._kernels") and hasattr(m, "parallel_used")]
    if any(m.parallel_used() for m in kernel_modules):
        _serial_after_fork = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_n_threads(n_threads: object, name: str = "n_threads") -> int | None:
    """Return ``n_threads`` if it is None or a positive int, else raise naming ``name``."""
    if n_threads is None:
        return None
    if isinstance(n_threads, bool) or not isinstance(n_threads, numbers.Integral):
        raise TypeError(f"{name} must be None or a positive int, got {n_threads!r}")
    if not 1 <= int(n_threads) <= MAX_THREADS:
        raise ValueError(f"{name} must be None or a positive int (at most {MAX_THREADS}), "
                         f"got {n_threads!r}")
    return int(n_threads)


def effective_n_threads(n_threads: int | None = None) -> int:
    """The thread count a kernel will use for a request of ``n_threads``.

    ``None`` means the default: the value of :func:`set_num_threads` if one was set,
    otherwise ``omp_get_max_threads()``, which honours ``OMP_NUM_THREADS`` and
    threadpoolctl limits, up to :data:`MAX_THREADS` (so that the default is always a
    count :func:`set_num_threads` takes back). A serial build always uses 1 thread. ``n_threads`` must already
    be validated (see :func:`check_n_threads`). In a child forked after a parallel
    region the answer is 1 (see ``_serial_after_fork``); results are the same for any
    thread count.
    """
    if not openmp_enabled() or _serial_after_fork:
        return 1
    if n_threads is None:
        n_threads = _default_n_threads
        if n_threads is None:
            n_threads = omp_max_threads()
            return n_threads if n_threads <= MAX_THREADS else MAX_THREADS
    return n_threads


def get_num_threads() -> int:
    """The number of threads kernels use when ``n_threads=None``.

    Returns
    -------
    int
        The value set by :func:`set_num_threads`, else ``omp_get_max_threads()`` (which
        honours ``OMP_NUM_THREADS`` and threadpoolctl) up to 1024, the most
        :func:`set_num_threads` takes; 1 for a serial build and in a child process forked
        after a parallel step.

    Examples
    --------
    >>> import flatopt
    >>> flatopt.get_num_threads() >= 1
    True
    """
    return effective_n_threads(None)


def set_num_threads(n: int | None) -> int | None:
    """Set the default thread count for every kernel call with ``n_threads=None``.

    Parameters
    ----------
    n : int or None
        A positive thread count, or None to restore the default:
        ``omp_get_max_threads()`` (``OMP_NUM_THREADS``, threadpoolctl).

    Returns
    -------
    int or None
        The previous setting, to restore it later.

    See Also
    --------
    num_threads : the same, for the duration of a ``with`` block.

    Examples
    --------
    >>> import flatopt
    >>> previous = flatopt.set_num_threads(1)
    >>> flatopt.get_num_threads()
    1
    >>> flatopt.set_num_threads(previous)
    1
    """
    global _default_n_threads
    previous = _default_n_threads
    _default_n_threads = check_n_threads(n, "n")
    return previous


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Context manager: use ``n`` threads by default inside the ``with`` block.

    Parameters
    ----------
    n : int or None
        As for :func:`set_num_threads`; the previous setting is restored on exit, also
        when the block raises.

    Examples
    --------
    >>> import flatopt
    >>> with flatopt.num_threads(1):
    ...     flatopt.get_num_threads()
    1
    """
    previous = set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(previous)


__all__ = ["get_num_threads", "set_num_threads", "num_threads", "openmp_enabled"]

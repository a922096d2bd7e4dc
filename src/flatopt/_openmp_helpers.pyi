"""Type stubs for ``_openmp_helpers.pyx``: what the OpenMP runtime of the build says."""

def openmp_enabled() -> bool:
    """True when flatopt was compiled with OpenMP; False for a serial build."""

def openmp_version() -> int:
    """The ``_OPENMP`` date macro of the build (for example 201511), or 0 without OpenMP."""

def omp_max_threads() -> int:
    """``omp_get_max_threads()``: honours OMP_NUM_THREADS and threadpoolctl limits."""

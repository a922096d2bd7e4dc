"""What the OpenMP runtime this module was built against says (sklearn's pattern)."""


def openmp_enabled():
    """True when flatopt was compiled with OpenMP; False for a serial build."""
    return FLATOPT_OPENMP


def openmp_version():
    """The ``_OPENMP`` date macro of the build (for example 201511), or 0 without OpenMP."""
    return FLATOPT_OPENMP_VERSION


def omp_max_threads():
    """``omp_get_max_threads()``: honours OMP_NUM_THREADS and threadpoolctl limits."""
    return omp_get_max_threads()

"""build_info() and show_config(): what this installation of flatopt is made of."""

import sys

from . import _dispatch
from ._openmp_helpers import openmp_enabled, openmp_version
from ._threads import get_num_threads
from ._version import __version__

try:
    from ._build_config import BUILD_CONFIG
except ImportError:  # pragma: no cover - only for a tree built without setup.py
    BUILD_CONFIG = {}


def _openmp_runtime():
    """The OpenMP library loaded in this process, as threadpoolctl reports it."""
    if not openmp_enabled():
        return None
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (install threadpoolctl to identify it)"
    libs = [i for i in threadpool_info() if i.get("user_api") == "openmp"]
    if not libs:
        return "unknown"
    return "; ".join(f"{i['internal_api']} ({i['filepath']})" for i in libs)


def build_info():
    """A dict describing this build and how it runs here.

    Keys: version, OpenMP (compiled in, version, runtime library), compiler and flags,
    the ISA level in use with the levels built and those this CPU supports, the serial
    threshold and the default thread count.
    """
    return {
        "version": __version__,
        "openmp": openmp_enabled(),
        "openmp_version": openmp_version() or None,
        "openmp_runtime": _openmp_runtime(),
        "compiler": BUILD_CONFIG.get("compiler"),
        "cflags": BUILD_CONFIG.get("cflags"),
        "ldflags": BUILD_CONFIG.get("ldflags"),
        "cython_debug": BUILD_CONFIG.get("cython_debug"),
        "platform": BUILD_CONFIG.get("platform"),
        "isa": _dispatch.ISA,
        "isa_available": _dispatch.available_levels(),
        "isa_supported": _dispatch.supported_levels(),
        "parallel_threshold": _dispatch.kernels.PARALLEL_THRESHOLD,
        "default_n_threads": get_num_threads(),
        "python": sys.version.split()[0],
    }


def show_config(file=None):
    """Print :func:`build_info` as aligned ``key: value`` lines."""
    info = build_info()
    width = max(map(len, info))
    for key, value in info.items():
        if isinstance(value, list):
            value = " ".join(value)
        print(f"{key:<{width}} : {value}", file=file or sys.stdout)

"""Pick, at import time, the kernel module built for the widest ISA the CPU supports.

setup.py compiles ``_kernels.pyx`` once per ISA level (``flatopt._kernels`` for the
platform baseline, ``_kernels_avx2`` and ``_kernels_avx512`` on x86-64). All are built
with ``-ffp-contract=off`` and give bit-identical results; they differ only in speed.
``FLATOPT_ISA=baseline|avx2|avx512`` forces a level.
"""

import importlib
import os

from ._cpu_features import cpu_supports

LEVELS = ("avx512", "avx2", "baseline")  # widest first
MODULES = {"baseline": "flatopt._kernels", "avx2": "flatopt._kernels_avx2",
           "avx512": "flatopt._kernels_avx512"}


def _import(level):
    try:
        return importlib.import_module(MODULES[level])
    except ImportError:
        return None


def available_levels():
    """ISA levels whose kernel module was built and installed, widest first."""
    return [level for level in LEVELS if _import(level) is not None]


def supported_levels():
    """Built ISA levels that this CPU can run, widest first."""
    return [level for level in available_levels() if cpu_supports(level)]


def select(forced=None):
    """The (level, module) to use: ``forced`` if given (and usable), else the widest."""
    if forced is None or forced == "":
        level = supported_levels()[0]
        return level, _import(level)
    if forced not in MODULES:
        raise ValueError(f"FLATOPT_ISA must be one of {', '.join(reversed(LEVELS))}; got {forced!r}")
    if _import(forced) is None:
        raise ValueError(f"FLATOPT_ISA={forced}, but this build of flatopt has only "
                         f"{', '.join(available_levels())} kernels")
    if not cpu_supports(forced):
        raise ValueError(f"FLATOPT_ISA={forced}, but this CPU does not support {forced}")
    return forced, _import(forced)


ISA, kernels = select(os.environ.get("FLATOPT_ISA", "").strip().lower() or None)

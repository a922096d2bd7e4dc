"""Pick, at import time, the kernel module built for the widest ISA the CPU supports.

setup.py compiles ``_kernels.pyx`` once per ISA level: ``flatopt._kernels`` for the
platform baseline (x86-64-v2 on x86-64, NEON on aarch64), and on x86-64 also
``_kernels_avx2`` and ``_kernels_avx512``, whose *whole* module, initialisation code
included, is compiled for that ISA. Importing a variant on a CPU without its ISA dies with
SIGILL, so the order here is strict, as in NumPy's CPU dispatch:

1. ask the CPU and the OS what they support (``_cpu_features``, baseline code);
2. find which variants were built without importing them (``importlib.util.find_spec``);
3. import exactly one module: the widest built and supported level, or ``FLATOPT_ISA``'s.

All builds use ``-ffp-contract=off`` and give bit-identical results; they differ only in
speed. Environment:

``FLATOPT_ISA=baseline|avx2|avx512``
    use that level; a level that was not built, or that this CPU lacks, raises ValueError
    (naming the levels this CPU supports) instead of crashing.
``FLATOPT_DISABLE_CPU_FEATURES="avx512 avx2"``
    treat the CPU as lacking these levels (like NumPy's ``NPY_DISABLE_CPU_FEATURES``): for
    tests, and to rule out a variant when chasing a problem.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from ._cpu_features import IS_X86_64, cpu_supports

# Widest first. Only x86-64 has variant builds; elsewhere "baseline" is the only level.
LEVELS = ("avx512", "avx2", "baseline") if IS_X86_64 else ("baseline",)
MODULES = {"baseline": "flatopt._kernels", "avx2": "flatopt._kernels_avx2",
           "avx512": "flatopt._kernels_avx512"}


def _env_levels(name: str) -> set[str]:
    return {word for word in os.environ.get(name, "").replace(",", " ").lower().split()}


def _disabled() -> set[str]:
    words = _env_levels("FLATOPT_DISABLE_CPU_FEATURES")
    # The same words everywhere: a typo is an error on aarch64 too, where the x86 levels
    # named here are accepted and have nothing to disable.
    unknown = words - set(MODULES)
    if unknown or "baseline" in words:
        raise ValueError(
            "FLATOPT_DISABLE_CPU_FEATURES may name avx512 and avx2; got "
            f"{os.environ.get('FLATOPT_DISABLE_CPU_FEATURES')!r}")
    return words


def available_levels() -> list[str]:
    """ISA levels whose kernel module was built and installed, widest first.

    Answered from the import system's metadata: no variant module is imported (importing
    one runs code compiled for its ISA).
    """
    return [level for level in LEVELS if importlib.util.find_spec(MODULES[level]) is not None]


def supported_levels() -> list[str]:
    """Built ISA levels that this CPU and OS can run, widest first (never imports one)."""
    disabled = _disabled()
    return [level for level in available_levels()
            if level not in disabled and cpu_supports(level)]


def select(forced: str | None = None) -> tuple[str, ModuleType]:
    """The (level, module) to use: ``forced`` if given and usable, else the widest.

    Support is decided before anything is imported; only the chosen module is imported.
    """
    supported = supported_levels()
    if not forced:
        level = supported[0]
    elif forced not in LEVELS:
        raise ValueError(
            f"FLATOPT_ISA must be one of {', '.join(reversed(LEVELS))}; got {forced!r}")
    elif forced not in available_levels():
        raise ValueError(f"FLATOPT_ISA={forced}, but this build of flatopt has only "
                         f"{', '.join(available_levels())} kernels")
    elif forced not in supported:
        raise ValueError(f"FLATOPT_ISA={forced}, but this CPU does not support {forced}; "
                         f"it supports {', '.join(supported)}")
    else:
        level = forced
    return level, importlib.import_module(MODULES[level])


ISA, kernels = select(os.environ.get("FLATOPT_ISA", "").strip().lower() or None)


# ---- kernels specialised for one dtype ------------------------------------------------------
# Each kernel is a Cython fused-type function: a call first inspects its buffers' dtypes to
# pick the float or double specialisation (~0.3 us a call, measured). An optimizer's
# buffers never change dtype, so it resolves each specialisation once (Specialized) and
# calls it directly.

_FUSED_NAMES = {"float32": "float", "float64": "double"}
_specialized: dict[str, Specialized] = {}


class Specialized:
    """The kernels of :data:`kernels` specialised for one dtype: ``k.momentum`` is
    ``kernels.momentum["float"]`` for float32; looked up on first use, then an attribute.

    A specialisation accepts only its dtype (another raises ValueError, "Buffer dtype
    mismatch"); callers validate their buffers first, as for the fused kernels.
    """

    def __init__(self, dtype: str) -> None:
        self._dtype = dtype
        self._index = _FUSED_NAMES[dtype]
        #: A zero-length buffer for a kernel's unused state argument (Adam's
        #: ``max_exp_avg_sq`` without amsgrad, say), so that a step slices nothing.
        self.empty = kernels.as_view[self._index](np.empty(0, dtype))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        kernel = getattr(kernels, name)
        if hasattr(kernel, "__signatures__"):
            kernel = kernel[self._index]
        setattr(self, name, kernel)
        return kernel

    def __reduce__(self) -> tuple[Any, tuple[str]]:  # copies and pickles of an optimizer share the one instance
        return specialized, (self._dtype,)

    def __repr__(self) -> str:
        return f"<flatopt {ISA} kernels for {self._dtype}>"


def specialized(dtype: npt.DTypeLike) -> Specialized:
    """The :class:`Specialized` kernels for ``dtype`` (float32 or float64), one per dtype."""
    name = np.dtype(dtype).name
    k = _specialized.get(name)
    if k is None:
        k = _specialized[name] = Specialized(name)
    return k


class KernelsFor:
    """A class attribute: ``self.<name>`` is ``specialized(self.layout.dtype)``, resolved on
    first access and then stored on the instance (one attribute read per step)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        k = specialized(obj.layout.dtype)
        obj.__dict__[self._name] = k
        return k

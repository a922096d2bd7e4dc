"""build_info() and show_config(): what this installation of flatopt is made of."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO, cast

from . import _dispatch
from ._openmp_helpers import openmp_enabled, openmp_version
from ._threads import get_num_threads
from ._version import __version__

BUILD_CONFIG: dict[str, Any]
try:
    from ._build_config import BUILD_CONFIG as _WRITTEN  # written by setup.py

    BUILD_CONFIG = _WRITTEN
except ImportError:  # pragma: no cover - only for a tree built without setup.py
    BUILD_CONFIG = {}


def _openmp_runtime() -> str | None:
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


def _wheel_tag() -> str | None:
    """The compressed tag set of the wheel this copy of flatopt was installed from.

    For example ``cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64``, read from the
    ``WHEEL`` file of the installed distribution. None when this copy was not installed from
    a wheel: a source tree on ``sys.path``, an editable install, or a distribution whose
    files are not the ones imported here.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution("flatopt")
    except metadata.PackageNotFoundError:
        return None
    try:
        ours = os.path.realpath(__file__)
        theirs = os.path.realpath(
            cast("os.PathLike[str]", dist.locate_file(os.path.join("flatopt", "_config.py"))))
    except (OSError, TypeError, ValueError):  # pragma: no cover - exotic finders
        return None
    if os.path.normcase(ours) != os.path.normcase(theirs):
        return None
    wheel = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines()
            if line.startswith("Tag:")]
    if not tags:
        return None
    parts: list[list[str]] = [[], [], []]
    for tag in tags:
        for seen, part in zip(parts, tag.split("-")):
            if part not in seen:
                seen.append(part)
    return "-".join(".".join(sorted(seen)) for seen in parts)


def build_info() -> dict[str, Any]:
    """A dict describing this build and how it runs here.

    Returns
    -------
    dict
        ``version``; ``openmp`` (compiled in), ``openmp_version`` and ``openmp_runtime``
        (the library loaded, as threadpoolctl reports it); ``compiler``, ``cflags``,
        ``ldflags``, ``cython_debug`` and ``platform`` of the build; ``wheel_tag`` (None
        unless installed from a wheel); ``isa`` (the instruction-set level in use),
        ``isa_built``, ``isa_available`` and ``isa_supported``;
        ``min_elements_per_thread`` (a kernel runs on its ``n_threads`` only when each
        gets at least this many elements, otherwise on the calling thread) and
        ``parallel_threshold`` (that size for two threads); ``default_n_threads`` and
        ``python``.

    See Also
    --------
    show_config : prints the same.

    Examples
    --------
    >>> import flatopt
    >>> info = flatopt.build_info()
    >>> info["version"] == flatopt.__version__
    True
    >>> info["isa"] in info["isa_supported"]
    True
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
        "wheel_tag": _wheel_tag(),
        "isa": _dispatch.ISA,
        "isa_built": BUILD_CONFIG.get("isa_built"),
        "isa_available": _dispatch.available_levels(),
        "isa_supported": _dispatch.supported_levels(),
        "min_elements_per_thread": _dispatch.kernels.MIN_ELEMENTS_PER_THREAD,
        "parallel_threshold": _dispatch.kernels.PARALLEL_THRESHOLD,
        "default_n_threads": get_num_threads(),
        "python": sys.version.split()[0],
    }


def show_config(file: TextIO | None = None) -> None:
    """Print :func:`build_info` as aligned ``key : value`` lines.

    Parameters
    ----------
    file : file-like, optional
        Where to print; ``sys.stdout`` by default.
    """
    info = build_info()
    width = max(map(len, info))
    for key, value in info.items():
        if isinstance(value, list):
            value = " ".join(value)
        print(f"{key:<{width}} : {value}", file=file or sys.stdout)

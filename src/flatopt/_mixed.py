"""Mixed precision: 16-bit parameters (float16, or ``ml_dtypes.bfloat16``) with float32
master weights and state.

Every optimizer steps in one pass: its float32 kernel takes a ``kernels.HalfGrads``,
widens each piece of 1024 16-bit gradients into a buffer on its stack, updates the master
and state from there, and narrows the piece's new master values into the 16-bit
parameters while they are in L1: bit for bit the float32 kernel followed by the cast
(``widen16`` / ``narrow16`` in ``_kernels.pyx``). ``ml_dtypes`` is imported only when
needed.
"""

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ._dispatch import kernels
from ._validation import looks_bfloat16

if TYPE_CHECKING:
    from ._layout import FlatLayout
# Elements per thread and block of ``grad_norm`` on 16-bit gradients: each block is widened
# into a float32 scratch buffer (256 KiB a thread, in L2) and its partial norms taken there.
MIXED_BLOCK = 65536


def _bfloat16() -> np.dtype[Any] | None:
    """``ml_dtypes.bfloat16``'s dtype, or None when ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    return bfloat16


def _kind_of(dtype: np.dtype[Any]) -> int | None:
    """The kernel kind of a 16-bit float dtype, or None."""
    if dtype == np.float16:
        fp16: int = kernels.KIND_FP16
        return fp16
    if looks_bfloat16(dtype):
        if dtype == _bfloat16():
            bf16: int = kernels.KIND_BF16
            return bf16
    return None


def half_kind(arrays: Sequence[npt.NDArray[Any]], master_dtype: npt.DTypeLike | None,
              dtype: npt.DTypeLike | None) -> tuple[np.dtype[Any], int | None] | None:
    """``(dtype, kind)`` of 16-bit ``arrays`` with ``master_dtype``, or None for ordinary
    (float32/float64) params, or params that ``dtype`` converts (16-bit ones too). Raises,
    before anything is written, for 16-bit params with neither, ``master_dtype`` without
    16-bit params, a mix of 16-bit kinds, or arrays that are not 16-bit floats."""
    kinds = [_kind_of(a.dtype) for a in arrays]
    if master_dtype is None and dtype is not None:  # converted, as any real arrays
        return None
    if master_dtype is None:
        for i, (a, k) in enumerate(zip(arrays, kinds)):
            if k is not None:
                raise TypeError(
                    f"params[{i}] has dtype {a.dtype}: 16-bit parameters need float32 master "
                    "weights, pass master_dtype=np.float32 (or dtype=np.float32 to train float32 "
                    "copies of them)")
        return None
    if dtype is not None:
        raise TypeError("pass either dtype= or master_dtype=, not both (with master_dtype the "
                        "parameters keep their 16-bit dtype)")
    resolve_master(master_dtype)
    for i, (a, k) in enumerate(zip(arrays, kinds)):
        if k is None:
            what = ("wider than" if a.dtype.kind == "f" and a.dtype.itemsize >= 4
                    else "not a 16-bit float like")
            raise TypeError(
                f"params[{i}] has dtype {a.dtype}, {what} the float16/bfloat16 parameters "
                "master_dtype is for; master_dtype must be wider than the parameters")
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) > 1:
        raise TypeError("params must share one 16-bit dtype, got "
                        + ", ".join(sorted(str(d) for d in dtypes)))
    d = dtypes.pop()
    return d, _kind_of(d)


def resolve_master(master_dtype: npt.DTypeLike | None) -> np.dtype[Any]:
    """``master_dtype`` as np.float32 (the only master the kernels support), or raise."""
    try:
        d = np.dtype(master_dtype)
    except TypeError:
        raise TypeError(f"master_dtype must be np.float32, got {master_dtype!r}") from None
    if d != np.float32:
        raise TypeError(f"master_dtype must be np.float32, got {d}")
    return d


def check_half_grads(grads: npt.NDArray[Any], dtype: np.dtype[Any], size: int) -> npt.NDArray[Any]:
    """A flat 16-bit gradient given to ``step()``: 1-D, contiguous, ``dtype``, ``size``."""
    if grads.dtype != dtype:
        raise TypeError(f"grads must have dtype {dtype}, got {grads.dtype}")
    if grads.ndim != 1:
        raise ValueError(f"grads must be 1-D, got shape {grads.shape}")
    if grads.shape[0] != size:
        raise ValueError(f"grads must have length {size}, got {grads.shape[0]}")
    if not grads.flags.c_contiguous:
        raise ValueError(f"grads must be C-contiguous, got strides {grads.strides}")
    return grads


class HalfLayout:
    """What :func:`flatopt._layout.adopt` needs of a layout: the 16-bit dtype."""

    def __init__(self, dtype: np.dtype[Any]) -> None:
        self.dtype = dtype


def split(flat: npt.NDArray[Any], layout: "FlatLayout") -> list[npt.NDArray[Any]]:
    """Views of the 16-bit ``flat`` shaped like ``layout``'s arrays, in order."""
    return [flat[o:o + math.prod(s)].reshape(s) for o, s in zip(layout.offsets, layout.shapes)]


__all__ = ["MIXED_BLOCK", "check_half_grads", "half_kind", "resolve_master"]

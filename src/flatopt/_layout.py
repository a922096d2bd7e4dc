"""Flat buffers: pack many arrays into one aligned 1-D buffer and hand back views."""

import itertools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ._validation import FLOAT_DTYPES, FloatArray, check_flat, check_float_dtype, describe, is_real

#: A shape: a tuple of non-negative ints.
Shape = tuple[int, ...]

ALIGNMENT = 64  # bytes: a cache line, and the widest SIMD register (AVX-512)

# Large buffers do not all start at the same offset within a 4 KiB page: each one starts
# STAGGER_STEP bytes further than the one allocated before it (cycling through 4 KiB), as
# the STREAM benchmark's OFFSET does. A kernel walks param, grad and state in lockstep;
# when their starts agree modulo 4 KiB (what the allocator gives: every large buffer is a
# fresh mmap, data at the same offset in its first page), a load of one stream and a
# pending store to another share address bits 0-11, so the CPU's store-to-load check
# stalls the load ("4K aliasing"), and the streams fight over the same L1 sets.
# Measured (flatopt Adam, float32, 2**25 elements, 2 threads, CPU time per step, which a
# busy shared machine distorts least; 7 interleaved rounds, medians): starting the four
# buffers 0, 1, 2, 3 lines apart saves 5%, 4 lines apart 8-12%, 8 lines apart 9% (AVX-512)
# and 13% (AVX2 kernels). Starting each thread's chunk on a cache line boundary, also
# tested, changed nothing measurable (within 1%), so the static schedule is kept.
# Nor did spreading the four starts apart modulo 2 MiB as well (64 KiB or 512 KiB apart,
# so that streams in huge pages do not walk the same DRAM banks in step): AMD EPYC Zen 4,
# 2**23 elements, 9 interleaved rounds, paired ratios 0.99-1.02.
# Buffers below STAGGER_MIN_BYTES are only aligned: they live in cache and the padding
# (up to 4 KiB) would be a real share of their size.
# Also measured: NumPy asks for transparent huge pages (madvise) for allocations of 4 MiB
# and up, which these buffers are (checked in /proc/self/smaps); with 4 KiB pages the same
# step takes 14% (2**25) to 24% (2**23) longer. Buffers of 1-2 MiB showed no difference
# (within 2%), so flatopt does not madvise smaller buffers itself. torch's CPU allocator
# asks for huge pages only with THP_MEM_ALLOC_ENABLE=1: compare with torch that way.
PAGE = 4096
STAGGER_STEP = 512  # bytes: 8 cache lines, so 8 consecutive buffers tile a page
STAGGER_MIN_BYTES = 1 << 20
_next_slot = itertools.count()


def aligned_zeros(n: int, dtype: npt.DTypeLike) -> FloatArray:
    """A zeroed, 1-D, C-contiguous array of ``n`` elements whose data is 64-byte aligned.

    From ``STAGGER_MIN_BYTES`` up, the data also starts at a page offset (a multiple of
    ``STAGGER_STEP``) that differs from that of the previous such buffer (see above).
    """
    dtype = np.dtype(dtype)
    nbytes = n * dtype.itemsize
    if nbytes < STAGGER_MIN_BYTES:
        raw = np.zeros(nbytes + ALIGNMENT, dtype=np.uint8)
        start = -raw.ctypes.data % ALIGNMENT
    else:
        offset = next(_next_slot) * STAGGER_STEP % PAGE
        raw = np.zeros(nbytes + PAGE, dtype=np.uint8)
        start = (offset - raw.ctypes.data) % PAGE
    return raw[start:start + nbytes].view(dtype)


def _as_array(x: object, name: str) -> npt.NDArray[Any]:
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)  # torch CPU tensors and other array-likes, zero-copy if possible
    except Exception as exc:
        raise TypeError(f"{name} must be an array, got {describe(x)}") from exc


def resolve_dtype(arrays: Sequence[npt.NDArray[Any]], dtype: npt.DTypeLike | None,
                  name: str = "arrays") -> np.dtype[Any]:
    """The dtype of a packing: ``dtype`` if given, else the one floating dtype of all."""
    for i, a in enumerate(arrays):
        kind = a.dtype.kind
        ok = kind == "f" if dtype is None else is_real(a.dtype)
        if not ok or (dtype is None and a.dtype not in FLOAT_DTYPES):
            expected = "float32 or float64" if dtype is None else "a real (float or integer)"
            raise TypeError(f"{name}[{i}] must have {expected} dtype, got {a.dtype}")
    if dtype is not None:
        return check_float_dtype(dtype)
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) > 1:
        found = ", ".join(sorted(str(d) for d in dtypes))
        raise TypeError(f"{name} must share one dtype (or pass dtype=), got {found}")
    return dtypes.pop() if dtypes else np.dtype(np.float64)


def _check_shapes(shapes: object) -> tuple[Shape, ...]:
    """``shapes`` as a tuple of tuples of non-negative ints, or raise naming the culprit."""
    if isinstance(shapes, (str, bytes, np.ndarray)) or not hasattr(shapes, "__iter__"):
        raise TypeError(f"shapes must be a sequence of shapes, got {describe(shapes)}")
    result = []
    for i, s in enumerate(shapes):
        if isinstance(s, (str, bytes)) or not hasattr(s, "__iter__"):
            raise TypeError(f"shapes[{i}] must be a sequence of ints, got {describe(s)}")
        s = tuple(s)
        for d in s:
            if isinstance(d, (bool, np.bool_)) or not isinstance(d, numbers.Integral):
                raise TypeError(f"shapes[{i}] must be a sequence of ints, got {s!r}")
            if d < 0:
                raise ValueError(f"shapes[{i}] must have non-negative dimensions, got {s}")
        result.append(tuple(int(d) for d in s))
    return tuple(result)


@dataclass(frozen=True)
class FlatLayout:
    """Shapes and dtype of arrays packed back to back in one flat buffer.

    ``offsets[i]`` is where array ``i`` starts; ``size`` is the total element count.
    """

    # No padding between arrays: a view starts where the previous one ends, so most are not
    # 64-byte aligned (a 100-element bias moves the next by 400 bytes). Measured on the
    # Xeon (PyTorch 2.13, 2 threads, 9 interleaved rounds): forward plus backward of an
    # MLP whose parameters are such views (16-48 bytes off alignment, width 100 and 1000)
    # took the same time as with separately allocated parameters, within 1%.

    shapes: tuple[Shape, ...]
    dtype: np.dtype[Any]
    offsets: tuple[int, ...] = field(init=False, repr=False)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        shapes = _check_shapes(self.shapes)
        if self.dtype is None:  # (NumPy reads None as float64)
            raise TypeError("dtype must be float32 or float64, got None")
        dtype = check_float_dtype(self.dtype)
        offsets, total = [], 0
        for s in shapes:
            offsets.append(total)
            total += math.prod(s)
        if total * dtype.itemsize > np.iinfo(np.intp).max - PAGE:
            raise ValueError(f"shapes describe {total} elements, too many to allocate")
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "size", total)

    @classmethod
    def from_arrays(cls, arrays: Iterable[npt.ArrayLike], dtype: npt.DTypeLike | None = None) -> "FlatLayout":
        """The layout that packs ``arrays`` (in order) with ``dtype`` (see :func:`flatten`)."""
        checked = [_as_array(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
        return cls(tuple(a.shape for a in checked), resolve_dtype(checked, dtype))

    def __len__(self) -> int:
        return len(self.shapes)

    def zeros(self) -> FloatArray:
        """A new zeroed, 64-byte-aligned flat buffer of this layout."""
        return aligned_zeros(self.size, self.dtype)

    def split(self, flat: FloatArray) -> list[FloatArray]:
        """Views of ``flat`` shaped like the layout's arrays, in order."""
        check_flat(flat, "flat", dtype=self.dtype, size=self.size, writable=False)
        return [flat[o:o + math.prod(s)].reshape(s) for o, s in zip(self.offsets, self.shapes)]

    def pack(self, arrays: Iterable[npt.ArrayLike], out: FloatArray | None = None) -> FloatArray:
        """Copy ``arrays`` into ``out`` (a new buffer if None) and return it."""
        checked = [_as_array(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
        if len(checked) != len(self.shapes):
            raise ValueError(f"arrays must have {len(self.shapes)} entries, got {len(checked)}")
        for i, (a, s) in enumerate(zip(checked, self.shapes)):
            if a.shape != s:
                raise ValueError(f"arrays[{i}] must have shape {s}, got {a.shape}")
        resolve_dtype(checked, self.dtype)
        if out is None:
            out = self.zeros()
        else:
            check_flat(out, "out", dtype=self.dtype, size=self.size)
        copy_into(self.split(out), checked, out)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain, picklable description: ``{"shapes": [...], "dtype": "float32"}``."""
        return {"shapes": [list(s) for s in self.shapes], "dtype": self.dtype.name}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FlatLayout":
        """The layout that :meth:`to_dict` described (checked as the constructor checks)."""
        if not isinstance(d, dict) or set(d) != {"shapes", "dtype"}:
            raise ValueError(f"layout must be a dict with keys 'shapes' and 'dtype', got {describe(d)}")
        return cls(d["shapes"], d["dtype"])


def check_copy(views: Sequence[npt.NDArray[Any]], arrays: Sequence[npt.NDArray[Any]],
               out: npt.NDArray[Any], name: str = "arrays", out_name: str = "out") -> set[int]:
    """Raise if :func:`copy_into` could not copy ``arrays`` into ``views`` of ``out``;
    return the indices of the arrays that already are their own destination.

    Copying one array at a time, an input that views ``out`` at another place (swapped
    views, say) would be overwritten before it is read. The common case (no input inside
    ``out``) costs one ``np.may_share_memory`` per array. ``name`` and ``out_name`` are
    what the error calls the arrays and ``out``.
    """
    in_place = set()
    for i, a in enumerate(arrays):
        if np.may_share_memory(a, out):
            if _same_view(a, views[i]):
                in_place.add(i)
            elif np.shares_memory(a, out):
                raise ValueError(f"{name}[{i}] shares memory with {out_name} at another place than "
                                 f"its own (views given in another order?); nothing was copied")
    return in_place


def copy_into(views: Sequence[npt.NDArray[Any]], arrays: Sequence[npt.NDArray[Any]],
              out: npt.NDArray[Any], name: str = "arrays", in_place: set[int] | None = None) -> None:
    """Copy each of ``arrays`` into the matching view of the flat buffer ``out``, after
    :func:`check_copy` (which raises before any write), or skipping ``in_place``, what
    an earlier call of it returned."""
    if in_place is None:
        in_place = check_copy(views, arrays, out, name)
    for i, (view, a) in enumerate(zip(views, arrays)):
        if i not in in_place:
            np.copyto(view, a, casting="unsafe")


def _same_view(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    """True if ``a`` and ``b`` are the same elements of memory, in the same order."""
    return (a.dtype == b.dtype and a.shape == b.shape and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def flatten(arrays: Iterable[npt.ArrayLike],
            dtype: npt.DTypeLike | None = None) -> tuple[FloatArray, list[FloatArray]]:
    """Copy ``arrays`` into one new flat buffer; return ``(flat, views)``.

    ``flat`` is 1-D, C-contiguous and 64-byte aligned; ``views`` are arrays shaped like the
    inputs that view ``flat``, in order and without gaps. Without ``dtype`` all inputs
    must share one dtype, float32 or float64; ``dtype`` converts real inputs.
    """
    if isinstance(arrays, (np.ndarray, str, bytes)) or not hasattr(arrays, "__iter__"):
        raise TypeError(f"arrays must be a sequence of arrays, got {describe(arrays)}")
    checked = [_as_array(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    layout = FlatLayout.from_arrays(checked, dtype)
    flat = layout.pack(checked)
    return flat, layout.split(flat)


class _HasDType(Protocol):
    @property
    def dtype(self) -> np.dtype[Any]: ...


def adopt(arrays: Sequence[npt.NDArray[Any]], layout: _HasDType) -> FloatArray | None:
    """The flat buffer that ``arrays`` already are views of, or None.

    The arrays must be writable, C-contiguous, of the layout's dtype, and lie back to back
    in memory, in order, inside one ndarray they descend from.
    """
    nonempty = [a for a in arrays if a.size]
    if not nonempty or any(
        not isinstance(a, np.ndarray) or a.dtype != layout.dtype
        or not a.flags.c_contiguous or not a.flags.writeable for a in arrays
    ):
        return None
    start = nonempty[0].ctypes.data
    end = start
    for a in nonempty:
        if a.ctypes.data != end:
            return None
        end += a.nbytes
    base = nonempty[0].base
    while isinstance(base, np.ndarray):
        lo = base.ctypes.data
        if base.flags.c_contiguous and base.flags.writeable and lo <= start and end <= lo + base.nbytes:
            raw = base.reshape(-1).view(np.uint8)[start - lo:end - lo]
            return raw.view(layout.dtype)
        base = base.base
    return None

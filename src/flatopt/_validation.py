"""Argument checks shared by the whole Python layer.

Every public entry point validates here, before any buffer is written, and raises a
TypeError or ValueError that names the argument, what was expected and what was given.
"""

import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import numpy.typing as npt

#: A float32 or float64 array (the dtypes flatopt computes in).
FloatArray = npt.NDArray[np.floating[Any]]
if TYPE_CHECKING:
    from ._kernels import GradTable, HalfGrads, KernelView
#: A buffer a step kernel reads or updates: a flat array or (what optimizers keep for
#: every step) the kernels' own typed memoryview of one, which they take without a
#: buffer request (``kernels.as_view``).
KernelBuffer = Union[FloatArray, "KernelView"]
#: Each group's "param", "grad" and state buffers, as its step kernel takes them.
Segment = dict[str, KernelBuffer]
#: A step kernel's gradient: a flat buffer, a table of sources read in place
#: (flatopt.torch passes one), or 16-bit gradients for a float32 master (mixed precision).
KernelGrad = Union[FloatArray, "KernelView", "GradTable", "HalfGrads"]

FLOAT_DTYPES: tuple[np.dtype[Any], ...] = (np.dtype(np.float32), np.dtype(np.float64))
_LARGEST: dict[np.dtype[Any], float] = {d: float(np.finfo(d).max) for d in FLOAT_DTYPES}
_TINIEST: dict[np.dtype[Any], float] = {d: float(np.finfo(d).smallest_subnormal) for d in FLOAT_DTYPES}


def describe(x: object) -> str:
    """A short description of ``x`` for error messages."""
    if isinstance(x, np.ndarray):
        return f"array of dtype {x.dtype} and shape {x.shape}"
    return f"{type(x).__name__} {x!r}" if np.isscalar(x) else type(x).__name__


def looks_bfloat16(dtype: np.dtype[Any]) -> bool:
    """Whether ``dtype`` is named and sized as ``ml_dtypes.bfloat16`` (a NumPy "void"
    kind, but a float), without importing ml_dtypes."""
    return dtype.kind == "V" and dtype.name == "bfloat16" and dtype.itemsize == 2


def is_real(dtype: np.dtype[Any]) -> bool:
    """Whether ``dtype`` holds real numbers NumPy casts to float32/float64: a float or
    integer dtype, or bfloat16."""
    return dtype.kind in "fiu" or looks_bfloat16(dtype)


def check_float_dtype(dtype: npt.DTypeLike, name: str = "dtype") -> np.dtype[Any]:
    """Return ``dtype`` as np.float32 or np.float64, or raise."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if resolved not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {resolved}")
    return resolved


def check_real(value: object, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as a float after checking it is a finite real number in range.

    ``low``/``high`` bound it, inclusive unless ``low_open``/``high_open``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {describe(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int (or Fraction) beyond the double range
        text = repr(value)
        text = text if len(text) <= 24 else text[:12] + "..." + text[-6:]
        raise ValueError(f"Invalid {name}: {text} (too large to be finite)") from None
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value} (must be finite)")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"Invalid {name}: {value} (must be in {interval})")
    return value


def check_fits(values: Mapping[str, object], dtype: npt.DTypeLike, where: str,
               positive: tuple[str, ...] = ("eps", "epsilon")) -> None:
    """Raise if a real hyperparameter in ``values`` (a dict) does not survive ``dtype``.

    The kernels cast their scalars to the buffer's dtype, so a value that is finite as a
    double but beyond float32's range (about 3.4e38) would become inf and turn every
    element into inf or nan; and one that must be > 0 (the names in ``positive``) must not
    round to 0 (``eps=1e-46`` is 0 in float32, and makes 0/0; Keras names it
    ``epsilon``). Bools and non-numbers are left to the other checks; tuples, lists and
    arrays (such as ``betas``) are checked element by element.
    """
    resolved: np.dtype[Any] = np.dtype(dtype)
    largest = _LARGEST[resolved]
    for key, value in values.items():
        items = value if isinstance(value, (tuple, list, np.ndarray)) else (value,)
        for v in items:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
                continue
            try:
                magnitude = abs(float(v))
            except OverflowError:
                magnitude = math.inf
            if magnitude > largest:
                raise ValueError(f"Invalid {where} {key}: {v!r} (overflows {resolved.name}, "
                                 f"whose largest value is {largest:.7g})")
            if key in positive and magnitude > 0 and resolved.type(magnitude) == 0:
                raise ValueError(f"Invalid {where} {key}: {v!r} (rounds to 0 in {resolved.name}, "
                                 f"whose smallest positive value is {_TINIEST[resolved]:.7g})")


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` as a bool; only real booleans are accepted."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")
    return bool(value)


#: The largest step count accepted: far beyond any training run, and small enough that
#: the next step's number still fits the kernels' 64-bit step argument.
MAX_STEP = 2**62


def check_step(step: object, name: str = "step", low: int = 1) -> int:
    """Return a step number as an int in [``low``, :data:`MAX_STEP`] (``low=1`` for the
    1-based step a kernel takes, 0 for the count of steps taken, as in ``state["step"]``).
    """
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {describe(step)}")
    value = int(step)
    if not low <= value <= MAX_STEP:
        raise ValueError(f"{name} must be an int in [{low}, 2**62], got {value}")
    return value


def check_flat(array: object, name: str, *, dtype: npt.DTypeLike | None = None, size: int | None = None,
               writable: bool = True, like: str | None = None) -> FloatArray:
    """Check that ``array`` is a 1-D C-contiguous float32/float64 ndarray.

    With ``dtype``/``size`` it must match them (the errors say they are ``like``'s, when
    given: the buffer they were taken from); with ``writable`` it must be writable.
    Returns the array unchanged.
    """
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a 1-D numpy array, got {describe(array)}")
    if isinstance(array, np.ma.MaskedArray):  # the kernels read the data, mask or not
        raise TypeError(f"{name} must be a plain numpy array, got a masked array (its mask would "
                        "be ignored: pass .filled(value))")
    if array.dtype not in FLOAT_DTYPES:
        swapped = not array.dtype.isnative and array.dtype.newbyteorder("=") in FLOAT_DTYPES
        raise TypeError(f"{name} must have dtype float32 or float64, got "
                        + (f"{array.dtype.str} (not in this machine's byte order)" if swapped else str(array.dtype)))
    whose = f" (as {like})" if like else ""
    if dtype is not None and array.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}{whose}, got {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if size is not None and array.shape[0] != size:
        raise ValueError(f"{name} must have length {size}{whose}, got {array.shape[0]}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got strides {array.strides}")
    if writable and not array.flags.writeable:
        raise ValueError(f"{name} must be writable, got a read-only array")
    return array


def check_no_overlap(buffers: Mapping[str, npt.NDArray[Any] | None]) -> None:
    """Raise if any two of the named 1-D buffers share memory.

    ``buffers`` maps names to contiguous arrays (or None, skipped); for contiguous arrays
    the bounds test of ``np.may_share_memory`` is exact.
    """
    items = [(k, v) for k, v in buffers.items() if v is not None and v.size]
    for i, (name_a, a) in enumerate(items):
        for name_b, b in items[i + 1:]:
            if np.may_share_memory(a, b):
                raise ValueError(f"{name_a} and {name_b} must not share memory, but they overlap")

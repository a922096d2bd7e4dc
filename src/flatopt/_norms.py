"""Deterministic norms of flat buffers (shared by the optimizers and the functional layer)."""

import math

import numpy as np

from ._dispatch import kernels
from ._validation import check_real


def check_norm_type(norm_type):
    """``norm_type`` as a float > 0 (``inf`` allowed)."""
    if isinstance(norm_type, (float, np.floating)) and norm_type == math.inf:
        return math.inf
    return check_real(norm_type, "norm_type", low=0.0, low_open=True)


def norm_partials_buffer(n):
    """The scratch array :func:`flat_norm` needs for ``n`` elements (one double per block)."""
    return np.empty(-(-n // kernels.NORM_BLOCK), np.float64)


def flat_norm(flat, norm_type, n_threads, partials=None):
    """The ``norm_type``-norm of a validated flat buffer; deterministic for any thread count.

    Blocks are reduced in parallel in a fixed order; their partial results are combined in
    a fixed order too (NumPy's pairwise sum of a fixed-length array).
    """
    if partials is None:
        partials = norm_partials_buffer(flat.shape[0])
    if partials.shape[0] == 0:
        return 0.0
    kernels.norm_partials(flat, norm_type, partials, n_threads)
    if norm_type == math.inf:
        return float(partials.max())
    total = float(partials.sum())
    if norm_type == 2.0:
        return math.sqrt(total)
    if norm_type == 1.0:
        return total
    try:
        return total ** (1.0 / norm_type)
    except OverflowError:  # a small norm_type (p < 1): the norm is beyond the double range
        return math.inf

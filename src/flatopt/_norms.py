"""Deterministic norms of flat buffers (shared by the optimizers and the functional layer)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ._dispatch import kernels
from ._validation import check_real


def check_norm_type(norm_type: object) -> float:
    """``norm_type`` as a float > 0 (``inf`` allowed)."""
    if isinstance(norm_type, (float, np.floating)) and norm_type == math.inf:
        return math.inf
    return float(check_real(norm_type, "norm_type", low=0.0, low_open=True))


def norm_partials_buffer(n: int) -> npt.NDArray[np.float64]:
    """The scratch array :func:`flat_norm` needs for ``n`` elements (one double per block)."""
    return np.empty(-(-n // kernels.NORM_BLOCK), np.float64)


def flat_norm(flat: npt.NDArray[np.floating[Any]], norm_type: float, n_threads: int,
              partials: npt.NDArray[np.float64] | None = None) -> float:
    """The ``norm_type``-norm of a validated flat buffer; deterministic for any thread count.

    Blocks are reduced in parallel in a fixed order; their partial results are combined in
    a fixed order too (NumPy's pairwise sum of a fixed-length array).
    """
    if partials is None:
        partials = norm_partials_buffer(flat.shape[0])
    if partials.shape[0] == 0:
        return 0.0
    kernels.norm_partials(flat, norm_type, partials, n_threads)
    return combine_partials(partials, norm_type)


def combine_partials(partials: npt.NDArray[np.float64], norm_type: float) -> float:
    """The norm from :func:`flat_norm`'s per-block partial results, combined in order."""
    if partials.shape[0] == 0:
        return 0.0
    if norm_type == math.inf:
        return float(partials.max())
    total = float(partials.sum())
    if norm_type == 2.0:
        return math.sqrt(total)
    if norm_type == 1.0:
        return total
    try:
        return float(total ** (1.0 / norm_type))
    except OverflowError:  # a small norm_type (p < 1): the norm is beyond the double range
        return math.inf


class ClipGradNormMixin:
    """``clip_grad_norm_`` for any optimizer with ``grad_norm(norm_type)`` whose next step
    multiplies its ``grad_scale`` by ``_pending_grad_scale``: the NumPy optimizers and
    flatopt.torch's adapters share this one implementation."""

    if TYPE_CHECKING:  # provided by the classes this is mixed into
        _pending_grad_scale: float

        def grad_norm(self, norm_type: float = 2.0) -> float: ...

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> float:
        """Clip the gradients' global norm to ``max_norm`` at no extra write pass.

        Computes the norm (as :meth:`grad_norm`) and folds torch's clip factor
        ``min(1, max_norm / (norm + 1e-6))`` into the next step's ``grad_scale`` instead
        of rewriting the gradients. With loss scaling by ``S``, clip to ``max_norm * S``
        and pass ``grad_scale=1/S`` to the step. A non-finite norm leaves the factor at 1:
        combine with ``step(skip_if_nonfinite=True)``. ``max_norm=inf`` (as in torch)
        measures without clipping. Returns the norm before clipping.
        """
        if not (isinstance(max_norm, (float, np.floating)) and max_norm == math.inf):
            max_norm = check_real(max_norm, "max_norm", low=0.0)
        total = self.grad_norm(norm_type)
        if math.isfinite(total):
            self._pending_grad_scale = min(1.0, max_norm / (total + 1e-6))
        return total

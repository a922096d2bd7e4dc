"""Type stubs for ``_tensor_grads.pyx``: flatopt.torch's usual-step gradient checks."""

from typing import Any

import numpy as np
import numpy.typing as npt

def usual_grads(params: list[Any], data_ptrs: list[int], signatures: list[tuple[Any, Any, Any]],
                sources: npt.NDArray[np.intp]) -> list[Any] | None:
    """The gradients of ``params`` for the usual step (their addresses written into
    ``sources[0::2]``), or None when it is not one."""

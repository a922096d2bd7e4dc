"""flatopt: fused, multithreaded CPU optimizer kernels over flat parameter buffers.

Parameters, gradients and optimizer state live in one contiguous buffer each, so a step
is one fused kernel call (OpenMP, float32/float64) whatever the number of tensors.
"""

from . import functional
from ._adaptive import Adadelta, Adagrad, Adam, AdamW, RMSprop
from ._config import build_info, show_config
from ._layout import FlatLayout, flatten
from ._momentum import SGD, Momentum
from ._optimizer import Optimizer
from ._threads import get_num_threads, num_threads, openmp_enabled, set_num_threads
from ._version import __version__
from ._adam_variants import Adamax, Lion, NAdam, RAdam

__all__ = [
    "Adadelta", "Adagrad", "Adam", "AdamW", "FlatLayout", "Momentum", "Optimizer", "RMSprop",
    "SGD", "__version__", "build_info", "flatten", "functional", "get_num_threads",
    "num_threads", "openmp_enabled", "set_num_threads", "show_config",
]
__all__ += ["Adamax", "Lion", "NAdam", "RAdam"]

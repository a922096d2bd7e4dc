"""Type stubs for the compiled kernels (``_kernels.pyx``, also built as ``_kernels_avx2``
and ``_kernels_avx512``).

Every kernel takes 1-D, C-contiguous buffers of one dtype, float32 or float64 (the
``floating`` fused type): ``_F`` below, as arrays or as the :class:`KernelView` that
:func:`as_view` makes of one (what optimizers keep, to pay no buffer request a step).
Buffers named ``grad``/``x``/``b`` are only read (read-only and memory-mapped arrays
work); the others are updated in place. The step kernels (the torch.optim family: sgd,
momentum, adam, rmsprop, adadelta, adagrad, nadam, radam, adamax, lion; and keras_sgd,
keras_adam, keras_rmsprop, keras_adagrad, keras_adamax, keras_nadam) also take a
:class:`GradTable` as ``grad``, and (float32 ``param``) a :class:`HalfGrads`: 16-bit
gradients in, 16-bit parameters out, in the same pass. Scalars are Python floats, ints
and bools. Nothing here validates beyond what the memoryviews enforce: call them through
``flatopt.functional`` or the optimizer classes.
"""

from typing import TypeVar, Union, final

from typing_extensions import disjoint_base

import numpy as np
import numpy.typing as npt

_F = TypeVar("_F", np.float32, np.float64)

@final
class KernelView:
    """This module's typed memoryview of a flat float32 or float64 buffer (see
    :func:`as_view`): the step kernels take it without a buffer request."""

    @property
    def shape(self) -> tuple[int, ...]: ...
    def __len__(self) -> int: ...
    def __getitem__(self, key: slice, /) -> KernelView: ...
    def count(self, value: object) -> int: ...
    def index(self, value: object, start: int = 0, stop: int | None = None) -> int: ...

#: A buffer argument: an array of the kernel's dtype, or a :class:`KernelView` of one.
_Buf = Union[npt.NDArray[_F], KernelView]

def as_view(a: npt.NDArray[np.float32] | npt.NDArray[np.float64]) -> KernelView: ...

MIN_ELEMENTS_PER_THREAD: int
PARALLEL_THRESHOLD: int
CHUNK_ELEMENTS: int
NORM_BLOCK: int

@disjoint_base
class GradTable:
    """Gradients read where they are: source ``k`` (at address ``sources[k]``, ``itemsize``
    bytes an element) holds elements ``[bounds[k], bounds[k+1])``; ``keep`` is held."""

    def __init__(
        self, bounds: npt.NDArray[np.intp], sources: npt.NDArray[np.intp], itemsize: int,
        keep: object = None,
    ) -> None: ...
    def __len__(self) -> int: ...
    def __getitem__(self, key: slice, /) -> GradTable: ...
    @property
    def itemsize(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def keep(self) -> object: ...

@disjoint_base
class HalfGrads:
    """16-bit gradients (``uint16`` bit patterns, or a 16-bit :class:`GradTable`) for a
    float32 master, whose updated values the kernel writes to ``half_params`` rounded to
    ``kind`` (``KIND_BF16`` or ``KIND_FP16``)."""

    def __init__(
        self, grad: npt.NDArray[np.uint16] | GradTable, half_params: npt.NDArray[np.uint16],
        kind: int,
    ) -> None: ...
    def __len__(self) -> int: ...
    def __getitem__(self, key: slice, /) -> HalfGrads: ...
    @property
    def kind(self) -> int: ...
    @property
    def size(self) -> int: ...

def parallel_used() -> bool: ...
def parallel_threshold(n_threads: int) -> int: ...
def chunks(n: int, n_threads: int) -> list[tuple[int, int]]: ...
def sgd(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads,
    momentum_buffer: _Buf[_F], lr: float, momentum: float, dampening: float,
    weight_decay: float, nesterov: bool, maximize: bool, init_buffer: bool,
    grad_scale: float, n_threads: int,
) -> None: ...
def momentum(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, velocity: _Buf[_F],
    lr: float, beta: float, weight_decay: float, maximize: bool, grad_scale: float,
    n_threads: int,
) -> None: ...
def norm_partials(
    x: _Buf[_F], norm_type: float, partials_out: npt.NDArray[np.float64], n_threads: int,
) -> None: ...
def count_nonfinite(x: _Buf[_F], n_threads: int) -> int: ...
def stream_add(a_out: _Buf[_F], b: _Buf[_F], n_threads: int) -> None: ...
def stream_add3(
    a_out: _Buf[_F], c_out: _Buf[_F], d_out: _Buf[_F], b: _Buf[_F], n_threads: int
) -> None: ...
def adam(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, exp_avg: _Buf[_F],
    exp_avg_sq: _Buf[_F], max_exp_avg_sq: _Buf[_F], step: int, lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
    decoupled: bool, maximize: bool, grad_scale: float, n_threads: int,
) -> None: ...
def rmsprop(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, square_avg: _Buf[_F],
    grad_avg: _Buf[_F], momentum_buffer: _Buf[_F], lr: float, alpha: float,
    eps: float, weight_decay: float, momentum: float, centered: bool, maximize: bool,
    grad_scale: float, n_threads: int,
) -> None: ...
def adadelta(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, square_avg: _Buf[_F],
    acc_delta: _Buf[_F], lr: float, rho: float, eps: float, weight_decay: float,
    maximize: bool, grad_scale: float, n_threads: int,
) -> None: ...
def adagrad(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, state_sum: _Buf[_F],
    step: int, lr: float, lr_decay: float, eps: float, weight_decay: float, maximize: bool,
    grad_scale: float, n_threads: int,
) -> None: ...
def nadam(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, exp_avg: _Buf[_F],
    exp_avg_sq: _Buf[_F], step: int, mu_product: float, mu_product_float32: bool,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    momentum_decay: float, decoupled: bool, maximize: bool, grad_scale: float,
    n_threads: int,
) -> float: ...
def radam(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, exp_avg: _Buf[_F],
    exp_avg_sq: _Buf[_F], step: int, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, decoupled: bool, maximize: bool, grad_scale: float,
    n_threads: int,
) -> bool: ...
def adamax(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, exp_avg: _Buf[_F],
    exp_inf: _Buf[_F], step: int, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, maximize: bool, grad_scale: float, n_threads: int,
) -> None: ...
def lion(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, exp_avg: _Buf[_F],
    lr: float, beta1: float, beta2: float, weight_decay: float, maximize: bool,
    grad_scale: float, n_threads: int,
) -> None: ...
def keras_weight_decay(
    param: _Buf[_F], lr: float, weight_decay: float, n_threads: int,
) -> None: ...
def keras_sgd(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, momentum_buffer: _Buf[_F],
    lr: float, momentum: float, nesterov: bool, weight_decay: float, grad_scale: float,
    n_threads: int,
) -> None: ...
def keras_adam(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, m_buf: _Buf[_F],
    v_buf: _Buf[_F], v_hat_buf: _Buf[_F], step: int, lr: float,
    beta_1: float, beta_2: float, epsilon: float, amsgrad: bool, weight_decay: float,
    grad_scale: float, n_threads: int,
) -> None: ...
def keras_rmsprop(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, velocity: _Buf[_F],
    average_grad: _Buf[_F], momentum_buffer: _Buf[_F], lr: float, rho: float,
    momentum: float, epsilon: float, centered: bool, weight_decay: float,
    grad_scale: float, n_threads: int,
) -> None: ...
def keras_adagrad(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, accumulator: _Buf[_F], lr: float,
    epsilon: float, weight_decay: float, grad_scale: float, n_threads: int,
) -> None: ...
def keras_adamax(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, m_buf: _Buf[_F],
    u_buf: _Buf[_F], step: int, lr: float, beta_1: float, beta_2: float,
    epsilon: float, weight_decay: float, grad_scale: float, n_threads: int,
) -> None: ...
def keras_nadam(
    param: _Buf[_F], grad: _Buf[_F] | GradTable | HalfGrads, m_buf: _Buf[_F],
    v_buf: _Buf[_F], step: int, u_product: float, lr: float, beta_1: float,
    beta_2: float, epsilon: float, weight_decay: float, grad_scale: float, n_threads: int,
) -> None: ...

# Mixed precision: bit patterns (``array.view(np.uint16)`` / ``array.view(np.uint32)``).
KIND_BF16: int
KIND_FP16: int

def widen16(
    src: npt.NDArray[np.uint16], out: npt.NDArray[np.uint32], kind: int, n_threads: int,
) -> None: ...
def narrow16(
    src: npt.NDArray[np.uint32], out: npt.NDArray[np.uint16], kind: int, n_threads: int,
) -> None: ...
def count_nonfinite16(x: npt.NDArray[np.uint16], kind: int, n_threads: int) -> int: ...

def gather_bytes(
    out: npt.NDArray[np.uint8], sources: npt.NDArray[np.intp], out_offsets: npt.NDArray[np.intp],
    starts: npt.NDArray[np.intp], itemsize: int, n_threads: int,
) -> None: ...

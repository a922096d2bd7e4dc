# cython: language_level=3
"""Fused optimizer kernels over flat, C-contiguous float32/float64 buffers.

Three layers, as in scikit-learn's ``sklearn/_loss``:

* ``cdef inline`` functions compute one element;
* ``def`` kernels loop over typed memoryviews with ``prange``, reading each element of
  param, grad and state once and writing it once;
* the Python layer (``flatopt.functional`` and the optimizer classes) validates and
  forwards. Nothing here checks its arguments beyond what the memoryviews enforce, and
  nothing raises inside the loop.

One source serves both dtypes (``floating``). Hyperparameters arrive as doubles and are
cast to ``floating`` once, before the loop, so float32 arithmetic stays float32. The
extension is compiled with ``-ffp-contract=off``: each element's result depends only on
its inputs, never on the thread count or the vector width.
"""

from cython cimport floating
from cython.parallel cimport prange

# Below this many elements a kernel runs on the calling thread: opening a parallel region
# costs a few microseconds, more than the work it would share (see benchmarks/).
cdef Py_ssize_t _PARALLEL_THRESHOLD = 32768
PARALLEL_THRESHOLD = _PARALLEL_THRESHOLD


# Set once a kernel has opened a parallel region: flatopt._threads reads it in a forked
# child (GNU libgomp's thread pool does not survive fork, so that child must stay serial).
cdef bint _parallel_used = False


def parallel_used():
    """True once any kernel of this module has run on more than one thread."""
    return _parallel_used


cdef inline bint _use_threads(Py_ssize_t n, int n_threads) noexcept nogil:
    global _parallel_used
    if n_threads > 1 and n >= _PARALLEL_THRESHOLD:
        _parallel_used = True
        return True
    return False


cdef inline floating _direction(floating g, floating p, floating scale,
                                floating weight_decay) noexcept nogil:
    """The gradient as the update sees it: scaled, sign-flipped for ``maximize`` (folded
    into ``scale``), plus coupled (L2) weight decay."""
    g = g * scale
    if weight_decay != 0:
        g = g + weight_decay * p
    return g


def sgd(floating[::1] param, const floating[::1] grad, floating[::1] momentum_buffer,
        double lr, double momentum, double dampening, double weight_decay,
        bint nesterov, bint maximize, bint init_buffer, double grad_scale, int n_threads):
    """torch.optim.SGD, in place. ``momentum_buffer`` is unused (may be empty) when
    ``momentum == 0``; when ``init_buffer`` it is set to the gradient (torch's first step).
    """
    cdef Py_ssize_t i, n = param.shape[0]
    cdef floating lr_ = lr, m = momentum, c = 1.0 - dampening, wd = weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    cdef floating d, b
    cdef bint use_momentum = momentum != 0
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                    use_threads_if=_use_threads(n, n_threads)):
        d = _direction(grad[i], param[i], scale, wd)
        if use_momentum:
            if init_buffer:
                b = d
            else:
                b = m * momentum_buffer[i] + c * d
            momentum_buffer[i] = b
            if nesterov:
                d = d + m * b
            else:
                d = b
        param[i] = param[i] - lr_ * d


def momentum(floating[::1] param, const floating[::1] grad, floating[::1] velocity,
             double lr, double beta, double weight_decay, bint maximize,
             double grad_scale, int n_threads):
    """Textbook momentum, in place: ``v = beta*v + (1-beta)*g; p -= lr*v``."""
    cdef Py_ssize_t i, n = param.shape[0]
    cdef floating lr_ = lr, b = beta, c = 1.0 - beta, wd = weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    cdef floating v
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                    use_threads_if=_use_threads(n, n_threads)):
        v = b * velocity[i] + c * _direction(grad[i], param[i], scale, wd)
        velocity[i] = v
        param[i] = param[i] - lr_ * v

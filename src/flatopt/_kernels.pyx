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


# ---- gradient hygiene: norms and finiteness, read-only passes ----------------------------

from libc.math cimport fabs, pow

# Norm partial sums are taken over fixed blocks, each summed in a fixed order (8 lanes,
# then the lanes in order), so the result never depends on the thread count or ISA.
NORM_BLOCK = 16384
cdef Py_ssize_t _NORM_BLOCK = NORM_BLOCK


cdef inline double _block_pow_sum(const floating[::1] x, Py_ssize_t lo, Py_ssize_t hi,
                                  double p) noexcept nogil:
    """sum(|x[lo:hi]|**p) in double: p == 1 and 2 have exact fast paths."""
    cdef double s[8]
    cdef double v
    cdef Py_ssize_t i, k
    for k in range(8):
        s[k] = 0.0
    i = lo
    if p == 2.0:
        while i + 8 <= hi:
            for k in range(8):
                v = x[i + k]
                s[k] += v * v
            i += 8
        while i < hi:
            v = x[i]
            s[0] += v * v
            i += 1
    elif p == 1.0:
        while i + 8 <= hi:
            for k in range(8):
                s[k] += fabs(<double>x[i + k])
            i += 8
        while i < hi:
            s[0] += fabs(<double>x[i])
            i += 1
    else:
        while i < hi:
            s[0] += pow(fabs(<double>x[i]), p)
            i += 1
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


cdef inline double _block_abs_max(const floating[::1] x, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """max(|x[lo:hi]|), NaN if any element is NaN."""
    cdef double m = 0.0
    cdef double v
    cdef Py_ssize_t i
    for i in range(lo, hi):
        v = fabs(<double>x[i])
        if v > m or v != v:
            m = v
            if m != m:
                break
    return m


def norm_partials(const floating[::1] x, double norm_type, double[::1] partials_out, int n_threads):
    """Per-block ``sum(|x|**p)`` (or ``max|x|`` for ``p = inf``) into ``partials_out``,
    one entry per ``NORM_BLOCK`` elements; the caller combines them in order."""
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t n_blocks = partials_out.shape[0]
    cdef Py_ssize_t b, lo, hi
    cdef bint inf_norm = norm_type == float("inf")
    for b in prange(n_blocks, nogil=True, schedule="static", num_threads=n_threads,
                    use_threads_if=_use_threads(n, n_threads) and n_blocks > 1):
        lo = b * _NORM_BLOCK
        hi = min(lo + _NORM_BLOCK, n)
        if inf_norm:
            partials_out[b] = _block_abs_max(x, lo, hi)
        else:
            partials_out[b] = _block_pow_sum(x, lo, hi, norm_type)


def count_nonfinite(const floating[::1] x, int n_threads):
    """How many elements of ``x`` are inf or NaN (``x - x`` is 0 exactly when finite)."""
    cdef Py_ssize_t i, n = x.shape[0]
    cdef Py_ssize_t count = 0
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                    use_threads_if=_use_threads(n, n_threads)):
        count += (x[i] - x[i]) != 0
    return count


# ---- benchmark reference -------------------------------------------------------------------

def stream_add(floating[::1] a_out, const floating[::1] b, int n_threads):
    """``a_out += b``: the simplest in-place streaming pass (2 reads, 1 write per element),
    timed by ``flatopt.bench`` as the memory-bandwidth reference."""
    cdef Py_ssize_t i, n = a_out.shape[0]
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                    use_threads_if=_use_threads(n, n_threads)):
        a_out[i] = a_out[i] + b[i]

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

# A kernel runs on the calling thread unless every thread would get at least
# MIN_ELEMENTS_PER_THREAD elements: opening a parallel region costs microseconds (more
# with more threads to wake and join), more than it saves on small buffers. Measured on
# the 2-core project machine (Xeon, AVX-512; kernels rebuilt with no threshold; float32,
# 2 threads vs 1, best of 20-30 interleaved batches because the machine was shared):
#   momentum (cheapest): 12288 elements 2.77 vs 2.77 us (1.00x), 16384 2.99 vs 3.45
#     (0.87x), 32768 0.75x; the AVX2 kernels: 12288 1.02x, 16384 1.07x, 32768 0.77x;
#   adam: 4096 0.99x, 6144 0.88x, 16384 0.69x (AVX2: 6144 0.93x, 16384 0.73x).
# So 8192 per thread (16384 elements for 2 threads), where the cheapest kernels break
# even or win; adam would already gain from ~3000 per thread. On a machine busy with
# other processes a parallel region may wait a whole scheduler slice (milliseconds) for
# its second thread, one more reason not to go parallel early.
# The rule is linear in the thread count: conservative on many-core machines, where
# using fewer threads (not all or one) would be better for mid-sized buffers.
MIN_ELEMENTS_PER_THREAD = 8192
cdef Py_ssize_t _MIN_ELEMENTS_PER_THREAD = MIN_ELEMENTS_PER_THREAD
# The smallest buffer that runs on 2 threads (tests straddle it).
PARALLEL_THRESHOLD = 2 * MIN_ELEMENTS_PER_THREAD


def parallel_threshold(int n_threads):
    """The smallest number of elements a kernel runs on ``n_threads`` threads for (a
    serial build never does)."""
    return max(n_threads, 2) * _MIN_ELEMENTS_PER_THREAD


# Set once a kernel has opened a parallel region: flatopt._threads reads it in a forked
# child (GNU libgomp's thread pool does not survive fork, so that child must stay serial).
cdef bint _parallel_used = False


def parallel_used():
    """True once any kernel of this module has run on more than one thread."""
    return _parallel_used


cdef inline bint _use_threads(Py_ssize_t n, int n_threads) noexcept nogil:
    global _parallel_used
    if n_threads > 1 and n >= n_threads * _MIN_ELEMENTS_PER_THREAD:
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


# -- the adaptive family ----------------------------------------------------------------------
# Element formulas follow torch.optim's single-tensor implementations operation for
# operation (torch 2.x): ``mul_(b).addcmul_(g, g, value=c)`` is ``s*b + (c*g)*g``,
# ``addcdiv_(t1, t2, value=v)`` is ``p + (v*t1)/t2``, ``lerp_`` is ``_lerp`` below, and eps
# is added after the square root (Adam, RMSprop, Adagrad). Step-dependent scalars (bias
# corrections, Adagrad's decayed lr) are computed once per call in double, then cast.
# The one exception, for speed, is Adam's bias-correction divide (see ``adam``).

from libc.math cimport sqrt, sqrtf


cdef inline floating _sqrt(floating x) noexcept nogil:
    """Square root in the buffer's precision (sqrtf keeps float32 loops float32-wide)."""
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _lerp(floating start, floating end, floating weight,
                           floating one_minus_weight, bint small) noexcept nogil:
    """torch.lerp: ``start + w*(end-start)`` when ``|w| < 0.5``, else
    ``end - (end-start)*(1-w)``; ``small`` and ``1-w`` are computed once per call."""
    if small:
        return start + weight * (end - start)
    return end - (end - start) * one_minus_weight


cdef inline floating _square_avg(floating s, floating d, floating a, floating c) noexcept nogil:
    """``s.mul_(a).addcmul_(d, d, value=c)`` for one element."""
    return s * a + (c * d) * d


def adam(floating[::1] param, const floating[::1] grad, floating[::1] exp_avg,
         floating[::1] exp_avg_sq, floating[::1] max_exp_avg_sq, Py_ssize_t step,
         double lr, double beta1, double beta2, double eps, double weight_decay,
         bint amsgrad, bint decoupled, bint maximize, double grad_scale, int n_threads):
    """torch.optim.Adam / AdamW (``decoupled``), in place, for the 1-based ``step``.

    ``max_exp_avg_sq`` is unused (may be empty) unless ``amsgrad``.

    One deliberate departure from torch's operation order: ``sqrt(v) / sqrt(bc2)`` is
    computed as ``sqrt(v) * (1/sqrt(bc2))``, the reciprocal taken once per call in double.
    Division and square root are what bound this kernel in cache; dropping one of the two
    divisions per element makes it ~1.35x faster (2**20 float32, 2 threads: 210 -> 156 us)
    and moves the result by at most an ulp of the denominator per step.
    """
    cdef Py_ssize_t i, n = param.shape[0]
    cdef double bias_correction1 = 1.0 - beta1 ** step
    cdef double bias_correction2 = 1.0 - beta2 ** step
    cdef floating neg_step_size = -(lr / bias_correction1)
    cdef floating inv_bc2_sqrt = 1.0 / sqrt(bias_correction2)
    cdef floating eps_ = eps, b2 = beta2, c2 = 1.0 - beta2
    cdef floating w1 = 1.0 - beta1
    cdef floating one_minus_w1 = 1 - w1
    cdef bint small1 = w1 < 0.5
    # Decoupled decay multiplies the parameter by (1 - lr*wd); by exactly 1 otherwise.
    cdef floating decay = 1.0 - lr * weight_decay if decoupled else 1.0
    cdef floating wd = 0.0 if decoupled else weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    cdef floating p, d, m, v, v_max
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                    use_threads_if=_use_threads(n, n_threads)):
        p = param[i]
        d = _direction(grad[i], p, scale, wd)
        p = p * decay
        m = _lerp(exp_avg[i], d, w1, one_minus_w1, small1)
        v = _square_avg(exp_avg_sq[i], d, b2, c2)
        exp_avg[i] = m
        exp_avg_sq[i] = v
        if amsgrad:
            v_max = max_exp_avg_sq[i]
            if v_max > v:
                v = v_max
            max_exp_avg_sq[i] = v
        param[i] = p + (neg_step_size * m) / (_sqrt(v) * inv_bc2_sqrt + eps_)


def rmsprop(floating[::1] param, const floating[::1] grad, floating[::1] square_avg,
            floating[::1] grad_avg, floating[::1] momentum_buffer, double lr, double alpha,
            double eps, double weight_decay, double momentum, bint centered, bint maximize,
            double grad_scale, int n_threads):
    """torch.optim.RMSprop, in place. ``grad_avg`` is unused (may be empty) unless
    ``centered``; ``momentum_buffer`` unless ``momentum > 0``.

    One loop per (centered, momentum) variant: gcc does not unswitch a loop with two
    conditional stores, and a loop with a conditional store does not vectorise.
    """
    cdef Py_ssize_t i, n = param.shape[0]
    cdef floating neg_lr = -lr, a = alpha, c = 1.0 - alpha, eps_ = eps, mom = momentum
    cdef floating one_minus_c = 1 - c
    cdef bint small = c < 0.5
    cdef floating wd = weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    cdef floating d, s, ga, b
    cdef bint threads = _use_threads(n, n_threads)
    if centered and momentum > 0:
        for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                        use_threads_if=threads):
            d = _direction(grad[i], param[i], scale, wd)
            s = _square_avg(square_avg[i], d, a, c)
            square_avg[i] = s
            ga = _lerp(grad_avg[i], d, c, one_minus_c, small)
            grad_avg[i] = ga
            b = momentum_buffer[i] * mom + d / (_sqrt(s - ga * ga) + eps_)
            momentum_buffer[i] = b
            param[i] = param[i] + neg_lr * b
    elif centered:
        for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                        use_threads_if=threads):
            d = _direction(grad[i], param[i], scale, wd)
            s = _square_avg(square_avg[i], d, a, c)
            square_avg[i] = s
            ga = _lerp(grad_avg[i], d, c, one_minus_c, small)
            grad_avg[i] = ga
            param[i] = param[i] + (neg_lr * d) / (_sqrt(s - ga * ga) + eps_)
    elif momentum > 0:
        for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                        use_threads_if=threads):
            d = _direction(grad[i], param[i], scale, wd)
            s = _square_avg(square_avg[i], d, a, c)
            square_avg[i] = s
            b = momentum_buffer[i] * mom + d / (_sqrt(s) + eps_)
            momentum_buffer[i] = b
            param[i] = param[i] + neg_lr * b
    else:
        for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                        use_threads_if=threads):
            d = _direction(grad[i], param[i], scale, wd)
            s = _square_avg(square_avg[i], d, a, c)
            square_avg[i] = s
            param[i] = param[i] + (neg_lr * d) / (_sqrt(s) + eps_)


def adadelta(floating[::1] param, const floating[::1] grad, floating[::1] square_avg,
             floating[::1] acc_delta, double lr, double rho, double eps, double weight_decay,
             bint maximize, double grad_scale, int n_threads):
    """torch.optim.Adadelta, in place."""
    cdef Py_ssize_t i, n = param.shape[0]
    cdef floating neg_lr = -lr, r = rho, c = 1.0 - rho, eps_ = eps, wd = weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    cdef floating d, s, delta, acc
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                    use_threads_if=_use_threads(n, n_threads)):
        d = _direction(grad[i], param[i], scale, wd)
        s = _square_avg(square_avg[i], d, r, c)
        square_avg[i] = s
        acc = acc_delta[i]
        delta = _sqrt(acc + eps_) / _sqrt(s + eps_) * d
        acc_delta[i] = _square_avg(acc, delta, r, c)
        param[i] = param[i] + neg_lr * delta


def adagrad(floating[::1] param, const floating[::1] grad, floating[::1] state_sum,
            Py_ssize_t step, double lr, double lr_decay, double eps, double weight_decay,
            bint maximize, double grad_scale, int n_threads):
    """torch.optim.Adagrad, in place, for the 1-based ``step`` (decays the lr)."""
    cdef Py_ssize_t i, n = param.shape[0]
    cdef double clr = lr / (1.0 + (step - 1) * lr_decay)
    cdef floating neg_clr = -clr, eps_ = eps, wd = weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    cdef floating d, s
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                    use_threads_if=_use_threads(n, n_threads)):
        d = _direction(grad[i], param[i], scale, wd)
        s = state_sum[i] + d * d
        state_sum[i] = s
        param[i] = param[i] + (neg_clr * d) / (_sqrt(s) + eps_)

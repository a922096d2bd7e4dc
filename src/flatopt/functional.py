"""Validated, in-place optimizer updates on caller-managed 1-D buffers.

For frameworks that manage their own memory: each function checks its buffers (dtype,
length, contiguity, writability, no overlap) and hyperparameters, then runs one fused
kernel. ``grad`` is only read (it may be read-only or memory-mapped); ``grad_scale``
multiplies it on the fly. Nothing is written unless every check passes.
"""

from ._dispatch import kernels
from ._momentum import check_momentum, check_sgd
from ._norms import check_norm_type, flat_norm
from ._threads import check_n_threads, effective_n_threads
from ._validation import check_fits, check_flat, check_no_overlap, check_real, check_step


def _check_buffers(param, grad, **state):
    """Validate ``param`` (written), ``grad`` (read) and the state buffers (written)."""
    check_flat(param, "param")
    check_flat(grad, "grad", dtype=param.dtype, size=param.shape[0], writable=False)
    for name, buf in state.items():
        check_flat(buf, name, dtype=param.dtype, size=param.shape[0])
    check_no_overlap({"param": param, "grad": grad, **state})


def _common(grad_scale, n_threads):
    grad_scale = check_real(grad_scale, "grad_scale")
    return grad_scale, effective_n_threads(check_n_threads(n_threads))


def sgd_(param, grad, momentum_buffer=None, *, lr, step, momentum=0.0, dampening=0.0,
         weight_decay=0.0, nesterov=False, maximize=False, grad_scale=1.0, n_threads=None):
    """One torch.optim.SGD step, in place on ``param`` (and ``momentum_buffer``).

    ``step`` is the 1-based step number: on step 1 the momentum buffer is set to the
    gradient (torch's first step); later it is ``momentum*buf + (1-dampening)*g``.
    ``momentum_buffer`` is required when ``momentum != 0`` and ignored otherwise.
    """
    check_sgd(dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                   nesterov=nesterov, maximize=maximize), "sgd_")
    step = check_step(step)
    grad_scale, n_threads = _common(grad_scale, n_threads)
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer is required when momentum != 0, got None")
        _check_buffers(param, grad, momentum_buffer=momentum_buffer)
    else:
        _check_buffers(param, grad)
        momentum_buffer = param[:0]
    check_fits(dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                    grad_scale=grad_scale), param.dtype, "sgd_")
    kernels.sgd(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay,
                 nesterov, maximize, step == 1, grad_scale, n_threads)


def momentum_(param, grad, momentum_buffer, *, lr, beta=0.9, weight_decay=0.0,
              maximize=False, grad_scale=1.0, n_threads=None):
    """One textbook momentum step, in place: ``v = beta*v + (1-beta)*g; p -= lr*v``."""
    check_momentum(dict(lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize), "momentum_")
    grad_scale, n_threads = _common(grad_scale, n_threads)
    _check_buffers(param, grad, momentum_buffer=momentum_buffer)
    check_fits(dict(lr=lr, weight_decay=weight_decay, grad_scale=grad_scale), param.dtype, "momentum_")
    kernels.momentum(param, grad, momentum_buffer, lr, beta, weight_decay, maximize,
                      grad_scale, n_threads)


def grad_norm(grad, norm_type=2.0, *, grad_scale=1.0, n_threads=None):
    """The ``norm_type``-norm of ``grad_scale * grad`` in one read-only pass.

    Accumulated in double over fixed blocks, so the result is bit-identical for any
    thread count; ``inf`` or ``nan`` when any element is not finite.
    """
    check_flat(grad, "grad", writable=False)
    norm_type = check_norm_type(norm_type)
    grad_scale, n_threads = _common(grad_scale, n_threads)
    return abs(grad_scale) * flat_norm(grad, norm_type, n_threads)


def count_nonfinite(x, *, n_threads=None):
    """How many elements of the 1-D float buffer ``x`` are inf or NaN."""
    check_flat(x, "x", writable=False)
    return kernels.count_nonfinite(x, effective_n_threads(check_n_threads(n_threads)))


__all__ = ["sgd_", "momentum_", "grad_norm", "count_nonfinite"]

"""Plain NumPy twins of the adaptive kernels in ``flatopt/_kernels.pyx``.

Each function updates its arrays in place with the same operations, in the same order
and in the same precision as the kernel, so that its result equals the kernel's bit for
bit in float32 and in float64:

* arrays keep their dtype: a Python float meeting an array is cast to the array's dtype
  first (NumPy's rule for "weak" Python scalars), exactly as the kernel casts each
  hyperparameter to ``floating`` before its loop;
* scalars that depend only on the step (bias corrections, Adagrad's decayed lr) are
  computed in Python double, as the kernel computes them in C double;
* scalars the kernel derives in ``floating`` (such as ``1 - w`` for lerp) are derived
  here in the array's dtype.

These are the second place each formula lives (the first is the kernel); they also
follow torch.optim's single-tensor code, which the tests check separately.
"""

import math

import numpy as np


def _scalar(x, dtype):
    """``x`` as a NumPy scalar of ``dtype`` (the kernel's ``cdef floating x_ = x``)."""
    return dtype.type(x)


def direction(grad, param, grad_scale, maximize, weight_decay):
    """The gradient as the update sees it: scaled, negated for maximize, plus L2 decay."""
    dt = param.dtype
    scale = _scalar(-grad_scale if maximize else grad_scale, dt)
    d = grad * scale
    wd = _scalar(weight_decay, dt)
    if wd != 0:
        d = d + wd * param
    return d


def lerp(start, end, weight):
    """torch.lerp with a scalar weight (cast to the dtype, as the kernel does)."""
    dt = start.dtype
    w = _scalar(weight, dt)
    if w < 0.5:
        return start + w * (end - start)
    return end - (end - start) * (dt.type(1) - w)


def square_avg(s, d, a, c):
    """``s.mul_(a).addcmul_(d, d, value=c)``."""
    dt = s.dtype
    return s * _scalar(a, dt) + (_scalar(c, dt) * d) * d


def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, step, lr, beta1, beta2, eps,
         weight_decay=0.0, amsgrad=False, decoupled=False, maximize=False, grad_scale=1.0):
    """torch.optim.Adam / AdamW, in place (with ``sqrt(v) * (1/sqrt(bc2))`` for torch's
    ``sqrt(v) / sqrt(bc2)``, as the kernel does)."""
    dt = param.dtype
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    neg_step_size = _scalar(-(lr / bias_correction1), dt)
    inv_bc2_sqrt = _scalar(1.0 / math.sqrt(bias_correction2), dt)
    d = direction(grad, param, grad_scale, maximize, 0.0 if decoupled else weight_decay)
    decay = _scalar(1.0 - lr * weight_decay if decoupled else 1.0, dt)
    p = param * decay
    m = lerp(exp_avg, d, 1.0 - beta1)
    v = square_avg(exp_avg_sq, d, beta2, 1.0 - beta2)
    exp_avg[...] = m
    exp_avg_sq[...] = v
    if amsgrad:
        v = np.maximum(max_exp_avg_sq, v)
        max_exp_avg_sq[...] = v
    param[...] = p + (neg_step_size * m) / (np.sqrt(v) * inv_bc2_sqrt + _scalar(eps, dt))


def rmsprop(param, grad, square_avg_, grad_avg, momentum_buffer, *, lr, alpha, eps,
            weight_decay=0.0, momentum=0.0, centered=False, maximize=False, grad_scale=1.0):
    """torch.optim.RMSprop, in place."""
    dt = param.dtype
    neg_lr = _scalar(-lr, dt)
    d = direction(grad, param, grad_scale, maximize, weight_decay)
    s = square_avg(square_avg_, d, alpha, 1.0 - alpha)
    square_avg_[...] = s
    if centered:
        ga = lerp(grad_avg, d, 1.0 - alpha)
        grad_avg[...] = ga
        s = s - ga * ga
    avg = np.sqrt(s) + _scalar(eps, dt)
    if momentum > 0:
        b = momentum_buffer * _scalar(momentum, dt) + d / avg
        momentum_buffer[...] = b
        param[...] = param + neg_lr * b
    else:
        param[...] = param + (neg_lr * d) / avg


def adadelta(param, grad, square_avg_, acc_delta, *, lr, rho, eps, weight_decay=0.0,
             maximize=False, grad_scale=1.0):
    """torch.optim.Adadelta, in place."""
    dt = param.dtype
    eps_ = _scalar(eps, dt)
    d = direction(grad, param, grad_scale, maximize, weight_decay)
    s = square_avg(square_avg_, d, rho, 1.0 - rho)
    square_avg_[...] = s
    delta = np.sqrt(acc_delta + eps_) / np.sqrt(s + eps_) * d
    acc_delta[...] = square_avg(acc_delta, delta, rho, 1.0 - rho)
    param[...] = param + _scalar(-lr, dt) * delta


def adagrad(param, grad, state_sum, *, step, lr, eps, lr_decay=0.0, weight_decay=0.0,
            maximize=False, grad_scale=1.0):
    """torch.optim.Adagrad, in place."""
    dt = param.dtype
    clr = lr / (1.0 + (step - 1) * lr_decay)
    d = direction(grad, param, grad_scale, maximize, weight_decay)
    s = state_sum + d * d
    state_sum[...] = s
    param[...] = param + (_scalar(-clr, dt) * d) / (np.sqrt(s) + _scalar(eps, dt))

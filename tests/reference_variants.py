"""Plain NumPy twins of the NAdam, RAdam, Adamax and Lion kernels in ``_kernels.pyx``.

Same conventions as ``reference_adaptive``: every array keeps its dtype, Python floats
meeting an array are cast to its dtype first, step-dependent scalars are Python doubles
(torch's own Python expressions, ``**`` included). Each function equals its kernel bit
for bit. NAdam, RAdam and Adamax follow torch.optim's single-tensor code line by line;
Lion follows the paper's Algorithm 2 (Chen et al. 2023) in the order of DeepSpeed's and
lucidrains' ``lion-pytorch`` (decay the parameter, then add ``-lr*sign(c)``).
"""

import numpy as np

from reference_adaptive import _scalar, direction, lerp, square_avg


def nadam(param, grad, exp_avg, exp_avg_sq, *, step, mu_product, lr, beta1, beta2, eps,
          weight_decay=0.0, momentum_decay=4e-3, decoupled=False, maximize=False,
          grad_scale=1.0, mu_product_float32=None):
    """torch.optim.NAdam, in place; returns the new ``mu_product`` (a Python float)."""
    dt = param.dtype
    if mu_product_float32 is None:
        mu_product_float32 = dt == np.float32
    bias_correction2 = 1 - beta2 ** step
    d = direction(grad, param, grad_scale, maximize, 0.0 if decoupled else weight_decay)
    p = param * _scalar(1 - lr * weight_decay if decoupled else 1.0, dt)
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    if mu_product_float32:  # torch: a float32 scalar tensor, mu_product *= mu
        mu_product = float(np.float32(mu_product) * np.float32(mu))
    else:
        mu_product = mu_product * mu
    mu_product_next = mu_product * mu_next
    m = lerp(exp_avg, d, 1 - beta1)
    v = square_avg(exp_avg_sq, d, beta2, 1 - beta2)
    exp_avg[...] = m
    exp_avg_sq[...] = v
    denom = np.sqrt(v / _scalar(bias_correction2, dt)) + _scalar(eps, dt)
    p = p + (_scalar(-lr * (1.0 - mu) / (1.0 - mu_product), dt) * d) / denom
    param[...] = p + (_scalar((-lr * mu_next) / (1.0 - mu_product_next), dt) * m) / denom
    return mu_product


def radam(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay=0.0,
          decoupled=False, maximize=False, grad_scale=1.0):
    """torch.optim.RAdam, in place; returns whether the step was rectified."""
    dt = param.dtype
    d = direction(grad, param, grad_scale, maximize, 0.0 if decoupled else weight_decay)
    p = param * _scalar(1 - lr * weight_decay if decoupled else 1.0, dt)
    m = lerp(exp_avg, d, 1 - beta1)
    v = square_avg(exp_avg_sq, d, beta2, 1 - beta2)
    exp_avg[...] = m
    exp_avg_sq[...] = v
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    update = m / _scalar(bias_correction1, dt) * _scalar(lr, dt)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2 ** step) / bias_correction2
    if rho_t > 5.0:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        adaptive_lr = (dt.type(1) / (np.sqrt(v) + _scalar(eps, dt))) * _scalar(bias_correction2 ** 0.5, dt)
        update = update * adaptive_lr * _scalar(rect, dt)
    param[...] = p - update
    return rho_t > 5.0


def adamax(param, grad, exp_avg, exp_inf, *, step, lr, beta1, beta2, eps, weight_decay=0.0,
           maximize=False, grad_scale=1.0):
    """torch.optim.Adamax, in place."""
    dt = param.dtype
    d = direction(grad, param, grad_scale, maximize, weight_decay)
    m = lerp(exp_avg, d, 1 - beta1)
    exp_avg[...] = m
    u = np.maximum(exp_inf * _scalar(beta2, dt), np.abs(d) + _scalar(eps, dt))
    exp_inf[...] = u
    clr = lr / (1 - beta1 ** step)
    param[...] = param + (_scalar(-clr, dt) * m) / u


def lion(param, grad, exp_avg, *, lr, beta1, beta2, weight_decay=0.0, maximize=False,
         grad_scale=1.0):
    """Lion, in place (Algorithm 2 of the paper, decoupled weight decay)."""
    dt = param.dtype
    g = grad * _scalar(-grad_scale if maximize else grad_scale, dt)
    m = exp_avg
    c = m * _scalar(beta1, dt) + _scalar(1 - beta1, dt) * g
    sign = np.where(c > 0, dt.type(1), np.where(c < 0, dt.type(-1), c))  # NaN and zeros stay
    param[...] = param * _scalar(1 - lr * weight_decay, dt) + _scalar(-lr, dt) * sign
    exp_avg[...] = m * _scalar(beta2, dt) + _scalar(1 - beta2, dt) * g

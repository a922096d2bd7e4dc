"""Plain NumPy twins of the Keras kernels in ``_kernels.pyx`` (``keras_*``).

Each follows Keras 3's backend-agnostic ``update_step`` (``keras/src/optimizers/*.py``)
operation for operation and equals its kernel bit for bit: arrays keep their dtype;
scalars Keras casts to the variable's dtype (``ops.cast(self.beta_1, dtype)``, the step
count, ``ops.power``) are NumPy scalars of that dtype here; hyperparameters Keras
multiplies in as Python numbers (``1 - self.beta_1`` in Adam) are Python doubles cast
at the multiply. Weight decay is Keras's, as its torch backend computes it:
``variable * (1 - wd*lr)`` (the backend-agnostic code's ``variable - variable*wd*lr``
equals it in exact arithmetic).
"""

import numpy as np


def _decay(param, lr, weight_decay):
    T = param.dtype.type
    if weight_decay:
        return param * T(1.0 - weight_decay * lr)
    return param


def sgd(param, grad, momentum_buffer, *, lr, momentum=0.0, nesterov=False, weight_decay=None,
        grad_scale=1.0):
    T = param.dtype.type
    p = _decay(param, lr, weight_decay)
    g = grad * T(grad_scale)
    if momentum != 0:
        m = momentum_buffer * T(momentum) - g * T(lr)
        momentum_buffer[...] = m
        p = p + (m * T(momentum) - g * T(lr)) if nesterov else p + m
    else:
        p = p - g * T(lr)
    param[...] = p


def adam(param, grad, m, v, v_hat, *, step, lr, beta_1, beta_2, epsilon, amsgrad=False,
         weight_decay=None, grad_scale=1.0):
    T = param.dtype.type
    t = T(step)
    beta_1_power = T(beta_1) ** t
    beta_2_power = T(beta_2) ** t
    alpha = T(lr) * np.sqrt(T(1) - beta_2_power) / (T(1) - beta_1_power)
    p = _decay(param, lr, weight_decay)
    g = grad * T(grad_scale)
    m[...] = m + (g - m) * T(1 - beta_1)
    v[...] = v + (g * g - v) * T(1 - beta_2)
    vv = v
    if amsgrad:
        v_hat[...] = np.maximum(v_hat, v)
        vv = v_hat
    param[...] = p - (m * alpha) / (np.sqrt(vv) + T(epsilon))


def rmsprop(param, grad, velocity, average_grad, momentum_buffer, *, lr, rho, momentum=0.0,
            epsilon, centered=False, weight_decay=None, grad_scale=1.0):
    T = param.dtype.type
    p = _decay(param, lr, weight_decay)
    g = grad * T(grad_scale)
    velocity[...] = T(rho) * velocity + T(1 - rho) * (g * g)
    if centered:
        average_grad[...] = T(rho) * average_grad + T(1 - rho) * g
        denominator = velocity - average_grad * average_grad + T(epsilon)
    else:
        denominator = velocity + T(epsilon)
    increment = (T(lr) * g) / np.sqrt(denominator)
    if momentum > 0:
        momentum_buffer[...] = T(momentum) * momentum_buffer + increment
        increment = momentum_buffer
    param[...] = p - increment


def adagrad(param, grad, accumulator, *, lr, epsilon, weight_decay=None, grad_scale=1.0):
    T = param.dtype.type
    p = _decay(param, lr, weight_decay)
    g = grad * T(grad_scale)
    accumulator[...] = accumulator + g * g
    param[...] = p - (T(lr) * g) / np.sqrt(accumulator + T(epsilon))


def adamax(param, grad, m, u, *, step, lr, beta_1, beta_2, epsilon, weight_decay=None,
           grad_scale=1.0):
    T = param.dtype.type
    beta_1_power = T(beta_1) ** T(step)
    p = _decay(param, lr, weight_decay)
    g = grad * T(grad_scale)
    m[...] = m + (g - m) * T(1 - beta_1)
    u[...] = np.maximum(T(beta_2) * u, np.abs(g))
    param[...] = p - (T(lr) * m) / ((T(1) - beta_1_power) * (u + T(epsilon)))


def nadam(param, grad, m, v, *, step, u_product, lr, beta_1, beta_2, epsilon, weight_decay=None,
          grad_scale=1.0):
    """Returns the new ``u_product`` (a Python float holding a value of the dtype)."""
    T = param.dtype.type
    local_step, next_step = T(step), T(step + 1)
    decay, b1, b2 = T(0.96), T(beta_1), T(beta_2)
    # _backend_update_step: u_product = u_product * beta_1 * (1.0 - 0.5 * 0.96**t)
    u_product_t = T(u_product) * b1 * (T(1.0) - T(0.5) * decay ** local_step)
    u_t = b1 * (T(1.0) - T(0.5) * decay ** local_step)
    u_t_1 = b1 * (T(1.0) - T(0.5) * decay ** next_step)
    u_product_t_1 = u_product_t * u_t_1
    beta_2_power = b2 ** local_step
    p = _decay(param, lr, weight_decay)
    g = grad * T(grad_scale)
    m[...] = m + (g - m) * (T(1) - b1)
    v[...] = v + (g * g - v) * (T(1) - b2)
    m_hat = (u_t_1 * m) / (T(1) - u_product_t_1) + ((T(1) - u_t) * g) / (T(1) - u_product_t)
    v_hat = v / (T(1) - beta_2_power)
    param[...] = p - (m_hat * T(lr)) / (np.sqrt(v_hat) + T(epsilon))
    return float(u_product_t)

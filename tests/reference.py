"""Plain NumPy twins of flatopt's kernels: the second (and only other) place each formula lives.

Each twin takes arrays of the kernel's dtype and performs the same operations in the same
order, so the kernel must agree with it bit for bit in float32 and float64 alike (NumPy
combines an array with a Python float in the array's dtype, as the kernels cast their
scalars to ``floating``). They return new arrays and never modify their inputs.
"""

import numpy as np


def direction(grad, param, *, weight_decay=0.0, maximize=False, grad_scale=1.0):
    """The gradient the update uses: scaled, negated for maximize, plus coupled decay."""
    d = grad * (-grad_scale if maximize else grad_scale)
    if weight_decay != 0:
        d = d + weight_decay * param
    return d


def sgd(param, grad, momentum_buffer, *, lr, first_step, momentum=0.0, dampening=0.0,
        weight_decay=0.0, nesterov=False, maximize=False, grad_scale=1.0):
    """torch.optim.SGD (``_single_tensor_sgd``). Returns ``(param, momentum_buffer)``."""
    d = direction(grad, param, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale)
    buf = momentum_buffer
    if momentum != 0:
        if first_step:
            buf = d.copy()
        else:
            buf = momentum * buf + (1.0 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return param - lr * d, buf


def momentum(param, grad, velocity, *, lr, beta=0.9, weight_decay=0.0, maximize=False,
             grad_scale=1.0):
    """Textbook momentum: ``v = beta*v + (1-beta)*g; p -= lr*v``. Returns ``(param, v)``."""
    d = direction(grad, param, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale)
    v = beta * velocity + (1.0 - beta) * d
    return param - lr * v, v

"""Validated, in-place optimizer updates on caller-managed 1-D buffers.

For frameworks that manage their own memory: each function checks its buffers (dtype,
length, contiguity, writability, no overlap) and hyperparameters, then runs one fused
kernel. ``grad`` is only read (it may be read-only or memory-mapped); ``grad_scale``
multiplies it on the fly. Nothing is written unless every check passes.
"""

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ._adam_variants import check_adamax, check_lion, check_nadam, check_radam
from ._adaptive import check_adadelta, check_adagrad, check_adam, check_rmsprop
from ._dispatch import kernels
from ._momentum import check_momentum, check_sgd
from ._norms import check_norm_type, flat_norm
from ._threads import check_n_threads, effective_n_threads
from ._validation import (FloatArray, check_bool, check_fits, check_flat, check_no_overlap, check_real,
                          check_step)


def _check_buffers(param: FloatArray, grad: FloatArray, **state: FloatArray) -> None:
    """Validate ``param`` (written), ``grad`` (read) and the state buffers (written)."""
    check_flat(param, "param")
    check_flat(grad, "grad", dtype=param.dtype, size=param.shape[0], writable=False, like="param")
    for name, buf in state.items():
        check_flat(buf, name, dtype=param.dtype, size=param.shape[0], like="param")
    check_no_overlap({"param": param, "grad": grad, **state})


def _check_adam_family(check: Callable[[Mapping[str, Any], str], None], where: str, *, beta1: float,
                       beta2: float, **values: Any) -> None:
    """``check`` (an optimizer class's rules, which name ``betas`` and
    ``decoupled_weight_decay``) on this function's arguments (``decoupled`` among
    ``values`` when it has one), with the errors naming them as the function does."""
    values["betas"] = (beta1, beta2)
    if "decoupled" in values:
        values["decoupled_weight_decay"] = values.pop("decoupled")
    try:
        check(values, where)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for theirs, ours in (("betas[0]", "beta1"), ("betas[1]", "beta2"), ("decoupled_weight_decay", "decoupled")):
            for start in (f"{where} ", f"Invalid {where} "):  # the name the message opens with only
                if message.startswith(start + theirs):
                    message = start + ours + message[len(start + theirs):]
        raise type(exc)(message) from None


def _common(grad_scale: float, n_threads: int | None) -> tuple[float, int]:
    grad_scale = check_real(grad_scale, "grad_scale")
    return grad_scale, effective_n_threads(check_n_threads(n_threads))


def sgd_(param: FloatArray, grad: FloatArray, momentum_buffer: FloatArray | None = None, *, lr: float, step: int,
         momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
         nesterov: bool = False, maximize: bool = False, grad_scale: float = 1.0,
         n_threads: int | None = None) -> None:
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


def momentum_(param: FloatArray, grad: FloatArray, momentum_buffer: FloatArray, *, lr: float, beta: float = 0.9,
              weight_decay: float = 0.0, maximize: bool = False, grad_scale: float = 1.0,
              n_threads: int | None = None) -> None:
    """One textbook momentum step, in place: ``v = beta*v + (1-beta)*g; p -= lr*v``."""
    check_momentum(dict(lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize), "momentum_")
    grad_scale, n_threads = _common(grad_scale, n_threads)
    _check_buffers(param, grad, momentum_buffer=momentum_buffer)
    check_fits(dict(lr=lr, beta=beta, weight_decay=weight_decay, grad_scale=grad_scale), param.dtype,
               "momentum_")
    kernels.momentum(param, grad, momentum_buffer, lr, beta, weight_decay, maximize,
                      grad_scale, n_threads)


def grad_norm(grad: FloatArray, norm_type: float = 2.0, *, grad_scale: float = 1.0,
              n_threads: int | None = None) -> float:
    """The ``norm_type``-norm of ``grad_scale * grad`` in one read-only pass.

    Computed as ``abs(grad_scale)`` times the norm of ``grad``, accumulated in double over
    fixed blocks, so the result is bit-identical for any thread count; ``inf`` or ``nan``
    when any element is not finite, and ``inf`` when the double sum overflows (a float64
    ``grad`` beyond about 1e154 for the 2-norm) whatever ``grad_scale`` is.
    """
    check_flat(grad, "grad", writable=False)
    norm_type = check_norm_type(norm_type)
    grad_scale, n_threads = _common(grad_scale, n_threads)
    return abs(grad_scale) * flat_norm(grad, norm_type, n_threads)


def count_nonfinite(x: FloatArray, *, n_threads: int | None = None) -> int:
    """How many elements of the 1-D float buffer ``x`` are inf or NaN."""
    check_flat(x, "x", writable=False)
    count: int = kernels.count_nonfinite(x, effective_n_threads(check_n_threads(n_threads)))
    return count


def adam_(param: FloatArray, grad: FloatArray, exp_avg: FloatArray, exp_avg_sq: FloatArray, *, step: int, lr: float,
          beta1: float, beta2: float, eps: float, weight_decay: float = 0.0, amsgrad: bool = False,
          max_exp_avg_sq: FloatArray | None = None, decoupled: bool = False, maximize: bool = False,
          grad_scale: float = 1.0, n_threads: int | None = None) -> None:
    """One torch.optim.Adam step (AdamW with ``decoupled``), in place on ``param`` and state.

    ``step`` is the 1-based step number used for the bias corrections ``1 - beta**step``.
    ``max_exp_avg_sq`` is required when ``amsgrad`` and ignored otherwise.
    """
    _check_adam_family(check_adam, "adam_", lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, decoupled=decoupled)
    step = check_step(step)
    grad_scale, n_threads = _common(grad_scale, n_threads)
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("max_exp_avg_sq is required when amsgrad=True, got None")
        _check_buffers(param, grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                       max_exp_avg_sq=max_exp_avg_sq)
    else:
        _check_buffers(param, grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
        max_exp_avg_sq = param[:0]
    check_fits(dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                    grad_scale=grad_scale), param.dtype, "adam_")
    kernels.adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2,
                  eps, weight_decay, amsgrad, decoupled, maximize, grad_scale, n_threads)


def rmsprop_(param: FloatArray, grad: FloatArray, square_avg: FloatArray, grad_avg: FloatArray | None = None,
             momentum_buffer: FloatArray | None = None, *, lr: float, alpha: float, eps: float,
             weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
             maximize: bool = False, grad_scale: float = 1.0, n_threads: int | None = None) -> None:
    """One torch.optim.RMSprop step, in place on ``param`` and state.

    ``grad_avg`` is required when ``centered`` and ``momentum_buffer`` when
    ``momentum > 0``; each is ignored otherwise.
    """
    check_rmsprop(dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                       momentum=momentum, centered=centered, maximize=maximize), "rmsprop_")
    grad_scale, n_threads = _common(grad_scale, n_threads)
    state = {"square_avg": square_avg}
    if centered:
        if grad_avg is None:
            raise ValueError("grad_avg is required when centered=True, got None")
        state["grad_avg"] = grad_avg
    if momentum > 0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer is required when momentum > 0, got None")
        state["momentum_buffer"] = momentum_buffer
    _check_buffers(param, grad, **state)
    check_fits(dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                    grad_scale=grad_scale), param.dtype, "rmsprop_")
    kernels.rmsprop(param, grad, square_avg, grad_avg if centered else param[:0],
                     momentum_buffer if momentum > 0 else param[:0], lr, alpha, eps,
                     weight_decay, momentum, centered, maximize, grad_scale, n_threads)


def adadelta_(param: FloatArray, grad: FloatArray, square_avg: FloatArray, acc_delta: FloatArray, *, lr: float, rho: float,
              eps: float, weight_decay: float = 0.0, maximize: bool = False,
              grad_scale: float = 1.0, n_threads: int | None = None) -> None:
    """One torch.optim.Adadelta step, in place on ``param``, ``square_avg``, ``acc_delta``."""
    check_adadelta(dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize),
                   "adadelta_")
    grad_scale, n_threads = _common(grad_scale, n_threads)
    _check_buffers(param, grad, square_avg=square_avg, acc_delta=acc_delta)
    check_fits(dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, grad_scale=grad_scale),
               param.dtype, "adadelta_")
    kernels.adadelta(param, grad, square_avg, acc_delta, lr, rho, eps, weight_decay, maximize,
                      grad_scale, n_threads)


def adagrad_(param: FloatArray, grad: FloatArray, state_sum: FloatArray, *, step: int, lr: float, eps: float,
             lr_decay: float = 0.0, weight_decay: float = 0.0, maximize: bool = False,
             grad_scale: float = 1.0, n_threads: int | None = None) -> None:
    """One torch.optim.Adagrad step, in place on ``param`` and ``state_sum``.

    ``step`` is the 1-based step number: the learning rate used is
    ``lr / (1 + (step-1)*lr_decay)``. Initialise ``state_sum`` to the initial accumulator
    value before the first step.
    """
    check_adagrad(dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                       initial_accumulator_value=0.0, maximize=maximize), "adagrad_")
    step = check_step(step)
    grad_scale, n_threads = _common(grad_scale, n_threads)
    _check_buffers(param, grad, state_sum=state_sum)
    check_fits(dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                    grad_scale=grad_scale), param.dtype, "adagrad_")
    kernels.adagrad(param, grad, state_sum, step, lr, lr_decay, eps, weight_decay, maximize,
                     grad_scale, n_threads)


__all__ = ["sgd_", "momentum_", "adam_", "rmsprop_", "adadelta_", "adagrad_", "grad_norm",
           "count_nonfinite"]


# -- Adam's variants: NAdam, RAdam, Adamax, Lion ----------------------------------------------

def _fits(param: FloatArray, where: str, **values: float) -> None:
    check_fits(values, param.dtype, where)


def nadam_(param: FloatArray, grad: FloatArray, exp_avg: FloatArray, exp_avg_sq: FloatArray, *, step: int,
           mu_product: float, lr: float, beta1: float, beta2: float, eps: float,
           weight_decay: float = 0.0, momentum_decay: float = 4e-3, decoupled: bool = False,
           maximize: bool = False, mu_product_float32: bool | None = None,
           grad_scale: float = 1.0, n_threads: int | None = None) -> float:
    """One torch.optim.NAdam step (NAdamW with ``decoupled``), in place; returns the new
    ``mu_product``.

    ``step`` is the 1-based step number; ``mu_product`` the running product of the
    momentum schedule before this step (start with 1.0 and pass back what each call
    returns). torch keeps it in its default dtype: it is rounded to float32 when
    ``mu_product_float32`` (default: when the buffers are float32).
    """
    _check_adam_family(check_nadam, "nadam_", lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, momentum_decay=momentum_decay, decoupled=decoupled,
                       maximize=maximize)
    step = check_step(step)
    mu_product = check_real(mu_product, "mu_product", low=0.0, high=1.0)
    grad_scale, n_threads = _common(grad_scale, n_threads)
    _check_buffers(param, grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    _fits(param, "nadam_", lr=lr, eps=eps, weight_decay=weight_decay, grad_scale=grad_scale)
    if mu_product_float32 is None:
        mu_product_float32 = param.dtype == np.float32
    else:
        mu_product_float32 = check_bool(mu_product_float32, "mu_product_float32")
    new_mu_product: float = kernels.nadam(
        param, grad, exp_avg, exp_avg_sq, step, mu_product, mu_product_float32, lr, beta1, beta2,
        eps, weight_decay, momentum_decay, decoupled, maximize, grad_scale, n_threads)
    return new_mu_product


def radam_(param: FloatArray, grad: FloatArray, exp_avg: FloatArray, exp_avg_sq: FloatArray, *, step: int, lr: float,
           beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
           decoupled: bool = False, maximize: bool = False, grad_scale: float = 1.0,
           n_threads: int | None = None) -> bool:
    """One torch.optim.RAdam step (decoupled weight decay with ``decoupled``), in place.

    ``step`` is the 1-based step number. Returns True when the step was rectified
    (torch's ``rho_t > 5``), False when it was bias-corrected momentum SGD.
    """
    _check_adam_family(check_radam, "radam_", lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, decoupled=decoupled, maximize=maximize)
    step = check_step(step)
    grad_scale, n_threads = _common(grad_scale, n_threads)
    _check_buffers(param, grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    _fits(param, "radam_", lr=lr, eps=eps, weight_decay=weight_decay, grad_scale=grad_scale)
    return bool(kernels.radam(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
                              weight_decay, decoupled, maximize, grad_scale, n_threads))


def adamax_(param: FloatArray, grad: FloatArray, exp_avg: FloatArray, exp_inf: FloatArray, *, step: int, lr: float,
            beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
            maximize: bool = False, grad_scale: float = 1.0, n_threads: int | None = None) -> None:
    """One torch.optim.Adamax step, in place on ``param``, ``exp_avg`` and ``exp_inf``."""
    _check_adam_family(check_adamax, "adamax_", lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, maximize=maximize)
    step = check_step(step)
    grad_scale, n_threads = _common(grad_scale, n_threads)
    _check_buffers(param, grad, exp_avg=exp_avg, exp_inf=exp_inf)
    _fits(param, "adamax_", lr=lr, eps=eps, weight_decay=weight_decay, grad_scale=grad_scale)
    kernels.adamax(param, grad, exp_avg, exp_inf, step, lr, beta1, beta2, eps, weight_decay,
                   maximize, grad_scale, n_threads)


def lion_(param: FloatArray, grad: FloatArray, exp_avg: FloatArray, *, lr: float, beta1: float = 0.9,
          beta2: float = 0.99, weight_decay: float = 0.0, maximize: bool = False,
          grad_scale: float = 1.0, n_threads: int | None = None) -> None:
    """One Lion step, in place on ``param`` and ``exp_avg`` (see :class:`flatopt.Lion`)."""
    _check_adam_family(check_lion, "lion_", lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                       maximize=maximize)
    grad_scale, n_threads = _common(grad_scale, n_threads)
    _check_buffers(param, grad, exp_avg=exp_avg)
    _fits(param, "lion_", lr=lr, weight_decay=weight_decay, grad_scale=grad_scale)
    kernels.lion(param, grad, exp_avg, lr, beta1, beta2, weight_decay, maximize, grad_scale,
                 n_threads)


__all__ += ["nadam_", "radam_", "adamax_", "lion_"]

"""The adaptive family: torch.optim's Adam, AdamW, RMSprop, Adadelta and Adagrad.

Each class declares its hyperparameters, how to check them and which state buffers a
group needs; the :class:`~flatopt.Optimizer` base does the rest. The formulas live in
``_kernels.pyx`` only.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ._dispatch import KernelsFor
from ._optimizer import Optimizer, Params
from ._validation import FloatArray, KernelGrad, Segment, check_bool, check_real


def _check_common(group: Mapping[str, Any], where: str, eps_name: str = "eps") -> None:
    """lr >= 0, eps > 0, weight_decay >= 0, maximize a bool (every adaptive optimizer)."""
    check_real(group["lr"], f"{where} lr", low=0.0)
    check_real(group[eps_name], f"{where} {eps_name}", low=0.0, low_open=True)
    check_real(group["weight_decay"], f"{where} weight_decay", low=0.0)
    check_bool(group["maximize"], f"{where} maximize")


def check_betas(betas: Any, where: str) -> tuple[float, ...]:
    """Return ``betas`` as a pair of floats, each in [0, 1).

    Any sequence of two (a tuple, a list, an array): not a set or a dict, whose order is
    not the caller's."""
    if (isinstance(betas, (str, bytes)) or not isinstance(betas, (Sequence, np.ndarray))
            or len(betas) != 2):
        raise TypeError(f"{where} betas must be a pair (beta1, beta2), got {betas!r}")
    return tuple(check_real(b, f"{where} betas[{k}]", low=0.0, high=1.0, high_open=True)
                 for k, b in enumerate(betas))


def check_adam(group: Mapping[str, Any], where: str = "Adam") -> None:
    """Validate Adam/AdamW hyperparameters: torch's rules, plus eps > 0 and finiteness."""
    _check_common(group, where)
    check_betas(group["betas"], where)
    check_bool(group["amsgrad"], f"{where} amsgrad")
    check_bool(group["decoupled_weight_decay"], f"{where} decoupled_weight_decay")


def check_rmsprop(group: Mapping[str, Any], where: str = "RMSprop") -> None:
    """Validate RMSprop hyperparameters: alpha in [0, 1], momentum >= 0, eps > 0."""
    _check_common(group, where)
    check_real(group["alpha"], f"{where} alpha", low=0.0, high=1.0)
    check_real(group["momentum"], f"{where} momentum", low=0.0)
    check_bool(group["centered"], f"{where} centered")


def check_adadelta(group: Mapping[str, Any], where: str = "Adadelta") -> None:
    """Validate Adadelta hyperparameters: rho in [0, 1], eps > 0."""
    _check_common(group, where)
    check_real(group["rho"], f"{where} rho", low=0.0, high=1.0)


def check_adagrad(group: Mapping[str, Any], where: str = "Adagrad") -> None:
    """Validate Adagrad hyperparameters: lr_decay >= 0, initial_accumulator_value >= 0,
    eps > 0."""
    _check_common(group, where)
    check_real(group["lr_decay"], f"{where} lr_decay", low=0.0)
    check_real(group["initial_accumulator_value"], f"{where} initial_accumulator_value", low=0.0)


class Adam(Optimizer):
    """Adam with torch.optim.Adam's exact semantics (and AMSGrad, AdamW).

    ``m = lerp(m, g, 1-beta1)``, ``v = beta2*v + (1-beta2)*g*g``, then
    ``p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)`` with the bias corrections
    ``bc = 1 - beta**step``; eps is added after the square root. With ``amsgrad`` the
    running maximum of ``v`` is used instead of ``v`` (state ``max_exp_avg_sq``, allocated
    only then). ``weight_decay`` is added to the gradient (L2) or, with
    ``decoupled_weight_decay``, applied as ``p *= 1 - lr*weight_decay`` (AdamW).
    """

    _hyperparameters: tuple[str, ...] = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
                        "decoupled_weight_decay")
    _all_state_names: tuple[str, ...] = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _kernels = KernelsFor()  # this dtype's kernel specialisations (see _dispatch)

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False, decoupled_weight_decay: bool = False,
                 n_threads: int | None = None, dtype: npt.DTypeLike | None = None,
                 adopt: bool = False, master_dtype: npt.DTypeLike | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype)

    def _check(self, group: dict[str, Any], where: str | None = None) -> None:
        check_adam(group, where or type(self).__name__)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        kernels = self._kernels
        kernels.adam(seg["param"], grad, seg["exp_avg"], seg["exp_avg_sq"],
                     seg["max_exp_avg_sq"] if amsgrad else kernels.empty, step, group["lr"],
                     beta1, beta2, group["eps"], group["weight_decay"], amsgrad,
                     group["decoupled_weight_decay"], group["maximize"], grad_scale, n_threads)


class AdamW(Adam):
    """AdamW: :class:`Adam` with decoupled weight decay (default 1e-2), as torch.optim.AdamW.

    ``p *= 1 - lr*weight_decay`` before the Adam update; the decay never enters the
    moment estimates.
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, n_threads: int | None = None,
                 dtype: npt.DTypeLike | None = None, adopt: bool = False,
                 master_dtype: npt.DTypeLike | None = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, n_threads=n_threads, dtype=dtype,
                         adopt=adopt,
                         master_dtype=master_dtype)


class RMSprop(Optimizer):
    """RMSprop with torch.optim.RMSprop's exact semantics.

    ``s = alpha*s + (1-alpha)*g*g``; the step divides ``g`` by ``sqrt(s) + eps`` (eps
    after the square root). ``centered`` subtracts the square of a running mean of ``g``
    (state ``grad_avg``) from ``s`` first; ``momentum > 0`` accumulates the scaled step in
    ``momentum_buffer`` (``buf = momentum*buf + g/avg; p -= lr*buf``). Each of these
    buffers is allocated only when its option is on.
    """

    _hyperparameters: tuple[str, ...] = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")
    _all_state_names: tuple[str, ...] = ("square_avg", "grad_avg", "momentum_buffer")
    _kernels = KernelsFor()  # this dtype's kernel specialisations (see _dispatch)

    def __init__(self, params: Params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *,
                 maximize: bool = False, n_threads: int | None = None,
                 dtype: npt.DTypeLike | None = None, adopt: bool = False,
                 master_dtype: npt.DTypeLike | None = None) -> None:
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=centered, maximize=maximize)
        super().__init__(params, defaults, n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype)

    def _check(self, group: dict[str, Any], where: str = "RMSprop") -> None:
        check_rmsprop(group, where)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return (("square_avg",) + (("grad_avg",) if group["centered"] else ())
                + (("momentum_buffer",) if group["momentum"] > 0 else ()))

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        centered, momentum = group["centered"], group["momentum"]
        kernels = self._kernels
        kernels.rmsprop(seg["param"], grad, seg["square_avg"],
                        seg["grad_avg"] if centered else kernels.empty,
                        seg["momentum_buffer"] if momentum > 0 else kernels.empty,
                        group["lr"], group["alpha"], group["eps"], group["weight_decay"],
                        momentum, centered, group["maximize"], grad_scale, n_threads)


class Adadelta(Optimizer):
    """Adadelta with torch.optim.Adadelta's exact semantics (default lr 1.0).

    ``s = rho*s + (1-rho)*g*g``; ``delta = sqrt(acc + eps) / sqrt(s + eps) * g``;
    ``acc = rho*acc + (1-rho)*delta*delta``; ``p -= lr*delta``.
    """

    _hyperparameters: tuple[str, ...] = ("lr", "rho", "eps", "weight_decay", "maximize")
    _all_state_names: tuple[str, ...] = ("square_avg", "acc_delta")
    _kernels = KernelsFor()  # this dtype's kernel specialisations (see _dispatch)

    def __init__(self, params: Params, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0.0, *, maximize: bool = False,
                 n_threads: int | None = None, dtype: npt.DTypeLike | None = None,
                 adopt: bool = False, master_dtype: npt.DTypeLike | None = None) -> None:
        defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype)

    def _check(self, group: dict[str, Any], where: str = "Adadelta") -> None:
        check_adadelta(group, where)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("square_avg", "acc_delta")

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        self._kernels.adadelta(seg["param"], grad, seg["square_avg"], seg["acc_delta"],
                               group["lr"], group["rho"], group["eps"], group["weight_decay"],
                               group["maximize"], grad_scale, n_threads)


class Adagrad(Optimizer):
    """Adagrad with torch.optim.Adagrad's exact semantics.

    ``sum += g*g``; ``p -= clr * g / (sqrt(sum) + eps)`` with the decayed learning rate
    ``clr = lr / (1 + (step-1)*lr_decay)``. ``sum`` starts at each group's
    ``initial_accumulator_value`` (read once, when the buffer is allocated). torch.optim
    uses the constructor's value for every group; ``flatopt.torch.Adagrad`` does as torch.
    """

    _hyperparameters: tuple[str, ...] = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps",
                        "maximize")
    _all_state_names: tuple[str, ...] = ("sum",)
    _kernels = KernelsFor()  # this dtype's kernel specialisations (see _dispatch)

    def __init__(self, params: Params, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10, *, maximize: bool = False, n_threads: int | None = None,
                 dtype: npt.DTypeLike | None = None, adopt: bool = False,
                 master_dtype: npt.DTypeLike | None = None) -> None:
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps,
                        maximize=maximize)
        super().__init__(params, defaults, n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype)

    def _check(self, group: dict[str, Any], where: str = "Adagrad") -> None:
        check_adagrad(group, where)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("sum",)

    def _init_state(self, name: str, buffer: FloatArray) -> None:
        # Each group's segment starts at that group's initial_accumulator_value.
        for (start, stop), group in zip(self._segments, self.param_groups):
            buffer[start:stop] = group["initial_accumulator_value"]

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        self._kernels.adagrad(seg["param"], grad, seg["sum"], step, group["lr"],
                              group["lr_decay"], group["eps"], group["weight_decay"],
                              group["maximize"], grad_scale, n_threads)


__all__ = ["Adam", "AdamW", "RMSprop", "Adadelta", "Adagrad"]

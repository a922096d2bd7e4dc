"""Adam's variants: torch.optim's NAdam, RAdam and Adamax, and Lion.

Declared as in ``_adaptive.py``: hyperparameters, their checks, the state a group needs
and the kernel call. The formulas live in ``_kernels.pyx`` only.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from ._adaptive import _check_common, check_betas
from ._dispatch import KernelsFor
from ._optimizer import Optimizer, Params
from ._validation import KernelGrad, Segment, check_bool, check_real


def check_nadam(group: Mapping[str, Any], where: str = "NAdam") -> None:
    """Validate NAdam hyperparameters: Adam's rules plus momentum_decay >= 0."""
    _check_common(group, where)
    check_betas(group["betas"], where)
    check_real(group["momentum_decay"], f"{where} momentum_decay", low=0.0)
    check_bool(group["decoupled_weight_decay"], f"{where} decoupled_weight_decay")


def check_radam(group: Mapping[str, Any], where: str = "RAdam") -> None:
    """Validate RAdam hyperparameters: Adam's rules."""
    _check_common(group, where)
    check_betas(group["betas"], where)
    check_bool(group["decoupled_weight_decay"], f"{where} decoupled_weight_decay")


def check_adamax(group: Mapping[str, Any], where: str = "Adamax") -> None:
    """Validate Adamax hyperparameters: lr >= 0, betas in [0, 1), eps > 0."""
    _check_common(group, where)
    check_betas(group["betas"], where)


def check_lion(group: Mapping[str, Any], where: str = "Lion") -> None:
    """Validate Lion hyperparameters: lr >= 0, betas in [0, 1), weight_decay >= 0."""
    check_real(group["lr"], f"{where} lr", low=0.0)
    check_betas(group["betas"], where)
    check_real(group["weight_decay"], f"{where} weight_decay", low=0.0)
    check_bool(group["maximize"], f"{where} maximize")


class NAdam(Optimizer):
    """NAdam with torch.optim.NAdam's exact semantics (momentum schedule, NAdamW).

    The momentum coefficient follows the schedule ``mu_t = beta1*(1 - 0.5*0.96**(t*momentum_decay))``;
    the step combines the current gradient and the first moment, each weighted with the
    running product of ``mu`` (``state["mu_product"]``, one value per group, as torch keeps
    one per parameter). ``weight_decay`` is L2 or, with ``decoupled_weight_decay``,
    ``p *= 1 - lr*weight_decay``.

    torch keeps ``mu_product`` in a scalar tensor of its default dtype (float32 unless
    ``torch.set_default_dtype(torch.float64)``); flatopt keeps it in the parameters'
    dtype, which is the same thing whenever the two agree (float32 parameters with
    torch's default, float64 ones with a float64 default).
    """

    _hyperparameters: tuple[str, ...] = ("lr", "betas", "eps", "weight_decay", "momentum_decay",
                        "decoupled_weight_decay", "maximize")
    _all_state_names: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
    _kernels = KernelsFor()  # this dtype's kernel specialisations (see _dispatch)
    _plain_state: tuple[str, ...] = ("mu_product",)
    # None: round the running product to float32 exactly when the buffers are float32.
    # flatopt.torch.NAdam sets it to follow torch's default dtype instead.
    _mu_product_float32 = None

    def __init__(self, params: Params, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, maximize: bool = False,
                 n_threads: int | None = None, dtype: npt.DTypeLike | None = None,
                 adopt: bool = False, master_dtype: npt.DTypeLike | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        momentum_decay=momentum_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        super().__init__(params, defaults, n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype)
        self.state["mu_product"] = [1.0] * len(self.param_groups)

    def _check(self, group: dict[str, Any], where: str | None = None) -> None:
        check_nadam(group, where or "NAdam")

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _check_plain_state(self, key: str, value: object, n_groups: int) -> None:
        if (not isinstance(value, list) or len(value) != n_groups
                or not all(type(v) is float and 0.0 <= v <= 1.0 for v in value)):
            raise ValueError(f"state_dict['state'][{key!r}] must be a list of {n_groups} floats "
                             f"in [0, 1], got {value!r}")

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        beta1, beta2 = group["betas"]
        single = self._mu_product_float32
        if single is None:
            single = self.layout.dtype == np.float32
        mu_products = self._state["mu_product"]
        mu_products[gi] = self._kernels.nadam(
            seg["param"], grad, seg["exp_avg"], seg["exp_avg_sq"], step, mu_products[gi],
            single, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
            group["momentum_decay"], group["decoupled_weight_decay"], group["maximize"],
            grad_scale, n_threads)


class RAdam(Optimizer):
    """RAdam with torch.optim.RAdam's exact semantics (and decoupled weight decay).

    While the variance of the adaptive learning rate is intractable (torch's
    ``rho_t <= 5``, the first steps) the step is bias-corrected momentum SGD,
    ``p -= lr * m/bc1``; after that it is Adam's step times the rectification term.
    """

    _hyperparameters: tuple[str, ...] = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "maximize")
    _all_state_names: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
    _kernels = KernelsFor()  # this dtype's kernel specialisations (see _dispatch)

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, *, maximize: bool = False,
                 n_threads: int | None = None, dtype: npt.DTypeLike | None = None,
                 adopt: bool = False, master_dtype: npt.DTypeLike | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        super().__init__(params, defaults, n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype)

    def _check(self, group: dict[str, Any], where: str | None = None) -> None:
        check_radam(group, where or "RAdam")

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        beta1, beta2 = group["betas"]
        self._kernels.radam(seg["param"], grad, seg["exp_avg"], seg["exp_avg_sq"], step,
                            group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                            group["decoupled_weight_decay"], group["maximize"], grad_scale,
                            n_threads)


class Adamax(Optimizer):
    """Adamax with torch.optim.Adamax's exact semantics.

    ``m = lerp(m, g, 1-beta1)``; ``u = max(beta2*u, |g| + eps)`` (state ``exp_inf``);
    ``p -= lr/(1 - beta1**step) * m/u``. ``weight_decay`` is L2 (added to the gradient).
    """

    _hyperparameters: tuple[str, ...] = ("lr", "betas", "eps", "weight_decay", "maximize")
    _all_state_names: tuple[str, ...] = ("exp_avg", "exp_inf")
    _kernels = KernelsFor()  # this dtype's kernel specialisations (see _dispatch)

    def __init__(self, params: Params, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, maximize: bool = False,
                 n_threads: int | None = None, dtype: npt.DTypeLike | None = None,
                 adopt: bool = False, master_dtype: npt.DTypeLike | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype)

    def _check(self, group: dict[str, Any], where: str | None = None) -> None:
        check_adamax(group, where or "Adamax")

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_inf")

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        beta1, beta2 = group["betas"]
        self._kernels.adamax(seg["param"], grad, seg["exp_avg"], seg["exp_inf"], step,
                             group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                             group["maximize"], grad_scale, n_threads)


class Lion(Optimizer):
    """Lion (EvoLved Sign Momentum; Chen et al. 2023), as optax and DeepSpeed implement it.

    ``c = beta1*m + (1-beta1)*g``; ``p = p*(1 - lr*weight_decay) - lr*sign(c)``;
    ``m = beta2*m + (1-beta2)*g`` (state ``exp_avg``). Weight decay is decoupled, as in
    the paper; Lion's lr is typically 3-10x smaller than AdamW's and its weight decay
    3-10x larger. torch.optim has no Lion: ``flatopt.torch.Lion`` takes these arguments.

    ``sign(0) = 0`` (the paper, optax, lion-pytorch, Keras): an element whose ``c`` is
    exactly zero (zero gradient and momentum) does not move. DeepSpeed's CPU Lion uses
    ``copysign(lr, c)`` and moves it by ``lr``; the two agree everywhere else.
    """

    _hyperparameters: tuple[str, ...] = ("lr", "betas", "weight_decay", "maximize")
    _all_state_names: tuple[str, ...] = ("exp_avg",)
    _kernels = KernelsFor()  # this dtype's kernel specialisations (see _dispatch)

    def __init__(self, params: Params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False,
                 n_threads: int | None = None, dtype: npt.DTypeLike | None = None,
                 adopt: bool = False, master_dtype: npt.DTypeLike | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype)

    def _check(self, group: dict[str, Any], where: str | None = None) -> None:
        check_lion(group, where or "Lion")

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg",)

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        beta1, beta2 = group["betas"]
        self._kernels.lion(seg["param"], grad, seg["exp_avg"], group["lr"], beta1, beta2,
                           group["weight_decay"], group["maximize"], grad_scale, n_threads)


__all__ = ["NAdam", "RAdam", "Adamax", "Lion"]

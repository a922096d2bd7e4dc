"""The momentum family: torch.optim.SGD and textbook (moving-average) Momentum."""

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

from ._dispatch import KernelsFor
from ._optimizer import Optimizer, Params
from ._validation import KernelGrad, Segment, check_bool, check_real


def check_sgd(group: Mapping[str, Any], where: str = "SGD") -> None:
    """Validate SGD hyperparameters in ``group`` (torch.optim.SGD's rules, plus finiteness)."""
    check_real(group["lr"], f"{where} lr", low=0.0)
    momentum = check_real(group["momentum"], f"{where} momentum", low=0.0)
    dampening = check_real(group["dampening"], f"{where} dampening")
    check_real(group["weight_decay"], f"{where} weight_decay", low=0.0)
    nesterov = check_bool(group["nesterov"], f"{where} nesterov")
    check_bool(group["maximize"], f"{where} maximize")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"{where}: Nesterov momentum requires a momentum > 0 and zero dampening, "
            f"got momentum={momentum}, dampening={dampening}")


def check_momentum(group: Mapping[str, Any], where: str = "Momentum") -> None:
    """Validate Momentum hyperparameters: lr >= 0, beta in [0, 1), weight_decay >= 0."""
    check_real(group["lr"], f"{where} lr", low=0.0)
    check_real(group["beta"], f"{where} beta", low=0.0, high=1.0, high_open=True)
    check_real(group["weight_decay"], f"{where} weight_decay", low=0.0)
    check_bool(group["maximize"], f"{where} maximize")


class SGD(Optimizer):
    """Stochastic gradient descent with torch.optim.SGD's exact semantics.

    Coupled (L2) weight decay, heavy-ball momentum with dampening, Nesterov momentum and
    ``maximize``. As in torch, the momentum buffer starts as the first gradient it sees
    (undampened); after that ``buf = momentum*buf + (1-dampening)*g``.
    """

    _hyperparameters: tuple[str, ...] = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    _all_state_names: tuple[str, ...] = ("momentum_buffer",)
    _kernels = KernelsFor()  # this dtype's kernel specialisations (see _dispatch)
    _plain_state: tuple[str, ...] = ("momentum_buffer_initialized",)

    def __init__(self, params: Params, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, n_threads: int | None = None,
                 dtype: npt.DTypeLike | None = None, adopt: bool = False,
                 master_dtype: npt.DTypeLike | None = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype)
        dict.__setitem__(self.state, "momentum_buffer_initialized", [False] * len(self.param_groups))

    def _check(self, group: dict[str, Any], where: str = "SGD") -> None:
        check_sgd(group, where)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _check_loaded_state(self, groups: list[dict[str, Any]], state: dict[str, Any]) -> None:
        # The buffer is created by the first step that uses momentum: it must be there
        # exactly when a group's flag says it was initialised.
        if any(state["momentum_buffer_initialized"]) and "momentum_buffer" not in state:
            raise ValueError("state_dict['state'] lacks 'momentum_buffer', but "
                             "'momentum_buffer_initialized' says it was initialised")

    def _start_run(self, gi: int, group: dict[str, Any], fresh: bool) -> None:
        # A run of parameters without a momentum buffer yet starts it from the gradient.
        if group["momentum"] != 0:
            self.state["momentum_buffer_initialized"][gi] = not fresh

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        momentum = group["momentum"]
        if momentum != 0:
            initialized = self._state["momentum_buffer_initialized"]
            self._kernels.sgd(seg["param"], grad, seg["momentum_buffer"], group["lr"], momentum,
                              group["dampening"], group["weight_decay"], group["nesterov"],
                              group["maximize"], not initialized[gi], grad_scale, n_threads)
            initialized[gi] = True
        else:
            self._kernels.sgd(seg["param"], grad, self._kernels.empty, group["lr"], momentum,
                              group["dampening"], group["weight_decay"], group["nesterov"],
                              group["maximize"], False, grad_scale, n_threads)


class Momentum(Optimizer):
    """Textbook momentum: ``v = beta*v + (1-beta)*g; p -= lr*v``, ``v`` starting at zero.

    ``g`` includes coupled weight decay (``g + weight_decay*p``) and is negated when
    ``maximize``.
    """

    _hyperparameters: tuple[str, ...] = ("lr", "beta", "weight_decay", "maximize")
    _all_state_names: tuple[str, ...] = ("momentum_buffer",)
    _kernels = KernelsFor()  # this dtype's kernel specialisations (see _dispatch)

    def __init__(self, params: Params, lr: float, beta: float = 0.9, weight_decay: float = 0.0,
                 maximize: bool = False, *, n_threads: int | None = None,
                 dtype: npt.DTypeLike | None = None, adopt: bool = False,
                 master_dtype: npt.DTypeLike | None = None) -> None:
        defaults = dict(lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype)

    def _check(self, group: dict[str, Any], where: str = "Momentum") -> None:
        check_momentum(group, where)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        self._kernels.momentum(seg["param"], grad, seg["momentum_buffer"], group["lr"],
                               group["beta"], group["weight_decay"], group["maximize"],
                               grad_scale, n_threads)

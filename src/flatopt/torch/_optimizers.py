"""The public classes: torch.optim's optimizers (and Momentum) over flat buffers.

Each is a few lines: its NumPy twin, torch's constructor signature written out (so that
``inspect.signature`` and ``help()`` show it), and which per-parameter state torch keeps.
The update formulas are the NumPy twin's kernel; everything else is ``_FlatOptimizer``.
"""

from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from .. import _adam_variants, _adaptive, _momentum
from .._optimizer import Optimizer as NumpyOptimizer
from ._base import _FlatOptimizer
from ._packing import Bucket, _get_scalar_dtype

if TYPE_CHECKING:  # torch.optim's own alias (torch >= 2.2); quoted where used
    from torch.optim.optimizer import ParamsT

# The buffers' dtype (the master's, with master_dtype): what torch would keep state in.
_TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}

_SEE = """See :class:`flatopt.{0}` for the update and :mod:`flatopt.torch` for how parameters,
    gradients and checkpoints are handled, and for the remaining differences from torch.optim."""


class SGD(_FlatOptimizer):
    __doc__ = f"""torch.optim.SGD on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads`` and ``master_dtype``. {_SEE.format("SGD")}
    """
    _numpy_class = _momentum.SGD

    def __init__(self, params: "ParamsT", lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 n_threads: int | None = None,
                 master_dtype: torch.dtype | None = None) -> None:
        super().__init__(params, dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
            fused=fused), n_threads=n_threads, master_dtype=master_dtype)

    def _uses_state(self, group: dict[str, Any]) -> bool:
        return bool(group["momentum"] != 0)  # torch keeps no state for plain SGD


class Momentum(_FlatOptimizer):
    __doc__ = f"""Textbook momentum on flat buffers (no torch.optim twin):
    ``v = beta*v + (1-beta)*g; p -= lr*v``. Its state dict uses torch.optim's layout, with
    a per-parameter ``momentum_buffer``. {_SEE.format("Momentum")}
    """
    _numpy_class = _momentum.Momentum

    def __init__(self, params: "ParamsT", lr: float | Tensor, beta: float = 0.9, weight_decay: float = 0.0,
                 maximize: bool = False, *, n_threads: int | None = None,
                 master_dtype: torch.dtype | None = None) -> None:
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize),
                         n_threads=n_threads, master_dtype=master_dtype)


def _torch_betas(betas: Any) -> Any:
    """``betas`` as torch.optim.Adam/AdamW store them: a tuple, a 1-element tensor as a
    0-d one (anything else is left for the checks to refuse)."""
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        return betas
    return tuple(b.squeeze() if isinstance(b, Tensor) and b.dim() != 0 else b for b in betas)


class Adam(_FlatOptimizer):
    __doc__ = f"""torch.optim.Adam on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads`` and ``master_dtype``. {_SEE.format("Adam")}
    """
    _numpy_class = _adaptive.Adam
    _torch_step = True

    def __init__(self, params: "ParamsT", lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False,
                 n_threads: int | None = None,
                 master_dtype: torch.dtype | None = None) -> None:
        super().__init__(params, dict(
            lr=lr, betas=_torch_betas(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay), n_threads=n_threads, master_dtype=master_dtype)


class AdamW(_FlatOptimizer):
    __doc__ = f"""torch.optim.AdamW on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads`` and ``master_dtype``. {_SEE.format("AdamW")}
    """
    _numpy_class = _adaptive.AdamW
    _torch_step = True
    _fixed = {"decoupled_weight_decay": True}  # in every group, as torch's AdamW sets it

    def __init__(self, params: "ParamsT", lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, n_threads: int | None = None,
                 master_dtype: torch.dtype | None = None) -> None:
        super().__init__(params, dict(
            lr=lr, betas=_torch_betas(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused),
            n_threads=n_threads, master_dtype=master_dtype)


class RMSprop(_FlatOptimizer):
    __doc__ = f"""torch.optim.RMSprop on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads`` and ``master_dtype``. {_SEE.format("RMSprop")}
    """
    _numpy_class = _adaptive.RMSprop
    _torch_step = True

    def __init__(self, params: "ParamsT", lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False,
                 capturable: bool = False, foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, *, n_threads: int | None = None,
                 master_dtype: torch.dtype | None = None) -> None:
        super().__init__(params, dict(
            lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
            capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable),
            n_threads=n_threads, master_dtype=master_dtype)


class Adadelta(_FlatOptimizer):
    __doc__ = f"""torch.optim.Adadelta on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads`` and ``master_dtype``. {_SEE.format("Adadelta")}
    """
    _numpy_class = _adaptive.Adadelta
    _torch_step = True

    def __init__(self, params: "ParamsT", lr: float | Tensor = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0, foreach: bool | None = None, *, capturable: bool = False,
                 maximize: bool = False, differentiable: bool = False, n_threads: int | None = None,
                 master_dtype: torch.dtype | None = None) -> None:
        super().__init__(params, dict(
            lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize, capturable=capturable,
            foreach=foreach, differentiable=differentiable), n_threads=n_threads, master_dtype=master_dtype)


class Adagrad(_FlatOptimizer):
    __doc__ = f"""torch.optim.Adagrad on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads`` and ``master_dtype``. As in torch, every parameter's ``sum`` starts at the
    constructor's ``initial_accumulator_value`` (a group's own value is kept in the group but
    not used), including parameters added later by ``add_param_group`` (torch gives those no
    state and fails at their first step). {_SEE.format("Adagrad")}
    """
    _numpy_class = _adaptive.Adagrad
    _torch_step = True
    _eager_state = True  # torch creates Adagrad's state in the constructor

    def __init__(self, params: "ParamsT", lr: float | Tensor = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False, fused: bool | None = None,
                 n_threads: int | None = None,
                 master_dtype: torch.dtype | None = None) -> None:
        super().__init__(params, dict(
            lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
            differentiable=differentiable, fused=fused), n_threads=n_threads, master_dtype=master_dtype)

    def _fresh_state(self, bucket: Bucket, name: str) -> npt.NDArray[np.floating[Any]]:
        buf = super()._fresh_state(bucket, name)
        if name == "sum":
            buf.fill(self.defaults["initial_accumulator_value"])
        return buf


class NAdam(_FlatOptimizer):
    __doc__ = f"""torch.optim.NAdam on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads`` and ``master_dtype``. {_SEE.format("NAdam")}
    """
    _numpy_class = _adam_variants.NAdam
    _torch_step = True

    def __init__(self, params: "ParamsT", lr: float | Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, foreach: bool | None = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False, n_threads: int | None = None,
                 master_dtype: torch.dtype | None = None) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable), n_threads=n_threads, master_dtype=master_dtype)

    # torch keeps NAdam's mu_product per parameter: the product of the mu_t of the steps it
    # took, under the beta1 and momentum_decay of then, so parameters of one group with the
    # same step count can differ (some skipped steps while a scheduler moved beta1).
    # flatopt.torch.NAdam keeps it so, in a float64 tensor per bucket (``bucket.scalars``,
    # whose 0-d views are the state entries' "mu_product"); the runs of a step are split where
    # it differs (``_run_keys``), so one value serves each kernel call: it is handed to
    # flatopt.NAdam (whose state holds one value per group) before the call, and the value
    # the call leaves there is given to the run's parameters after it (``_file_mu``). The
    # values are torch's exactly: float32 ones (torch's default scalar dtype) are held
    # exactly by a double.

    _mu_pending: tuple[Bucket, int, tuple[int, int]] | None = None
    _mu_loaded: bool = False

    @staticmethod
    def _mu(bucket: Bucket) -> torch.Tensor:
        mu = bucket.scalars.get("mu_product")
        if mu is None:
            mu = bucket.scalars["mu_product"] = torch.ones(len(bucket.params), dtype=torch.float64)
        return mu

    def _run_keys(self, bucket: Bucket) -> npt.NDArray[Any]:
        # Called as a step plans its runs: a value still pending here is from a step that
        # raised during a kernel call, and is dropped.
        self._mu_pending = None
        return self._mu(bucket).numpy()

    def _live_extras(self, bucket: Bucket, i: int) -> dict[str, torch.Tensor]:
        return {"mu_product": self._mu(bucket)[i]}

    def _file_mu(self) -> None:
        """Give the last kernel call's mu_product to the parameters of its run."""
        if self._mu_pending is not None:
            bucket, gi, (a, b) = self._mu_pending
            self._mu(bucket)[a:b] = bucket.opt.state["mu_product"][gi]
            self._mu_pending = None

    def _before_update(self, bucket: Bucket, gi: int, group: dict[str, Any], count: int,
                       span: tuple[int, int] | None) -> None:
        # torch's mu_product is a scalar of its default dtype (float32 unless float64 is set);
        # torch's load_state_dict casts it to the parameter's dtype, as every state tensor.
        # flatopt.NAdam declares _mu_product_float32 as a bare ``= None`` (so mypy infers
        # the type None); it is None or a bool (see _adam_variants.NAdam).
        nadam = cast(_adam_variants.NAdam, bucket.opt)
        if self._mu_loaded:
            nadam._mu_product_float32 = nadam.layout.dtype == np.float32  # type: ignore[assignment]
        else:
            nadam._mu_product_float32 = _get_scalar_dtype() == torch.float32  # type: ignore[assignment]
        assert span is not None  # NAdam's groups always keep state
        self._file_mu()
        nadam.state["mu_product"][gi] = float(self._mu(bucket)[span[0]])
        self._mu_pending = (bucket, gi, span)

    def _after_update(self, bucket: Bucket, *args: Any, **kwargs: Any) -> None:
        self._file_mu()
        super()._after_update(bucket, *args, **kwargs)

    def _param_state(self, bucket: Bucket, i: int, copy: bool) -> dict[str, Any] | None:
        entry = super()._param_state(bucket, i, copy)
        if entry is not None and copy:  # saved as torch saves it: a scalar of its dtype
            entry["mu_product"] = torch.tensor(
                float(self._mu(bucket)[i]),
                dtype=_TORCH_DTYPE[bucket.opt.layout.dtype] if self._mu_loaded else _get_scalar_dtype())
        return entry

    def _check_entry(self, pid: Any, entry: dict[str, Any]) -> None:
        if "mu_product" in entry:
            value = entry["mu_product"]
            value = float(value.item() if isinstance(value, torch.Tensor) else value)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"NAdam: state[{pid}]['mu_product'] must be in [0, 1], got {value}")
        elif entry:
            raise ValueError(f"NAdam: state for parameter {pid} lacks 'mu_product'")

    def _install_state(self, entries: dict[Any, Any], loaded: bool = False,
                       known: dict[torch.Tensor, int] | None = None) -> None:
        """Carry each parameter's mu_product (a checkpoint's, add_param_group's repack,
        copies) into the new buffers' tensors; a parameter without one starts at 1."""
        mu: dict[Any, float] = {}
        stripped: dict[Any, Any] = {}
        for p, entry in entries.items():
            if isinstance(p, torch.Tensor) and isinstance(entry, dict):
                entry = dict(entry)
                value = entry.pop("mu_product", None)
                if value is not None:
                    mu[p] = float(value.item() if isinstance(value, torch.Tensor) else value)
            stripped[p] = entry
        super()._install_state(stripped, loaded, known)
        if loaded:  # torch's load_state_dict casts it to the parameter's dtype from now on
            self._mu_loaded = True
        self._mu_pending = None
        for bucket in self._buckets:
            self._mu(bucket).copy_(torch.tensor([mu.get(p, 1.0) for p in bucket.params], dtype=torch.float64))


class RAdam(_FlatOptimizer):
    __doc__ = f"""torch.optim.RAdam on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads`` and ``master_dtype``. {_SEE.format("RAdam")}
    """
    _numpy_class = _adam_variants.RAdam
    _torch_step = True

    def __init__(self, params: "ParamsT", lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, decoupled_weight_decay: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, n_threads: int | None = None,
                 master_dtype: torch.dtype | None = None) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
            capturable=capturable, decoupled_weight_decay=decoupled_weight_decay,
            differentiable=differentiable), n_threads=n_threads, master_dtype=master_dtype)


class Adamax(_FlatOptimizer):
    __doc__ = f"""torch.optim.Adamax on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads`` and ``master_dtype``. {_SEE.format("Adamax")}
    """
    _numpy_class = _adam_variants.Adamax
    _torch_step = True

    def __init__(self, params: "ParamsT", lr: float | Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False, capturable: bool = False,
                 n_threads: int | None = None,
                 master_dtype: torch.dtype | None = None) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, maximize=maximize,
            differentiable=differentiable, capturable=capturable), n_threads=n_threads, master_dtype=master_dtype)


class Lion(_FlatOptimizer):
    """Lion on flat buffers (no torch.optim twin): ``sign`` of an interpolated momentum,
    decoupled weight decay; see :class:`flatopt.Lion` for the update and
    :mod:`flatopt.torch` for how parameters, gradients and checkpoints are handled. Its
    state dict uses torch.optim's layout with a per-parameter ``exp_avg`` (as
    lion-pytorch's).
    """
    _numpy_class = _adam_variants.Lion

    def __init__(self, params: "ParamsT", lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, n_threads: int | None = None,
                 master_dtype: torch.dtype | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize),
                         n_threads=n_threads, master_dtype=master_dtype)


__all__ = ["SGD", "Momentum", "Adam", "AdamW", "RMSprop", "Adadelta", "Adagrad", "NAdam", "RAdam",
           "Adamax", "Lion"]


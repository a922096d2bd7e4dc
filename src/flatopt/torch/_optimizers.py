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
from . import _checkpoint
from ._base import _FlatOptimizer
from ._packing import Bucket, _get_scalar_dtype

if TYPE_CHECKING:  # torch.optim's own alias (torch >= 2.2); quoted where used
    from torch.optim.optimizer import ParamsT

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
    # same step count can differ (some skipped steps while a scheduler moved beta1). It is
    # a scalar tensor whose dtype decides how the product rounds: torch's default scalar
    # dtype (float32 unless float64 is set) where a first step made it, the parameter's
    # dtype once load_state_dict cast it, a written tensor's own dtype.
    # flatopt.torch.NAdam keeps them in three arrays per bucket (``bucket.scalars``; NumPy's
    # scalar access is the fast one): whether each parameter's is float32, and its value in
    # a float32 and a float64 array, the one of its dtype (of which a 0-d tensor view is its
    # state entry's "mu_product", so that copies of it have torch's dtype). The runs of a
    # step are split where the values or dtypes differ (``_run_keys``), so one value serves
    # each kernel call: it is handed to flatopt.NAdam (whose state holds one value per
    # group) before the call, and the value the call leaves there is given to the run's
    # parameters after it (``_file_mu``).

    _mu_pending: tuple[Bucket, int, tuple[int, int]] | None = None

    @staticmethod
    def _mu(bucket: Bucket) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32], npt.NDArray[np.float64]]:
        """Whether each parameter's mu_product is float32; the float32 and float64 values."""
        if "mu_product" not in bucket.scalars:
            n = len(bucket.params)
            bucket.scalars["mu_product_is_float32"] = np.full(n, _get_scalar_dtype() == torch.float32)
            bucket.scalars["mu_product_float32"] = np.ones(n, dtype=np.float32)
            bucket.scalars["mu_product"] = np.ones(n, dtype=np.float64)
        scalars = bucket.scalars
        return scalars["mu_product_is_float32"], scalars["mu_product_float32"], scalars["mu_product"]

    def _run_keys(self, bucket: Bucket) -> npt.NDArray[Any]:
        # Called as a step plans its runs: a value still pending here is from a step that
        # raised during a kernel call, and is dropped.
        self._mu_pending = None
        single, mu32, mu64 = self._mu(bucket)
        fresh = bucket.counts == 0
        if fresh.any():  # torch makes a first step's value in its default dtype of then
            default = _get_scalar_dtype() == torch.float32
            changed = np.flatnonzero(fresh & (single != default))
            if changed.size:
                single[changed] = default
                (mu32 if default else mu64)[changed] = (mu64 if default else mu32)[changed]
                _checkpoint.refresh_entries(self, bucket, changed.tolist())  # views of the other array
        if single.all():  # the usual case: all of torch's default dtype
            return mu32
        if not single.any():
            return mu64
        keys: npt.NDArray[np.complex128] = np.where(single, mu32, mu64) + 1j * single
        return keys  # a run shares both: a complex key

    def _live_extras(self, bucket: Bucket, i: int) -> dict[str, torch.Tensor]:
        single, mu32, mu64 = self._mu(bucket)
        return {"mu_product": torch.from_numpy(mu32 if single[i] else mu64)[i]}

    def _file_mu(self) -> None:
        """Give the last kernel call's mu_product to the parameters of its run."""
        if self._mu_pending is not None:
            bucket, gi, (a, b) = self._mu_pending
            single, mu32, mu64 = self._mu(bucket)
            (mu32 if single[a] else mu64)[a:b] = bucket.opt.state["mu_product"][gi]
            self._mu_pending = None

    def _before_update(self, bucket: Bucket, gi: int, group: dict[str, Any], count: int,
                       span: tuple[int, int] | None) -> None:
        assert span is not None  # NAdam's groups always keep state
        self._file_mu()
        single, mu32, mu64 = self._mu(bucket)
        rounded = bool(single[span[0]])
        # flatopt.NAdam declares _mu_product_float32 as a bare ``= None`` (so mypy infers
        # the type None); it is None or a bool (see _adam_variants.NAdam).
        nadam = cast(_adam_variants.NAdam, bucket.opt)
        nadam._mu_product_float32 = rounded  # type: ignore[assignment]
        nadam.state["mu_product"][gi] = float((mu32 if rounded else mu64)[span[0]])
        self._mu_pending = (bucket, gi, span)

    def _after_update(self, bucket: Bucket, *args: Any, **kwargs: Any) -> None:
        self._file_mu()
        super()._after_update(bucket, *args, **kwargs)

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
        copies, written entries) into the new buffers' tensors, in its dtype: a
        checkpoint's cast to the parameter's (the master's, for 16-bit parameters), as
        torch's load_state_dict does; a parameter without one starts at 1, in torch's
        default scalar dtype."""
        values: dict[Any, Any] = {}
        stripped: dict[Any, Any] = {}
        for p, entry in entries.items():
            if isinstance(p, torch.Tensor) and isinstance(entry, dict):
                entry = dict(entry)
                value = entry.pop("mu_product", None)
                if value is not None:
                    values[p] = value
            stripped[p] = entry
        self._mu_pending = None
        fresh = _get_scalar_dtype() == torch.float32
        for bucket in self._buckets:
            in_float32 = []
            for p in bucket.params:
                value = values.get(p)
                if isinstance(value, torch.Tensor):
                    in_float32.append(bucket.opt.layout.dtype == np.float32 if loaded
                                      else value.dtype != torch.float64)
                else:
                    in_float32.append(fresh)
            single, mu32, mu64 = self._mu(bucket)
            single[:] = in_float32
            mu32[:] = mu64[:] = [float(values.get(p, 1.0)) for p in bucket.params]
        super()._install_state(stripped, loaded, known)  # makes the entries, of these views


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


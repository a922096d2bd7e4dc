"""NumPy optimizers with Keras 3's names, arguments, defaults and update formulas.

``flatopt.keras.SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adadelta``, ``Adagrad``,
``Adamax``, ``Nadam`` and ``Lion`` take ``keras.optimizers``' arguments (``learning_rate``,
``beta_1``, ``epsilon``, ...) with Keras's defaults, and update exactly as Keras 3's
backend-agnostic ``update_step`` does (what the TensorFlow and JAX backends run; the torch
backend computes the same formulas with ``torch._foreach`` ops, equal to rounding for
finite values; see the docs for overflowing gradients). They
use the flat-buffer API of every flatopt optimizer (``opt.params``, ``opt.grads``,
``opt.step()``, parameter groups, ``state_dict()``), for porting a Keras training script
or reproducing a TensorFlow paper without Keras::

    opt = flatopt.keras.Adam([W, b], learning_rate=1e-3)   # keras.optimizers.Adam(1e-3)
    ...                                                     # write gradients into opt.grads
    opt.step()                                              # optimizer.apply(grads)

How Keras's formulas differ from torch.optim's optimizers of the same name is in the
documentation (``docs/user_guide/keras.rst``). In short: SGD keeps the learning rate
inside the velocity;
Adam's, Nadam's and Adamax's epsilon is not bias-corrected; RMSprop and Adagrad put
epsilon inside the square root; Adagrad's accumulator starts at 0.1; Nadam's momentum
schedule is ``0.96**t`` (torch: ``0.96**(0.004*t)``); weight decay is always decoupled,
``p *= 1 - weight_decay*learning_rate`` before the update, for every optimizer.

Learning rate and other hyperparameters
---------------------------------------
``learning_rate`` is a float, a ``keras.optimizers.schedules.LearningRateSchedule``
(called with the iteration count, the steps taken so far: Keras's
``optimizer.iterations``), or any other callable, called with no arguments, as Keras
calls them. flatopt.keras calls it once per step and group, before anything is written,
and uses that one value for the update and for the weight decay. Keras calls it a second
time for the weight decay: a schedule gives the same value both times, so the results
agree, but a callable that returns another value at each call gives other numbers. As in
Keras, ``opt.learning_rate = 0.5`` (or ``opt.beta_1``, ``opt.momentum``, ... any
constructor hyperparameter) changes it for the next step, validated at once, and reading
``opt.learning_rate`` gives the current rate. Each hyperparameter may also differ per
group (``opt.param_groups[i]["learning_rate"]``); the attribute is then readable only
where the groups agree.

Precision
---------
Keras computes the step-dependent scalars (``beta_1**t``, Adam's ``alpha``, Nadam's
momentum schedule and its running product) in the variables' dtype, after casting the
hyperparameters to it; so does flatopt.keras, in the buffers' dtype. Keras keeps a float
``learning_rate`` in a variable of ``keras.config.floatx()`` (float32 by default) and
casts it to each variable's dtype; flatopt.keras uses it as given, cast to the buffers'
dtype. The two agree whenever floatx is the parameters' dtype (float32 parameters by
default; ``keras.config.set_floatx("float64")`` for float64 ones).

Not supported: ``clipnorm``, ``clipvalue``, ``global_clipnorm`` (``opt.clip_grad_norm_``
clips by the global norm, with torch's ``+ 1e-6``; clip per variable or per element on
``opt.grads`` with NumPy), ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``,
``loss_scale_factor`` (use ``step(grad_scale=...)``), ``gradient_accumulation_steps``: as
keyword arguments and attributes they accept Keras's default (off) and raise a TypeError
for any other value. Nor ``exclude_from_weight_decay`` (put those parameters in a group
with ``weight_decay=None``, or ``0.0`` for AdamW, which requires a number as Keras's does).
"""

import inspect
import numbers
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypedDict, TypeGuard

import numpy as np
import numpy.typing as npt

from . import _adam_variants
from ._dispatch import kernels
from ._optimizer import Grads, Optimizer, Params
from ._validation import FloatArray, KernelGrad, Segment, check_bool, check_fits, check_real, describe

if sys.version_info >= (3, 11):  # at run time too: typing.get_type_hints reads the signatures
    from typing import Unpack
else:
    from typing_extensions import Unpack


class LearningRateSchedule:
    """Base class of a learning rate that depends on the step, without Keras: as with
    ``keras.optimizers.schedules.LearningRateSchedule`` (whose instances work as well), a
    subclass's ``__call__(step)`` is given the iteration count (the steps taken so far)
    and returns the rate; copies and pickles of the optimizer carry it along. For
    example ``0.1 / (1 + step)``: a subclass whose ``__call__(self, step)`` returns it.
    """

    def __call__(self, step: int) -> float:
        raise NotImplementedError


#: ``learning_rate``: a float, a schedule (called with the iteration count), or a
#: callable of no arguments.
LearningRate = float | LearningRateSchedule | Callable[[], float]


def _is_schedule(value: object) -> bool:
    """Whether ``value`` is a learning-rate schedule, which Keras calls with the iteration
    count (any other callable learning rate it calls with no arguments): a
    :class:`LearningRateSchedule`, or Keras's."""
    return isinstance(value, LearningRateSchedule) or any(
        c.__name__ == "LearningRateSchedule" and c.__module__.split(".")[0] in ("keras", "tf_keras")
        for c in type(value).__mro__)


def _is_callable_rate(value: object) -> TypeGuard[Callable[..., Any]]:
    return callable(value) and not isinstance(value, numbers.Real)


def _check_learning_rate(value: object, where: str) -> None:
    if not _is_callable_rate(value):
        check_real(value, f"{where} learning_rate", low=0.0)
    elif not _is_schedule(value):
        try:
            signature = inspect.signature(value)
        except (TypeError, ValueError):  # a builtin without one: called as it is
            return
        try:
            signature.bind()
        except TypeError:
            raise TypeError(
                f"{where} learning_rate: a callable learning rate is called with no arguments, "
                "as Keras calls it (a LearningRateSchedule, flatopt.keras's or Keras's, gets the "
                f"iteration count); got {describe(value)}{signature}") from None


def _check_weight_decay(value: object, where: str) -> None:
    if value is not None:
        check_real(value, f"{where} weight_decay", low=0.0)


def _check_unit(group: Mapping[str, Any], name: str, where: str, high_open: bool = False) -> None:
    check_real(group[name], f"{where} {name}", low=0.0, high=1.0, high_open=high_open)


def _check_epsilon(group: Mapping[str, Any], where: str) -> None:
    check_real(group["epsilon"], f"{where} epsilon", low=0.0, low_open=True)


def _check_betas(group: Mapping[str, Any], where: str) -> None:
    """beta_1 and beta_2 each in [0, 1), torch's rule for ``betas``, each checked by its name."""
    _check_unit(group, "beta_1", where, high_open=True)
    _check_unit(group, "beta_2", where, high_open=True)


class _Hyperparameter:
    """A Keras optimizer attribute (``opt.beta_1``): read from the parameter groups (where
    they agree), written to all of them after validation; it takes effect at the next
    step, as assigning Keras's attribute does."""

    name: str

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, opt: "_KerasOptimizer | None", owner: type | None = None) -> Any:
        if opt is None:
            return self
        return opt._get_hyperparameter(self.name)

    def __set__(self, opt: "_KerasOptimizer", value: Any) -> None:
        opt._set_hyperparameter(self.name, value)


class _Unsupported:
    """A Keras optimizer argument flatopt.keras does not implement (``clipnorm``), as a
    constructor argument and an attribute: it reads Keras's default, ``off`` (None, or
    ``use_ema``'s False, ``ema_momentum``'s 0.99), and any other value raises a TypeError
    that says what to do ``instead``, rather than doing nothing."""

    name: str

    def __init__(self, instead: str, off: Any = None) -> None:
        self.instead, self.off = instead, off

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, opt: object, owner: type | None = None) -> Any:
        return self if opt is None else self.off

    def __set__(self, opt: object, value: Any) -> None:
        self.check(value, f"{type(opt).__name__}.{self.name}")

    def check(self, value: Any, where: str) -> None:
        """Raise unless ``value`` is Keras's default; ``where`` names the argument."""
        try:  # False and np.False_, 0.99 and np.float64(0.99); a flag only equals a flag
            off = value is self.off or (self.off is not None and bool(value == self.off) and (
                isinstance(value, (bool, np.bool_)) == isinstance(self.off, bool)))
        except (TypeError, ValueError):
            off = False
        if not off:
            raise TypeError(f"{where}: not supported by flatopt.keras (only Keras's default, "
                            f"{self.off!r}), got {describe(value)}; instead, {self.instead}")


_EMA_INSTEAD = "keep a moving average of opt.params with NumPy after each step()"


class KerasUnsupported(TypedDict, total=False):
    """Keras's optimizer arguments flatopt.keras takes only at Keras's defaults (off), as
    keyword-only arguments of every constructor (``**unsupported``), so that a call
    ported from Keras that spells them out works; any other value raises a TypeError."""

    clipnorm: float | None
    clipvalue: float | None
    global_clipnorm: float | None
    use_ema: bool
    ema_momentum: float
    ema_overwrite_frequency: int | None
    loss_scale_factor: float | None
    gradient_accumulation_steps: int | None


class _KerasOptimizer(Optimizer):
    """Base of flatopt.keras's optimizers: a per-step learning rate (float or schedule),
    Keras's decoupled weight decay (None or 0: off), and Keras's attributes for the
    hyperparameters (each subclass declares its own as ``_Hyperparameter()``)."""

    #: The learning rate now (a schedule's value at this iteration); assignable.
    learning_rate = _Hyperparameter()
    #: Decoupled weight decay (None: off); assignable.
    weight_decay = _Hyperparameter()
    # Keras's arguments without an implementation here (every class's constructor takes
    # them, keyword-only): Keras's default (off), and any other value refused.
    clipnorm = _Unsupported("clip each g in opt.grads to norm clipnorm with NumPy before step() "
                            "(opt.clip_grad_norm_ clips their global norm)")
    clipvalue = _Unsupported("np.clip(g, -clipvalue, clipvalue, out=g) for each g in opt.grads")
    global_clipnorm = _Unsupported("opt.clip_grad_norm_(global_clipnorm) before step()")
    use_ema = _Unsupported(_EMA_INSTEAD, False)
    ema_momentum = _Unsupported(_EMA_INSTEAD, 0.99)
    ema_overwrite_frequency = _Unsupported(_EMA_INSTEAD)
    loss_scale_factor = _Unsupported("step(grad_scale=1/loss_scale_factor) with the scaled gradients")
    gradient_accumulation_steps = _Unsupported(
        "add n batches' gradients into opt.grads, then step(grad_scale=1/n)")

    def __init__(self, params: Params, defaults: Mapping[str, Any], *,
                 n_threads: int | None = None, dtype: npt.DTypeLike | None = None,
                 adopt: bool = False, master_dtype: npt.DTypeLike | None = None,
                 unsupported: Mapping[str, Any]) -> None:
        for name, value in unsupported.items():
            if name not in KerasUnsupported.__annotations__:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
            getattr(_KerasOptimizer, name).check(value, f"{type(self).__name__} {name}")
        self._lrs: list[Any] | None = None
        super().__init__(params, defaults, n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype)

    @property
    def iterations(self) -> int:
        """Steps taken so far (Keras's ``optimizer.iterations``)."""
        step: int = self.state["step"]
        return step

    def _get_hyperparameter(self, name: str) -> Any:
        values = [group[name] for group in self.param_groups]
        first = values[0]
        for value in values[1:]:
            try:  # 0 == 0.0 == np.float64(0.0); a flag only equals a flag
                same = value is first or (isinstance(value, (bool, np.bool_)) == isinstance(first, (bool, np.bool_))
                                          and bool(value == first))
            except (TypeError, ValueError):
                same = False
            if not same:
                raise AttributeError(
                    f"{type(self).__name__}.{name}: the parameter groups hold different values "
                    f"({', '.join(repr(v) for v in values)[:120]}); read param_groups[i][{name!r}]")
        if name == "learning_rate" and _is_callable_rate(first):
            return self._rate_now(0, first)
        return first

    def _set_hyperparameter(self, name: str, value: Any) -> None:
        if (name == "learning_rate" and not _is_callable_rate(value)
                and any(_is_schedule(group[name]) for group in self.param_groups)):
            raise TypeError(  # Keras's rule, word for word in substance
                f"{type(self).__name__}.learning_rate: this optimizer's learning rate is a "
                "LearningRateSchedule, so it is not settable to a number (as in Keras); assign "
                "another schedule, or set param_groups[i]['learning_rate']")
        for gi, group in enumerate(self.param_groups):  # every group checked, then written
            self._check_group({**group, name: value}, f"param_groups[{gi}]")
        for group in self.param_groups:
            group[name] = value

    def _rate_now(self, gi: int, lr: Callable[..., Any]) -> float:
        """Callable learning rate ``lr`` of group ``gi`` evaluated now, as Keras does, and checked."""
        if _is_schedule(lr):
            value = lr(self.state["step"])
        else:
            try:
                value = lr()
            except TypeError:  # set in param_groups unchecked: say so if it needs arguments
                _check_learning_rate(lr, f"param_groups[{gi}]")
                raise
        if not isinstance(value, numbers.Real):  # a framework's 0-d tensor, say
            try:  # (a string has no __float__: float("0.1") is not a number)
                value = float(value.__float__())
            except (AttributeError, TypeError, ValueError):
                raise TypeError(f"param_groups[{gi}] learning_rate schedule must return a "
                                f"number, got {describe(value)}") from None
        name = "learning_rate (schedule value)"
        rate = check_real(value, f"param_groups[{gi}] {name}", low=0.0)
        check_fits({name: rate}, self.layout.dtype, f"param_groups[{gi}]")
        return rate

    def _check(self, group: dict[str, Any], where: str | None = None) -> None:
        where = where or type(self).__name__
        _check_learning_rate(group["learning_rate"], where)
        _check_weight_decay(group["weight_decay"], where)
        self._check_own(group, where)

    def _check_own(self, group: dict[str, Any], where: str) -> None:
        raise NotImplementedError

    def step(self, grads: Grads | None = None, *, grad_scale: float = 1.0,
             skip_if_nonfinite: bool = False) -> bool:
        """One step (Keras's ``optimizer.apply(grads)``); see :meth:`flatopt.Optimizer.step`.

        Once the arguments and hyperparameters passed their checks, each group's callable
        learning rate is called, group by group, and its value checked, before anything
        is written. A step refused by those first checks calls none. One refused for a
        later group's value has already called the earlier groups', and a step skipped by
        ``skip_if_nonfinite`` has called every group's: a schedule (called with the
        iteration count, which does not advance) gives the same values at the next step;
        a stateful callable's values are used up.
        """
        return super().step(grads, grad_scale=grad_scale, skip_if_nonfinite=skip_if_nonfinite)

    def _begin_step(self, grad_scale: float, skip_if_nonfinite: bool) -> float:
        grad_scale = super()._begin_step(grad_scale, skip_if_nonfinite)
        self._lrs = [self._rate_now(gi, lr) if _is_callable_rate(lr := group["learning_rate"]) else lr
                     for gi, group in enumerate(self.param_groups)]
        return grad_scale

    def _lr_wd(self, gi: int, group: dict[str, Any]) -> tuple[float, float]:
        lr = self._lrs[gi] if self._lrs is not None else group["learning_rate"]
        wd = group["weight_decay"]
        return lr, 0.0 if wd is None else wd


class SGD(_KerasOptimizer):
    """keras.optimizers.SGD: ``m = momentum*m - learning_rate*g; p += m`` (Nesterov:
    ``p += momentum*m - learning_rate*g``), ``m`` starting at zero; without momentum
    ``p -= learning_rate*g``."""

    momentum = _Hyperparameter()
    nesterov = _Hyperparameter()

    _hyperparameters: tuple[str, ...] = ("learning_rate", "momentum", "nesterov", "weight_decay")
    _all_state_names: tuple[str, ...] = ("momentum",)

    def __init__(self, params: Params, learning_rate: LearningRate = 0.01, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float | None = None, *,
                 n_threads: int | None = None, dtype: npt.DTypeLike | None = None,
                 adopt: bool = False, master_dtype: npt.DTypeLike | None = None,
                 **unsupported: Unpack[KerasUnsupported]) -> None:
        super().__init__(params, dict(learning_rate=learning_rate, momentum=momentum,
                                      nesterov=nesterov, weight_decay=weight_decay),
                         n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype, unsupported=unsupported)

    def _check_own(self, group: dict[str, Any], where: str) -> None:
        _check_unit(group, "momentum", where)
        check_bool(group["nesterov"], f"{where} nesterov")

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum",) if group["momentum"] != 0 else ()

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        lr, wd = self._lr_wd(gi, group)
        param = seg["param"]
        mom = group["momentum"]
        kernels.keras_sgd(param, grad, seg["momentum"] if mom != 0 else param[:0], lr, mom,
                          group["nesterov"], wd, grad_scale, n_threads)


class Adam(_KerasOptimizer):
    """keras.optimizers.Adam: ``m += (g-m)*(1-beta_1)``, ``v += (g*g-v)*(1-beta_2)``,
    ``p -= m*alpha/(sqrt(v) + epsilon)`` with ``alpha = lr*sqrt(1-beta_2**t)/(1-beta_1**t)``
    (epsilon is not bias-corrected; default 1e-7). ``amsgrad`` uses the running maximum
    of ``v`` (state ``velocity_hat``)."""

    beta_1 = _Hyperparameter()
    beta_2 = _Hyperparameter()
    epsilon = _Hyperparameter()
    amsgrad = _Hyperparameter()

    _hyperparameters: tuple[str, ...] = ("learning_rate", "beta_1", "beta_2", "epsilon", "amsgrad", "weight_decay")
    _all_state_names: tuple[str, ...] = ("momentum", "velocity", "velocity_hat")

    def __init__(self, params: Params, learning_rate: LearningRate = 0.001, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, amsgrad: bool = False,
                 weight_decay: float | None = None, *, n_threads: int | None = None,
                 dtype: npt.DTypeLike | None = None, adopt: bool = False,
                 master_dtype: npt.DTypeLike | None = None,
                 **unsupported: Unpack[KerasUnsupported]) -> None:
        super().__init__(params, dict(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                                      epsilon=epsilon, amsgrad=amsgrad,
                                      weight_decay=weight_decay),
                         n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype, unsupported=unsupported)

    def _check_own(self, group: dict[str, Any], where: str) -> None:
        _check_betas(group, where)
        _check_epsilon(group, where)
        check_bool(group["amsgrad"], f"{where} amsgrad")

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum", "velocity") + (("velocity_hat",) if group["amsgrad"] else ())

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        lr, wd = self._lr_wd(gi, group)
        param = seg["param"]
        amsgrad = group["amsgrad"]
        kernels.keras_adam(param, grad, seg["momentum"], seg["velocity"],
                           seg["velocity_hat"] if amsgrad else param[:0], step, lr,
                           group["beta_1"], group["beta_2"], group["epsilon"], amsgrad, wd,
                           grad_scale, n_threads)


class AdamW(Adam):
    """keras.optimizers.AdamW: :class:`Adam` with ``weight_decay=0.004`` by default (Keras's
    weight decay is decoupled for every optimizer; AdamW only changes the default)."""

    def __init__(self, params: Params, learning_rate: LearningRate = 0.001,
                 weight_decay: float = 0.004, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, amsgrad: bool = False, *, n_threads: int | None = None,
                 dtype: npt.DTypeLike | None = None, adopt: bool = False,
                 master_dtype: npt.DTypeLike | None = None,
                 **unsupported: Unpack[KerasUnsupported]) -> None:
        super().__init__(params, learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay,
                         n_threads=n_threads, dtype=dtype, adopt=adopt, master_dtype=master_dtype, **unsupported)

    def _check_own(self, group: dict[str, Any], where: str) -> None:
        super()._check_own(group, where)
        if group["weight_decay"] is None:
            raise ValueError(f"{where} weight_decay: AdamW requires a weight_decay, got None")


class RMSprop(_KerasOptimizer):
    """keras.optimizers.RMSprop: ``v = rho*v + (1-rho)*g*g``; the step is
    ``lr*g/sqrt(v + epsilon)`` (epsilon inside the root; centered: ``sqrt(v - a*a + eps)``
    with ``a`` the running mean of ``g``); with momentum ``b = momentum*b + step; p -= b``."""

    rho = _Hyperparameter()
    momentum = _Hyperparameter()
    epsilon = _Hyperparameter()
    centered = _Hyperparameter()

    _hyperparameters: tuple[str, ...] = ("learning_rate", "rho", "momentum", "epsilon", "centered", "weight_decay")
    _all_state_names: tuple[str, ...] = ("velocity", "momentum", "average_gradient")

    def __init__(self, params: Params, learning_rate: LearningRate = 0.001, rho: float = 0.9,
                 momentum: float = 0.0, epsilon: float = 1e-7, centered: bool = False,
                 weight_decay: float | None = None, *, n_threads: int | None = None,
                 dtype: npt.DTypeLike | None = None, adopt: bool = False,
                 master_dtype: npt.DTypeLike | None = None,
                 **unsupported: Unpack[KerasUnsupported]) -> None:
        super().__init__(params, dict(learning_rate=learning_rate, rho=rho, momentum=momentum,
                                      epsilon=epsilon, centered=centered,
                                      weight_decay=weight_decay),
                         n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype, unsupported=unsupported)

    def _check_own(self, group: dict[str, Any], where: str) -> None:
        _check_unit(group, "rho", where)
        check_real(group["momentum"], f"{where} momentum", low=0.0)
        _check_epsilon(group, where)
        check_bool(group["centered"], f"{where} centered")

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return (("velocity",) + (("momentum",) if group["momentum"] > 0 else ())
                + (("average_gradient",) if group["centered"] else ()))

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        lr, wd = self._lr_wd(gi, group)
        param = seg["param"]
        centered, momentum = group["centered"], group["momentum"]
        kernels.keras_rmsprop(param, grad, seg["velocity"],
                              seg["average_gradient"] if centered else param[:0],
                              seg["momentum"] if momentum > 0 else param[:0], lr, group["rho"],
                              momentum, group["epsilon"], centered, wd, grad_scale, n_threads)


class Adadelta(_KerasOptimizer):
    """keras.optimizers.Adadelta (default learning_rate 0.001, rho 0.95, epsilon 1e-7):
    the same formula as torch.optim.Adadelta (whose kernel it uses), with Keras's defaults
    and decoupled weight decay."""

    rho = _Hyperparameter()
    epsilon = _Hyperparameter()

    _hyperparameters: tuple[str, ...] = ("learning_rate", "rho", "epsilon", "weight_decay")
    _all_state_names: tuple[str, ...] = ("accumulated_grad", "accumulated_delta_var")

    def __init__(self, params: Params, learning_rate: LearningRate = 0.001, rho: float = 0.95,
                 epsilon: float = 1e-7, weight_decay: float | None = None, *,
                 n_threads: int | None = None, dtype: npt.DTypeLike | None = None,
                 adopt: bool = False, master_dtype: npt.DTypeLike | None = None,
                 **unsupported: Unpack[KerasUnsupported]) -> None:
        super().__init__(params, dict(learning_rate=learning_rate, rho=rho, epsilon=epsilon,
                                      weight_decay=weight_decay),
                         n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype, unsupported=unsupported)

    def _check_own(self, group: dict[str, Any], where: str) -> None:
        _check_unit(group, "rho", where)
        _check_epsilon(group, where)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("accumulated_grad", "accumulated_delta_var")

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        lr, wd = self._lr_wd(gi, group)
        param = seg["param"]
        if wd != 0:
            kernels.keras_weight_decay(param, lr, wd, n_threads)
        kernels.adadelta(param, grad, seg["accumulated_grad"], seg["accumulated_delta_var"], lr,
                         group["rho"], group["epsilon"], 0.0, False, grad_scale, n_threads)


class Adagrad(_KerasOptimizer):
    """keras.optimizers.Adagrad: ``acc += g*g; p -= lr*g/sqrt(acc + epsilon)`` (epsilon
    inside the root), ``acc`` starting at ``initial_accumulator_value`` (default 0.1); a
    change of that value before the first step refills it then (and in ``state_dict()``),
    as Keras builds the accumulator at its first step: the refill overrides an
    accumulator set by hand before it."""

    initial_accumulator_value = _Hyperparameter()
    epsilon = _Hyperparameter()

    _hyperparameters: tuple[str, ...] = ("learning_rate", "initial_accumulator_value", "epsilon", "weight_decay")
    _all_state_names: tuple[str, ...] = ("accumulator",)
    _filled_with: list[Any]  # each group's initial_accumulator_value when its part was filled

    def __init__(self, params: Params, learning_rate: LearningRate = 0.001,
                 initial_accumulator_value: float = 0.1, epsilon: float = 1e-7,
                 weight_decay: float | None = None, *, n_threads: int | None = None,
                 dtype: npt.DTypeLike | None = None, adopt: bool = False,
                 master_dtype: npt.DTypeLike | None = None,
                 **unsupported: Unpack[KerasUnsupported]) -> None:
        super().__init__(params, dict(learning_rate=learning_rate,
                                      initial_accumulator_value=initial_accumulator_value,
                                      epsilon=epsilon, weight_decay=weight_decay),
                         n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype, unsupported=unsupported)

    def _check_own(self, group: dict[str, Any], where: str) -> None:
        check_real(group["initial_accumulator_value"], f"{where} initial_accumulator_value", low=0.0)
        _check_epsilon(group, where)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("accumulator",)

    def _init_state(self, name: str, buffer: FloatArray) -> None:
        for (start, stop), group in zip(self._segments, self.param_groups):
            buffer[start:stop] = group["initial_accumulator_value"]
        self._filled_with = [group["initial_accumulator_value"] for group in self.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """See :meth:`flatopt.Optimizer.state_dict`; before the first step, an
        ``initial_accumulator_value`` changed since construction fills the accumulator
        first (over one set by hand), so that the snapshot holds what the first step
        would use. A group whose hyperparameters fail their checks is not refilled."""
        if self.state["step"] == 0:
            for gi, group in enumerate(self.param_groups):
                try:  # the checks step() makes: a value that overflows the dtype is not written
                    self._check_group(group, f"param_groups[{gi}]")
                except (KeyError, TypeError, ValueError):  # a malformed group: step() will say so
                    continue
                self._refill(gi, group["initial_accumulator_value"])
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._filled_with = [group["initial_accumulator_value"] for group in self.param_groups]

    def _refill(self, gi: int, value: float) -> None:
        """Fill group ``gi``'s accumulator with ``value`` if it was filled with another
        (Keras builds the accumulator at the first step, from the value then)."""
        filled = self.__dict__.setdefault(  # (pickles made before it existed lack it)
            "_filled_with", [group["initial_accumulator_value"] for group in self.param_groups])
        if value != filled[gi]:
            start, stop = self._segments[gi]
            self.state["accumulator"][start:stop] = value
            filled[gi] = value

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        lr, wd = self._lr_wd(gi, group)
        if step == 1:
            self._refill(gi, group["initial_accumulator_value"])
        kernels.keras_adagrad(seg["param"], grad, seg["accumulator"], lr, group["epsilon"], wd,
                              grad_scale, n_threads)


class Adamax(_KerasOptimizer):
    """keras.optimizers.Adamax: ``m += (g-m)*(1-beta_1)``, ``u = max(beta_2*u, |g|)``,
    ``p -= lr*m / ((1-beta_1**t)*(u + epsilon))`` (torch adds eps inside the max)."""

    beta_1 = _Hyperparameter()
    beta_2 = _Hyperparameter()
    epsilon = _Hyperparameter()

    _hyperparameters: tuple[str, ...] = ("learning_rate", "beta_1", "beta_2", "epsilon", "weight_decay")
    _all_state_names: tuple[str, ...] = ("m", "u")

    def __init__(self, params: Params, learning_rate: LearningRate = 0.001, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, weight_decay: float | None = None,
                 *, n_threads: int | None = None, dtype: npt.DTypeLike | None = None,
                 adopt: bool = False, master_dtype: npt.DTypeLike | None = None,
                 **unsupported: Unpack[KerasUnsupported]) -> None:
        super().__init__(params, dict(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                                      epsilon=epsilon, weight_decay=weight_decay),
                         n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype, unsupported=unsupported)

    def _check_own(self, group: dict[str, Any], where: str) -> None:
        _check_betas(group, where)
        _check_epsilon(group, where)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("m", "u")

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        lr, wd = self._lr_wd(gi, group)
        kernels.keras_adamax(seg["param"], grad, seg["m"], seg["u"], step, lr, group["beta_1"],
                             group["beta_2"], group["epsilon"], wd, grad_scale, n_threads)


class Nadam(_KerasOptimizer):
    """keras.optimizers.Nadam: the momentum schedule ``u_t = beta_1*(1 - 0.5*0.96**t)``
    (torch.optim.NAdam: ``0.96**(t*momentum_decay)``, 0.004 by default) and its running
    product (``state["u_product"]``, one per group, in the buffers' dtype, as Keras keeps
    one in the variables' dtype); ``p -= m_hat*lr/(sqrt(v/(1-beta_2**t)) + epsilon)``."""

    beta_1 = _Hyperparameter()
    beta_2 = _Hyperparameter()
    epsilon = _Hyperparameter()

    _hyperparameters: tuple[str, ...] = ("learning_rate", "beta_1", "beta_2", "epsilon", "weight_decay")
    _all_state_names: tuple[str, ...] = ("momentum", "velocity")
    _plain_state: tuple[str, ...] = ("u_product",)

    def __init__(self, params: Params, learning_rate: LearningRate = 0.001, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, weight_decay: float | None = None,
                 *, n_threads: int | None = None, dtype: npt.DTypeLike | None = None,
                 adopt: bool = False, master_dtype: npt.DTypeLike | None = None,
                 **unsupported: Unpack[KerasUnsupported]) -> None:
        super().__init__(params, dict(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                                      epsilon=epsilon, weight_decay=weight_decay),
                         n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype, unsupported=unsupported)
        self.state["u_product"] = [1.0] * len(self.param_groups)

    def _check_own(self, group: dict[str, Any], where: str) -> None:
        _check_betas(group, where)
        _check_epsilon(group, where)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum", "velocity")

    # The momentum product is checked as torch-formula NAdam's mu_product is.
    _check_plain_state = _adam_variants.NAdam._check_plain_state

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        lr, wd = self._lr_wd(gi, group)
        products = self.state["u_product"]
        products[gi] = kernels.keras_nadam(
            seg["param"], grad, seg["momentum"], seg["velocity"], step, products[gi], lr,
            group["beta_1"], group["beta_2"], group["epsilon"], wd, grad_scale, n_threads)


class Lion(_KerasOptimizer):
    """keras.optimizers.Lion (default learning_rate 0.001, beta_2 0.99): the formula of
    :class:`flatopt.Lion` (whose kernel it uses), ``p -= lr*sign(beta_1*m + (1-beta_1)*g)``,
    ``m = beta_2*m + (1-beta_2)*g``, with Keras's weight decay. Keras casts beta_1 and
    beta_2 to the variables' dtype before ``1 - beta``; so does this class."""

    beta_1 = _Hyperparameter()
    beta_2 = _Hyperparameter()

    _hyperparameters: tuple[str, ...] = ("learning_rate", "beta_1", "beta_2", "weight_decay")
    _all_state_names: tuple[str, ...] = ("momentum",)

    def __init__(self, params: Params, learning_rate: LearningRate = 0.001, beta_1: float = 0.9,
                 beta_2: float = 0.99, weight_decay: float | None = None, *,
                 n_threads: int | None = None, dtype: npt.DTypeLike | None = None,
                 adopt: bool = False, master_dtype: npt.DTypeLike | None = None,
                 **unsupported: Unpack[KerasUnsupported]) -> None:
        super().__init__(params, dict(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                                      weight_decay=weight_decay),
                         n_threads=n_threads, dtype=dtype, adopt=adopt,
                         master_dtype=master_dtype, unsupported=unsupported)

    def _check_own(self, group: dict[str, Any], where: str) -> None:
        # Keras's range for beta_1: (0, 1] (0 would be SignSGD, 1 is the momentum alone).
        check_real(group["beta_1"], f"{where} beta_1", low=0.0, high=1.0, low_open=True)
        _check_unit(group, "beta_2", where)  # Keras checks none; 1 keeps the momentum at 0

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum",)

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        lr, wd = self._lr_wd(gi, group)
        dt = self.layout.dtype.type
        kernels.lion(seg["param"], grad, seg["momentum"], lr, float(dt(group["beta_1"])),
                     float(dt(group["beta_2"])), wd, False, grad_scale, n_threads)


__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adadelta", "Adagrad", "Adamax", "Nadam", "Lion",
           "LearningRateSchedule"]

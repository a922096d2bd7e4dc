"""The public classes: torch.optim's optimizers (and Momentum) over flat buffers.

Each is a few lines: its NumPy twin, torch's constructor signature written out (so that
``inspect.signature`` and ``help()`` show it), and which per-parameter state torch keeps.
The update formulas are the NumPy twin's kernel; everything else is ``_FlatOptimizer``.
"""

from .. import _adaptive, _momentum
from ._base import _FlatOptimizer

_SEE = """See :class:`flatopt.{0}` for the update and :mod:`flatopt.torch` for how parameters,
    gradients and checkpoints are handled, and for the remaining differences from torch.optim."""


class SGD(_FlatOptimizer):
    __doc__ = f"""torch.optim.SGD on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads``. {_SEE.format("SGD")}
    """
    _numpy_class = _momentum.SGD

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, n_threads=None):
        super().__init__(params, dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
            fused=fused), n_threads=n_threads)

    def _uses_state(self, group):
        return group["momentum"] != 0  # torch keeps no state for plain SGD


class Momentum(_FlatOptimizer):
    __doc__ = f"""Textbook momentum on flat buffers (no torch.optim twin):
    ``v = beta*v + (1-beta)*g; p -= lr*v``. Its state dict uses torch.optim's layout, with
    a per-parameter ``momentum_buffer``. {_SEE.format("Momentum")}
    """
    _numpy_class = _momentum.Momentum

    def __init__(self, params, lr, beta=0.9, weight_decay=0.0, maximize=False, *, n_threads=None):
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize),
                         n_threads=n_threads)


class Adam(_FlatOptimizer):
    __doc__ = f"""torch.optim.Adam on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads``. {_SEE.format("Adam")}
    """
    _numpy_class = _adaptive.Adam
    _torch_step = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, n_threads=None):
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay), n_threads=n_threads)


class AdamW(_FlatOptimizer):
    __doc__ = f"""torch.optim.AdamW on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads``. {_SEE.format("AdamW")}
    """
    _numpy_class = _adaptive.AdamW
    _torch_step = True
    _fixed = {"decoupled_weight_decay": True}  # in every group, as torch's AdamW sets it

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 n_threads=None):
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused),
            n_threads=n_threads)


class RMSprop(_FlatOptimizer):
    __doc__ = f"""torch.optim.RMSprop on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads``. {_SEE.format("RMSprop")}
    """
    _numpy_class = _adaptive.RMSprop
    _torch_step = True

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, *, n_threads=None):
        super().__init__(params, dict(
            lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
            capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable),
            n_threads=n_threads)


class Adadelta(_FlatOptimizer):
    __doc__ = f"""torch.optim.Adadelta on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads``. {_SEE.format("Adadelta")}
    """
    _numpy_class = _adaptive.Adadelta
    _torch_step = True

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *,
                 capturable=False, maximize=False, differentiable=False, n_threads=None):
        super().__init__(params, dict(
            lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize, capturable=capturable,
            foreach=foreach, differentiable=differentiable), n_threads=n_threads)


class Adagrad(_FlatOptimizer):
    __doc__ = f"""torch.optim.Adagrad on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads``. As in torch, every parameter's ``sum`` starts at the
    constructor's ``initial_accumulator_value`` (a group's own value is kept in the group but
    not used), including parameters added later by ``add_param_group`` (torch gives those no
    state and fails at their first step). {_SEE.format("Adagrad")}
    """
    _numpy_class = _adaptive.Adagrad
    _torch_step = True
    _eager_state = True  # torch creates Adagrad's state in the constructor

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None, n_threads=None):
        super().__init__(params, dict(
            lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
            differentiable=differentiable, fused=fused), n_threads=n_threads)

    def _fresh_state(self, bucket, name):
        buf = super()._fresh_state(bucket, name)
        if name == "sum":
            buf.fill(self.defaults["initial_accumulator_value"])
        return buf


__all__ = ["SGD", "Momentum", "Adam", "AdamW", "RMSprop", "Adadelta", "Adagrad"]


# -- transitional: classes made by a function ------------------------------------------------------
def _doc(name):
    return f"""torch.optim.{name} on flat buffers: same arguments, results and state dict, plus
    keyword-only ``n_threads``. {_SEE.format(name)}
    """


def _wrap(numpy_class, doc, fixed=None, **attributes):
    """Make a drop-in class for ``numpy_class`` with the signature of the torch.optim class
    of the same name (or the NumPy class's) plus keyword-only ``n_threads``.

    Transitional, for optimizers declared this way before the classes were written out;
    prefer writing the class out as above (its signature then shows in ``help()`` and in
    the source). ``attributes`` may set ``_torch_step``, ``_eager_state``,
    ``_uses_state``, ``_before_update``, ``_param_state``, ``load_state_dict``, ...
    """
    import inspect

    import torch

    name = numpy_class.__name__
    torch_class = getattr(torch.optim, name, None)
    source = inspect.signature((torch_class or numpy_class).__init__)
    parameters = [p for p in source.parameters.values() if p.name not in ("dtype", "n_threads", "adopt")]
    parameters.append(inspect.Parameter("n_threads", inspect.Parameter.KEYWORD_ONLY, default=None))
    signature = source.replace(parameters=parameters)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        params = arguments.pop("params")
        n_threads = arguments.pop("n_threads")
        _FlatOptimizer.__init__(self, params, arguments, n_threads=n_threads)

    __init__.__signature__ = signature
    __init__.__doc__ = doc
    return type(name, (_FlatOptimizer,), {
        "__init__": __init__, "__doc__": doc, "__module__": "flatopt.torch",
        "_numpy_class": numpy_class, "_fixed": dict(fixed or {}), **attributes,
    })

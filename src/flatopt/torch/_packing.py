"""Packing: parameters rebound to views of flat buffers, gradients attached as views.

A :class:`Bucket` holds the parameters of one dtype: a NumPy optimizer that owns one flat
buffer per role (params, grads, state), torch views of those buffers, and per-parameter
step counts. :func:`make_buckets` builds them without touching a parameter;
:func:`bind` then rebinds ``p.data``, attaches gradients and installs the hooks. The
step-time half (:func:`gather`, :func:`copy_in`) makes the flat gradient buffer hold
exactly the parameters' gradients.
"""

import inspect
import operator
import weakref

import numpy as np
import torch

try:
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # torch < 2.1
    def _get_scalar_dtype(is_fused=None):
        if is_fused:
            return torch.float32
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32

TORCH_DTYPES = (torch.float32, torch.float64)
_GRAD_OF = operator.attrgetter("grad")


def as_python(value):
    """A hyperparameter as the NumPy layer takes it: 1-element tensors become floats."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"tensor hyperparameters must have one element, got shape {tuple(value.shape)}")
        return value.item()
    if isinstance(value, (tuple, list)):
        return type(value)(as_python(v) for v in value)
    return value


class AttachGrad:
    """Gradient hook: give a parameter whose ``grad`` is None its flat-buffer view back,
    zeroed, just before autograd accumulates into it."""

    __slots__ = ("param", "view", "dirty", "sparse", "index")

    def __init__(self, param, view, dirty, sparse, index):
        self.param = weakref.ref(param)
        self.view = view
        self.dirty = dirty
        self.sparse = sparse
        self.index = index

    def __call__(self, grad):
        if grad.layout != torch.strided:
            # Leave sparse gradients alone (a dense view would silently absorb them);
            # step() rejects them.
            self.sparse[self.index] = True
            return
        p = self.param()
        if p is not None and p.grad is None:
            if self.dirty[self.index]:
                self.view.zero_()
            self.dirty[self.index] = True
            p.grad = self.view


class Bucket:
    """The parameters of one dtype and the NumPy optimizer that owns their buffers."""

    def __init__(self, numpy_opt, params, group_map):
        self.opt = numpy_opt
        self.params = params                  # torch parameters, in flat order
        self.group_map = group_map            # NumPy group index -> torch group index
        layout = numpy_opt.layout
        self.shapes = layout.shapes
        self.starts = np.asarray(layout.offsets, dtype=np.int64)
        self.stops = self.starts + np.asarray([int(np.prod(s)) for s in layout.shapes], dtype=np.int64)
        self.ranges = []                      # NumPy group index -> (first, stop) param index
        first = 0
        for group in numpy_opt.param_groups:
            self.ranges.append((first, first + len(group["params"])))
            first += len(group["params"])
        self.group_of = np.repeat(np.arange(len(self.ranges)), [b - a for a, b in self.ranges])
        self.flat_param = torch.from_numpy(numpy_opt.flat_params)
        self.flat_grad = torch.from_numpy(numpy_opt.flat_grads)
        self.grad_views = [self.flat_grad[a:b].view(s) for a, b, s in zip(self.starts, self.stops, self.shapes)]
        self.param_views = [self.flat_param[a:b].view(s) for a, b, s in zip(self.starts, self.stops, self.shapes)]
        # Updates each parameter has received that used its state: torch's state["step"].
        # One tensor; each parameter's state["step"] is a 0-d view of it, and ``counts``
        # is the same memory as a NumPy array for run planning.
        self.steps = torch.zeros(len(params), dtype=_get_scalar_dtype())
        self.counts = self.steps.numpy()
        # dirty[i]: grad view i may hold values since the flat buffer was last zeroed.
        self.dirty = np.zeros(len(params), dtype=bool)
        # sparse[i]: a sparse gradient reached parameter i since the last zero_grad().
        self.sparse = np.zeros(len(params), dtype=bool)
        self.data_ptrs = []
        self.hooks = {}
        self.all_taking_part = np.ones(len(params), dtype=bool)  # read-only by convention
        self.index = {p: i for i, p in enumerate(params)}
        # Element bounds of each NumPy group, and whether every group's parameters share
        # one step count (then a step is one run per group; see _runs.plan_runs).
        self.group_bounds = [tuple(int(x) for x in s) for s in numpy_opt._segments]
        self.uniform = False
        self.synced = None      # the torch groups' hyperparameter objects last copied
        self.n_state = None     # how many state entries opt.state's entries were made for

    def state_view(self, name, i):
        a, b = self.starts[i], self.stops[i]
        return torch.from_numpy(self.opt.state[name][a:b]).view(self.shapes[i])

    def remove_hooks(self):
        for handle in self.hooks.values():
            handle.remove()
        self.hooks.clear()


def check_param(p, where, name):
    """Raise if ``p`` cannot live in a flat buffer (device, layout, dtype, sparse grad)."""
    if p.device.type != "cpu":
        raise ValueError(f"{where} is on device {p.device}; flatopt.torch runs on the CPU only")
    if p.layout != torch.strided:
        raise ValueError(f"{where} has layout {p.layout}; only dense (strided) tensors are supported")
    if p.dtype not in TORCH_DTYPES:
        raise TypeError(f"{where} has dtype {p.dtype}; flatopt.torch supports float32 and float64")
    if p.grad is not None and p.grad.layout != torch.strided:
        raise RuntimeError(f"{where}: {name} does not support sparse gradients")


def make_buckets(opt):
    """One :class:`Bucket` per dtype for ``opt.param_groups``: validated and allocated,
    with every parameter's values copied in, but no parameter rebound yet."""
    name = type(opt).__name__
    numpy_class = opt._numpy_class
    by_dtype, seen = {}, set()
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            check_param(p, f"{name}: param_groups[{gi}]['params'][{pi}]", name)
            if p in seen:  # listed twice in its group (torch warns): packed once
                continue
            seen.add(p)
            by_dtype.setdefault(p.dtype, {}).setdefault(gi, []).append(p)
    accepted = inspect.signature(numpy_class).parameters
    buckets = []
    for groups in by_dtype.values():
        numpy_groups = [{"params": [p.detach().numpy() for p in ps],
                         **opt._hyperparameters(opt.param_groups[gi])} for gi, ps in groups.items()]
        defaults = {k: v for k, v in opt._hyperparameters(opt.defaults).items() if k in accepted}
        numpy_opt = numpy_class(numpy_groups, n_threads=opt._n_threads, **defaults)
        buckets.append(Bucket(numpy_opt, [p for ps in groups.values() for p in ps], list(groups)))
    return buckets


def bind(bucket):
    """Rebind every parameter of ``bucket`` to its flat-buffer view, carry its gradient
    into the flat gradient buffer, and install the gradient hooks."""
    with torch.no_grad():
        for i, p in enumerate(bucket.params):
            grad = p.grad
            p.data = bucket.param_views[i]
            if grad is not None:
                bucket.grad_views[i].copy_(grad.detach())
                bucket.dirty[i] = True
                p.grad = bucket.grad_views[i]
            bucket.data_ptrs.append(p.data_ptr())
            attach_hook(bucket, i)


def attach_hook(bucket, i):
    p = bucket.params[i]
    if p.requires_grad and i not in bucket.hooks:
        bucket.hooks[i] = p.register_hook(AttachGrad(p, bucket.grad_views[i], bucket.dirty, bucket.sparse, i))


def gather(bucket, name):
    """Which parameters take part in this step, validated; non-view grads to copy in."""
    if bucket.sparse.any():
        raise RuntimeError(f"{name} does not support sparse gradients")
    # The usual case, checked with C-level loops: every parameter still views the flat
    # buffer and every grad is its flat-buffer view.
    if (list(map(torch.Tensor.data_ptr, bucket.params)) == bucket.data_ptrs
            and all(map(operator.is_, map(_GRAD_OF, bucket.params), bucket.grad_views))):
        return bucket.all_taking_part, []
    taking_part = np.empty(len(bucket.params), dtype=bool)
    copies = []
    for i, (p, view, ptr) in enumerate(zip(bucket.params, bucket.grad_views, bucket.data_ptrs)):
        if p.data_ptr() != ptr:
            raise RuntimeError(
                f"{name}: a parameter of shape {tuple(p.shape)} no longer views the optimizer's flat "
                "buffer (was p.data replaced, e.g. by module.to()?); create the optimizer after "
                "such changes")
        grad = p.grad
        taking_part[i] = grad is not None
        if grad is None or grad is view:
            continue
        if grad.layout != torch.strided:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if grad.device.type != "cpu" or grad.shape != p.shape or torch.is_complex(grad):
            raise RuntimeError(
                f"{name}: a gradient of shape {tuple(grad.shape)} on {grad.device} ({grad.dtype}) "
                f"does not match its parameter ({tuple(p.shape)}, cpu, {p.dtype})")
        copies.append((i, grad))
    return taking_part, copies


def copy_in(bucket, taking_part, copies):
    """Make the flat gradient buffer hold exactly the parameters' gradients: copy in
    those that are not flat-buffer views (and re-attach the views), and zero the views of
    parameters whose grad is None (a None gradient counts as zero in norms and
    finiteness checks; it is skipped by the step either way)."""
    if taking_part is not bucket.all_taking_part and not taking_part.all():
        for i in np.flatnonzero(~taking_part & bucket.dirty):
            bucket.grad_views[i].zero_()
            bucket.dirty[i] = False
    for i, grad in copies:
        view = bucket.grad_views[i]
        view.copy_(grad.detach())  # detached: a create_graph grad must not enter the buffer's history
        bucket.dirty[i] = True
        bucket.params[i].grad = view
        attach_hook(bucket, i)

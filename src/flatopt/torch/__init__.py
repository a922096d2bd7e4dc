"""Drop-in ``torch.optim`` optimizers whose step is one flatopt kernel call.

``flatopt.torch.SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adadelta``, ``Adagrad`` and
``Momentum`` are :class:`torch.optim.Optimizer` subclasses with the constructor arguments
and defaults of the ``torch.optim`` class of the same name, plus a keyword-only
``n_threads`` (Momentum has no torch twin: it takes :class:`flatopt.Momentum`'s). They
are thin adapters over flatopt's NumPy optimizers (``flatopt.SGD``, ...): no update
formula lives here.

Example::

    import flatopt.torch
    opt = flatopt.torch.SGD(model.parameters(), lr=0.1, momentum=0.9)  # was torch.optim.SGD
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30)
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()   # accumulates into the flat gradient buffer
        opt.step()                        # one fused kernel call
        sched.step()
    torch.save(opt.state_dict(), "opt.pt")  # loads into torch.optim.SGD too

How it works
------------
At construction the parameters (CPU, float32 or float64) are copied into one flat,
64-byte-aligned buffer per dtype, owned by a NumPy optimizer, and each parameter is
rebound to a view of it (``p.data = view``). Gradients get a flat buffer of the same
layout: ``p.grad`` is (re)attached as a view of it, so autograd accumulates straight into
the flat buffer. ``step()`` runs the NumPy optimizer's fused kernel over zero-copy NumPy
views of those buffers: one kernel call per parameter group and dtype, whatever the
number of tensors. Parameters of other dtypes, on other devices, or with sparse
gradients are rejected with a clear error.

Gradients that are None
-----------------------
torch.optim skips a parameter whose ``grad`` is None: no update, no weight decay, no
state change, and its ``step`` count does not advance. flatopt.torch does the same,
exactly. The participating parameters are grouped into maximal runs of consecutive
parameters that share a group and a per-parameter step count, and the kernel runs once
per run. When every parameter has a gradient (the usual case) that is one call per
group; each parameter that is skipped costs at most two extra kernel calls (a split of
its run), never a copy.

``zero_grad(set_to_none=True)`` (torch's default) therefore really sets every ``p.grad``
to None, so that a parameter unused by the next backward pass is skipped, as in torch.
To keep autograd accumulating into the flat buffer, each trainable parameter carries a
gradient hook (``Tensor.register_hook``) that, when the parameter's ``grad`` is None,
re-attaches its zeroed flat-buffer view just before autograd accumulates into it. Its
cost is one Python call per parameter per backward pass (about 1.5 us). The flat buffer
is zeroed in one pass by ``zero_grad`` (either mode); a hook only zeroes a view itself
when the gradient was set to None elsewhere (for example by ``module.zero_grad()``).
``zero_grad(set_to_none=False)`` keeps the views attached and zeroes them.

If ``p.grad`` is replaced by a tensor that is not its flat-buffer view (assigned by the
user, or built by a ``create_graph=True`` backward, which accumulates out of place),
``step()`` copies it into the flat buffer and re-attaches the view: correct, at the cost
of one copy of that gradient. One side effect of the hooks: ``torch.autograd.grad`` also
fires them, so after it a parameter whose grad was None has a zero gradient (and is
updated with it) instead of None.

Checkpoints
-----------
``state_dict()`` returns torch.optim's own format for the optimizer of the same name:
``param_groups`` with the same keys (including ``foreach``, ``fused``, ...) and integer
parameter ids, and per-parameter ``state`` entries with torch's names (``momentum_buffer``
for SGD; ``step``, ``exp_avg``, ``exp_avg_sq`` and, with amsgrad, ``max_exp_avg_sq`` for
Adam; ...) that exist for exactly the parameters torch would have state for (all of them
from construction for Adagrad, as in torch). ``step`` is the per-parameter count, a scalar
tensor of torch's dtype. A checkpoint from ``torch.optim.Adam`` loads into
``flatopt.torch.Adam`` and the other way round, and training continues identically. The
tensors in a state dict are copies (a snapshot). ``opt.state`` is a dict built on each
access (assigning into it has no effect) whose tensors are live views of the flat state
buffers.

Results match torch.optim's to rounding: torch's CPU kernels may fuse a multiply and an
add where flatopt's never do, so float64 trajectories agree to about 1e-15 relative and
float32 ones drift apart slowly, as torch's own for-loop and fused paths do.

Differences from torch.optim
----------------------------
* Parameters are rebound to views of a flat buffer at construction: references to the
  old ``p.data`` go stale, and replacing ``p.data`` later (``module.to(dtype)``) is
  detected and rejected at the next ``step()``.
* ``add_param_group`` after construction is not supported (the buffers are packed once).
* State buffers span every parameter given, frozen ones included (torch allocates state
  only for parameters that received a gradient): pass only trainable parameters to save
  that memory.
* ``foreach`` and ``fused`` are accepted and kept in the parameter groups (so state dicts
  interchange) but have no effect: the step is always fused. ``differentiable`` and
  ``capturable`` must be False.
* In-place updates bypass autograd's version counter, as with any NumPy write.

Importing this module imports torch; ``import flatopt`` never does.
"""

import inspect
import math
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

from .. import _adaptive, _momentum
from .._dispatch import kernels
from .._norms import ClipGradNormMixin, check_norm_type
from .._threads import check_n_threads, effective_n_threads
from .._validation import check_bool, check_real

__all__ = ["SGD", "Momentum", "Adam", "AdamW", "RMSprop", "Adadelta", "Adagrad"]

_TORCH_DTYPES = (torch.float32, torch.float64)

# torch.optim arguments that select an implementation, not the update. foreach and fused
# are kept (they are part of torch's state dict) but ignored; the others must be False.
_IMPLEMENTATION_FLAGS = {"foreach": None, "fused": None, "differentiable": False, "capturable": False}


_GRAD_OF = operator.attrgetter("grad")


def _as_python(value):
    """A hyperparameter as the NumPy layer takes it: 1-element tensors become floats."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"tensor hyperparameters must have one element, got shape {tuple(value.shape)}")
        return value.item()
    if isinstance(value, (tuple, list)):
        return type(value)(_as_python(v) for v in value)
    return value


class _AttachGrad:
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


class _Bucket:
    """The parameters of one dtype: a NumPy optimizer owning one flat buffer per role
    (params, grads, state), and torch views of those buffers."""

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
        # Updates each parameter has received that used its state (torch's state["step"]).
        self.counts = np.zeros(len(params), dtype=np.int64)
        # dirty[i]: grad view i may hold values since the flat buffer was last zeroed.
        self.dirty = np.zeros(len(params), dtype=bool)
        # sparse[i]: a sparse gradient reached parameter i since the last zero_grad().
        self.sparse = np.zeros(len(params), dtype=bool)
        self.data_ptrs = []
        self.hooks = {}
        self.all_taking_part = np.ones(len(params), dtype=bool)  # read-only by convention

    def state_view(self, name, i):
        a, b = self.starts[i], self.stops[i]
        return torch.from_numpy(self.opt.state[name][a:b]).view(self.shapes[i])


class _FlatOptimizer(ClipGradNormMixin, torch.optim.Optimizer):
    """Base class of flatopt.torch's optimizers (see the module docstring).

    Subclasses are made by :func:`_wrap` and set ``_numpy_class`` (the flatopt optimizer
    that owns the buffers and runs the kernel), ``_torch_step`` (torch keeps a per-parameter
    ``step`` tensor), ``_eager_state`` (torch creates state at construction, not at the
    first step) and optionally override :meth:`_uses_state` and :meth:`_before_update`.
    """

    _numpy_class = None
    _torch_class = None
    _torch_step = False
    _eager_state = False
    _fixed = {}
    _unsupported_defaults = {}

    def __init__(self, params, defaults, *, n_threads=None):
        self._n_threads = check_n_threads(n_threads)
        self._buckets = []
        self.skipped_steps = 0            # steps skipped by step(skip_if_nonfinite=True)
        self.last_step_skipped = False
        self._pending_grad_scale = 1.0    # set by clip_grad_norm_, used by the next step
        self._constructing = True
        if isinstance(params, torch.Tensor):  # torch's own check, before list() iterates rows
            raise TypeError(f"params must be an iterable of Tensors or dicts, got {torch.typename(params)}")
        super().__init__(params, defaults)
        self._constructing = False
        self._build()

    # -- hooks for subclasses ----------------------------------------------------------
    def _uses_state(self, group):
        """Whether a step with these hyperparameters uses (and counts) per-parameter state."""
        return True

    def _before_update(self, numpy_opt, gi, group, count):
        """Prepare NumPy group ``gi`` for a run of parameters that have had ``count`` updates."""

    # -- construction --------------------------------------------------------------------
    @property
    def state(self):
        """Per-parameter state in torch.optim's layout: ``{param: {name: tensor}}``.

        Built on access: the buffers are live views of the flat state (writes go to the
        optimizer), ``step`` is a new scalar tensor.
        """
        state = {}
        for bucket in self._buckets:
            for i, p in enumerate(bucket.params):
                entry = self._param_state(bucket, i, copy=False)
                if entry is not None:
                    state[p] = entry
        return state

    @state.setter
    def state(self, value):
        # torch.optim.Optimizer.__init__ assigns an empty defaultdict; nothing else may.
        if not getattr(self, "_constructing", False) or len(value):
            raise AttributeError(f"{type(self).__name__}.state cannot be assigned; use load_state_dict()")

    def add_param_group(self, param_group):
        """Add a parameter group: only during construction (buffers are packed once)."""
        if not getattr(self, "_constructing", False):
            raise NotImplementedError(
                f"{type(self).__name__} packs its parameters into flat buffers at construction and "
                "cannot add a parameter group later; create a new optimizer with all groups "
                "(load_state_dict() carries the state over)")
        super().add_param_group(param_group)  # torch's checks; params become a list of tensors
        params = param_group["params"]
        if len({id(p) for p in params}) != len(params):  # torch only warns
            raise ValueError(f"{type(self).__name__}: a parameter appears twice in one parameter group")

    def _hyperparameters(self, group):
        return {k: _as_python(group[k]) for k in self._numpy_class._hyperparameters}

    def _check_group(self, group, where):
        """Validate a group's hyperparameters (the NumPy class's rules) and torch-only flags."""
        name = type(self).__name__
        for key, required in _IMPLEMENTATION_FLAGS.items():
            if key in group and required is not None and bool(group[key]) != required:
                raise ValueError(f"{name} {where}: {key}={group[key]!r} is not supported by flatopt.torch")
        for key, default in self._unsupported_defaults.items():
            if key in group and group[key] != default:
                raise NotImplementedError(
                    f"{name} {where}: {key}={group[key]!r} is not supported by flatopt.torch "
                    f"(only the default {default!r})")
        # _check validates a plain dict and uses no instance state.
        self._numpy_class._check(None, self._hyperparameters(group), f"{name} {where}")

    def _build(self):
        name = type(self).__name__
        by_dtype = {}
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, f"param_groups[{gi}]")
            for pi, p in enumerate(group["params"]):
                where = f"{name}: param_groups[{gi}]['params'][{pi}]"
                if p.device.type != "cpu":
                    raise ValueError(f"{where} is on device {p.device}; flatopt.torch runs on the CPU only")
                if p.layout != torch.strided:
                    raise ValueError(f"{where} has layout {p.layout}; only dense (strided) tensors are supported")
                if p.dtype not in _TORCH_DTYPES:
                    raise TypeError(f"{where} has dtype {p.dtype}; flatopt.torch supports float32 and float64")
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise RuntimeError(f"{where}: {name} does not support sparse gradients")
                by_dtype.setdefault(p.dtype, {}).setdefault(gi, []).append(p)
        for dtype, groups in by_dtype.items():
            numpy_groups = [{"params": [p.detach().numpy() for p in ps],
                             **self._hyperparameters(self.param_groups[gi])} for gi, ps in groups.items()]
            accepted = inspect.signature(self._numpy_class).parameters
            defaults = {k: v for k, v in self._hyperparameters(self.defaults).items() if k in accepted}
            numpy_opt = self._numpy_class(numpy_groups, n_threads=self._n_threads, **defaults)
            params = [p for ps in groups.values() for p in ps]
            bucket = _Bucket(numpy_opt, params, list(groups))
            for i, p in enumerate(params):
                grad = p.grad
                p.data = bucket.param_views[i]
                if grad is not None:
                    bucket.grad_views[i].copy_(grad.detach())
                    bucket.dirty[i] = True
                    p.grad = bucket.grad_views[i]
                bucket.data_ptrs.append(p.data_ptr())
                self._attach_hook(bucket, i)
            self._buckets.append(bucket)
        if self._eager_state:
            for bucket in self._buckets:
                bucket.opt._prepare()

    def _attach_hook(self, bucket, i):
        p = bucket.params[i]
        if p.requires_grad and i not in bucket.hooks:
            bucket.hooks[i] = p.register_hook(_AttachGrad(p, bucket.grad_views[i], bucket.dirty, bucket.sparse, i))

    def __del__(self):
        for bucket in getattr(self, "_buckets", ()):
            for handle in bucket.hooks.values():
                handle.remove()

    def __getstate__(self):
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied; save state_dict() instead")

    # -- step ----------------------------------------------------------------------------
    def _sync_groups(self, bucket):
        """Copy hyperparameters from the torch groups (LR schedulers edit those) into the
        NumPy groups, validate them and allocate any state they need."""
        for ngi, tgi in enumerate(bucket.group_map):
            group = self.param_groups[tgi]
            numpy_group = bucket.opt.param_groups[ngi]
            for key in self._numpy_class._hyperparameters:
                value = group[key]
                numpy_group[key] = value if type(value) in (float, int, bool) else _as_python(value)
        bucket.opt._prepare()

    def _gather(self, bucket):
        """Which parameters take part in this step, validated; non-view grads to copy in."""
        name = type(self).__name__
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

    @staticmethod
    def _runs(taking_part, counts, first, stop):
        """Maximal runs ``(a, b, count)`` of consecutive participating parameters in
        ``[first, stop)`` that share a step count."""
        if stop <= first:
            return []
        part, cnt = taking_part[first:stop], counts[first:stop]
        if part.all() and (cnt == cnt[0]).all():
            return [(first, stop, int(cnt[0]))]
        runs, start = [], None
        for j in range(first, stop + 1):
            if start is not None and (j == stop or not taking_part[j] or counts[j] != counts[start]):
                runs.append((start, j, int(counts[start])))
                start = None
            if j < stop and taking_part[j] and start is None:
                start = j
        return runs

    def _copy_in(self, bucket, taking_part, copies):
        """Make the flat gradient buffer hold exactly the parameters' gradients: copy in
        those that are not flat-buffer views (and re-attach the views), and zero the views
        of parameters whose grad is None (a None gradient counts as zero in norms and
        finiteness checks; it is skipped by the step either way)."""
        if not taking_part.all():
            for i in np.flatnonzero(~taking_part & bucket.dirty):
                bucket.grad_views[i].zero_()
                bucket.dirty[i] = False
        for i, grad in copies:
            view = bucket.grad_views[i]
            view.copy_(grad.detach())  # detached: a create_graph grad must not enter the buffer's history
            bucket.dirty[i] = True
            bucket.params[i].grad = view
            self._attach_hook(bucket, i)

    def step(self, closure=None, *, grad_scale=1.0, skip_if_nonfinite=False):
        """Perform one optimization step (one kernel call per group and dtype).

        ``closure``: optional callable that re-evaluates the model and returns the loss,
        called with gradients enabled, as in torch.optim. Returns its loss, or None.

        flatopt extensions (keyword-only): ``grad_scale`` multiplies every gradient inside
        the kernel (loss-scale unscaling at no extra pass), times any factor left by
        :meth:`clip_grad_norm_`. With ``skip_if_nonfinite``, a gradient holding inf or NaN
        skips the step: params and state stay bit-identical, :attr:`skipped_steps` counts
        it and :attr:`last_step_skipped` is True.
        """
        if grad_scale != 1.0:
            grad_scale = check_real(grad_scale, "grad_scale")
        check_bool(skip_if_nonfinite, "skip_if_nonfinite")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Validate everything before writing anything.
        plans = []
        for bucket in self._buckets:
            self._sync_groups(bucket)
            plans.append(self._gather(bucket))
        n_threads = effective_n_threads(self._n_threads)
        for bucket, (taking_part, copies) in zip(self._buckets, plans):
            self._copy_in(bucket, taking_part, copies)
        grad_scale *= self._pending_grad_scale
        self._pending_grad_scale = 1.0
        self.last_step_skipped = skip_if_nonfinite and any(
            kernels.count_nonfinite(b.opt.flat_grads, n_threads) for b in self._buckets)
        if self.last_step_skipped:
            self.skipped_steps += 1
            return loss
        for bucket, (taking_part, _) in zip(self._buckets, plans):
            opt = bucket.opt
            buffers = {"param": opt.flat_params, "grad": opt.flat_grads,
                       **{k: v for k, v in opt.state.items() if isinstance(v, np.ndarray)}}
            for gi, (first, stop) in enumerate(bucket.ranges):
                group = opt.param_groups[gi]
                uses_state = self._uses_state(group)
                for a, b, count in self._runs(taking_part, bucket.counts, first, stop):
                    lo, hi = bucket.starts[a], bucket.stops[b - 1]
                    seg = {k: v[lo:hi] for k, v in buffers.items()}
                    self._before_update(opt, gi, group, count)
                    opt._update(gi, group, seg, seg["grad"], count + 1, grad_scale, n_threads)
                    if uses_state:
                        bucket.counts[a:b] += 1
        return loss

    def grad_norm(self, norm_type=2.0):
        """The global ``norm_type``-norm of every gradient, in one read-only pass per dtype.

        As ``torch.nn.utils.get_total_norm`` over the parameters' grads (None counts as
        zero), accumulated in double over fixed blocks: bit-identical for any thread
        count; inf or nan when a gradient is not finite.
        """
        norm_type = check_norm_type(norm_type)
        for bucket in self._buckets:
            self._copy_in(bucket, *self._gather(bucket))
        norms = [b.opt.grad_norm(norm_type) for b in self._buckets]
        if norm_type == math.inf:
            return max(norms, default=0.0)
        return math.fsum(n ** norm_type for n in norms) ** (1.0 / norm_type)

    def zero_grad(self, set_to_none=True):
        """Zero the flat gradient buffers in one pass; with ``set_to_none`` (the default,
        as in torch) also set every ``p.grad`` to None.

        After ``set_to_none``, a parameter that the next backward pass reaches gets its
        flat-buffer view back (zeroed) from a gradient hook, and one it does not reach
        keeps ``grad`` None and is skipped by ``step()``, as in torch. Without it, the
        views stay attached and hold zeros.
        """
        for bucket in self._buckets:
            bucket.flat_grad.zero_()
            bucket.dirty[:] = False
            bucket.sparse[:] = False
            for p, view in zip(bucket.params, bucket.grad_views):
                if set_to_none:
                    p.grad = None
                elif p.grad is not None and p.grad is not view:
                    p.grad = view

    # -- checkpoints ---------------------------------------------------------------------
    def _param_state(self, bucket, i, copy):
        """Parameter ``i``'s state entry in torch's format, or None if torch has none."""
        count = int(bucket.counts[i])
        if count == 0 and not self._eager_state:
            return None
        gi = bucket.group_of[i]
        group = bucket.opt.param_groups[gi]
        entry = {}
        if self._torch_step:
            fused = self.param_groups[bucket.group_map[gi]].get("fused")
            entry["step"] = torch.tensor(float(count), dtype=_get_scalar_dtype(is_fused=fused))
        for name in bucket.opt._state_names(group):
            if name in bucket.opt.state:
                view = bucket.state_view(name, i)
                entry[name] = view.clone() if copy else view
        return entry

    def state_dict(self):
        """The optimizer's state in torch.optim's format (see the module docstring).

        ``{"state": {id: {...}}, "param_groups": [{..., "params": [ids]}]}`` with ids
        numbering the parameters in group order; the tensors are copies.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        where = {p: (bucket, i) for bucket in self._buckets for i, p in enumerate(bucket.params)}
        state, param_groups, pid = {}, [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(pid, pid + len(group["params"])))
            param_groups.append(packed)
            for p in group["params"]:
                entry = self._param_state(*where[p], copy=True)
                if entry is not None:
                    state[pid] = entry
                pid += 1
        state_dict = {"state": state, "param_groups": param_groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict):
        """Load a state dict from this class or from the torch.optim optimizer of the same
        name. Everything is checked before anything changes."""
        name = type(self).__name__
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
            raise ValueError(f"{name}: state_dict must have keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{name}: loaded state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}")
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{name}: loaded state dict's param_groups[{gi}] has {len(saved['params'])} "
                    f"parameters, this optimizer's has {len(group['params'])}")
            missing = set(self._numpy_class._hyperparameters) - set(saved)
            if missing:
                raise ValueError(f"{name}: loaded param_groups[{gi}] lacks {sorted(missing)}")
            self._check_group({**saved, **self._fixed}, f"loaded param_groups[{gi}]")
        where = {p: (bucket, i) for bucket in self._buckets for i, p in enumerate(bucket.params)}
        loaded = []  # (bucket, i, entry)
        allowed = set(self._numpy_class._all_state_names) | ({"step"} if self._torch_step else set())
        saved_state = state_dict["state"]
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for p, pid in zip(group["params"], saved["params"]):
                entry = saved_state.get(pid, {})
                if not isinstance(entry, dict):
                    raise ValueError(f"{name}: state for parameter {pid} must be a dict")
                # Old torch versions stored momentum_buffer=None for momentum=0.
                entry = {k: v for k, v in entry.items() if v is not None}
                unknown = set(entry) - allowed
                if unknown:
                    raise ValueError(f"{name}: state for parameter {pid} has unknown entries {sorted(unknown)}")
                for key, value in entry.items():
                    if key == "step":
                        step = float(value.item() if isinstance(value, torch.Tensor) else value)
                        if step < 0 or step != int(step):
                            raise ValueError(f"{name}: state[{pid}]['step'] must be a whole number >= 0, got {step}")
                    elif (not isinstance(value, torch.Tensor) or value.shape != p.shape
                          or not value.is_floating_point()):
                        raise ValueError(
                            f"{name}: state[{pid}][{key!r}] must be a floating-point tensor of shape "
                            f"{tuple(p.shape)}, got {value!r:.80}")
                loaded.append((*where[p], entry))

        # Everything is valid: apply. Groups first, so that the state they need exists.
        for group, saved in zip(self.param_groups, saved_groups):
            params = group["params"]
            group.clear()
            group.update({k: v for k, v in saved.items() if k != "params"})
            group.update(self._fixed)  # as torch's AdamW.__setstate__ does
            group["params"] = params
        for bucket in self._buckets:
            self._sync_groups(bucket)
            for key in {k for _, _, e in loaded for k in e if k != "step"} - set(bucket.opt.state):
                bucket.opt.state[key] = bucket.opt.layout.zeros()
                bucket.opt._validated = [None] * len(bucket.opt.param_groups)
            bucket.opt._prepare()
        initial = {}  # (bucket, key) -> a full buffer in its initial state, made on demand
        for bucket, i, entry in loaded:
            lo, hi = bucket.starts[i], bucket.stops[i]
            for key, buf in bucket.opt.state.items():
                if not isinstance(buf, np.ndarray):
                    continue
                if key in entry:
                    torch.from_numpy(buf[lo:hi]).view(bucket.shapes[i]).copy_(entry[key].detach())
                    continue
                # No saved state: the parameter starts afresh (its count becomes 0).
                if (id(bucket), key) not in initial:
                    fresh = bucket.opt.layout.zeros()
                    bucket.opt._init_state(key, fresh)
                    initial[id(bucket), key] = fresh
                buf[lo:hi] = initial[id(bucket), key][lo:hi]
            if self._torch_step:
                step = entry.get("step", 0)
                bucket.counts[i] = int(step.item() if isinstance(step, torch.Tensor) else step)
            else:
                bucket.counts[i] = 1 if any(k in entry for k in self._numpy_class._all_state_names) else 0
        self._pending_grad_scale = 1.0  # a clip factor belongs to the gradients it measured
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


def _wrap(numpy_class, doc, fixed=None, **attributes):
    """Make the flatopt.torch optimizer for ``numpy_class``.

    Its signature is that of the torch.optim class of the same name (plus keyword-only
    ``n_threads``), or the NumPy class's when torch has no such optimizer. torch arguments
    that the NumPy class does not implement must keep their default. ``fixed`` gives
    hyperparameters that torch sets itself rather than taking as arguments (AdamW's
    ``decoupled_weight_decay=True``); they are in every group, as in torch.
    """
    fixed = dict(fixed or {})
    name = numpy_class.__name__
    torch_class = getattr(torch.optim, name, None)
    source = inspect.signature((torch_class or numpy_class).__init__)
    parameters = [p for p in source.parameters.values() if p.name not in ("dtype", "n_threads")]
    parameters.append(inspect.Parameter("n_threads", inspect.Parameter.KEYWORD_ONLY, default=None))
    signature = source.replace(parameters=parameters)
    hyper = numpy_class._hyperparameters
    missing = [k for k in hyper if k not in signature.parameters and k not in fixed]
    if missing:
        raise TypeError(f"torch.optim.{name} has no argument(s) {missing} of flatopt.{name}")
    unsupported = {p.name: p.default for p in parameters[2:-1]
                   if p.name not in hyper and p.name not in _IMPLEMENTATION_FLAGS}

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        params = arguments.pop("params")
        n_threads = arguments.pop("n_threads")
        _FlatOptimizer.__init__(self, params, {**arguments, **fixed}, n_threads=n_threads)

    __init__.__signature__ = signature
    __init__.__doc__ = doc
    return type(name, (_FlatOptimizer,), {
        "__init__": __init__, "__doc__": doc, "__module__": __name__,
        "_numpy_class": numpy_class, "_torch_class": torch_class,
        "_unsupported_defaults": unsupported, "_fixed": fixed, **attributes,
    })


def _sgd_uses_state(self, group):
    return group["momentum"] != 0


def _sgd_before_update(self, numpy_opt, gi, group, count):
    # torch sets a parameter's momentum buffer to its first gradient; flatopt.SGD keeps
    # that "first step" flag per group, so set it for this run of parameters.
    if group["momentum"] != 0:
        numpy_opt.state["momentum_buffer_initialized"][gi] = count > 0


SGD = _wrap(_momentum.SGD, """torch.optim.SGD on flat buffers: same arguments, results and state dict.

    ``SGD(params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
    maximize=False, foreach=None, differentiable=False, fused=None, n_threads=None)``.
    See :class:`flatopt.SGD` for the update and :mod:`flatopt.torch` for how parameters,
    gradients and checkpoints are handled.
    """, _uses_state=_sgd_uses_state, _before_update=_sgd_before_update)

Momentum = _wrap(_momentum.Momentum, """Textbook momentum on flat buffers (no torch.optim twin).

    ``Momentum(params, lr, beta=0.9, weight_decay=0.0, maximize=False, *, n_threads=None)``:
    ``v = beta*v + (1-beta)*g; p -= lr*v``, see :class:`flatopt.Momentum`. Its state dict
    uses torch.optim's layout, with a per-parameter ``momentum_buffer``.
    """)


def _doc(name):
    return f"""torch.optim.{name} on flat buffers: same arguments, results and state dict, plus
    ``n_threads``. See :class:`flatopt.{name}` for the update and :mod:`flatopt.torch` for how
    parameters, gradients and checkpoints are handled.
    """


# torch keeps a per-parameter "step" for all of these; Adagrad creates its state eagerly.
Adam = _wrap(_adaptive.Adam, _doc("Adam"), _torch_step=True)
AdamW = _wrap(_adaptive.AdamW, _doc("AdamW"), fixed={"decoupled_weight_decay": True}, _torch_step=True)
RMSprop = _wrap(_adaptive.RMSprop, _doc("RMSprop"), _torch_step=True)
Adadelta = _wrap(_adaptive.Adadelta, _doc("Adadelta"), _torch_step=True)
Adagrad = _wrap(_adaptive.Adagrad, _doc("Adagrad"), _torch_step=True, _eager_state=True)


# -- Adam's variants: NAdam, RAdam, Adamax, Lion (kept self-contained) -------------------------

from .. import _adam_variants  # noqa: E402


# torch keeps NAdam's mu_product per parameter; parameters of one group that have taken the
# same number of steps share it. So flatopt.torch.NAdam keeps, per NumPy group, a table
# {step count: mu_product} and hands flatopt.NAdam (whose state holds one value per group)
# the run's value before each kernel call; the value the call leaves there is filed under
# count + 1 at the group's next call (or when the state is read). Exact for every
# parameter, whichever steps its gradient was None for.

def _nadam_tables(self):
    if "_mu_tables" not in self.__dict__:
        self._mu_tables, self._mu_pending = {}, {}
    for (bucket_opt, gi), count in self._mu_pending.items():  # file the last call's result
        self._mu_tables[id(bucket_opt), gi][count + 1] = bucket_opt.state["mu_product"][gi]
    self._mu_pending.clear()
    return self._mu_tables


def _nadam_table(self, numpy_opt, gi):
    return _nadam_tables(self).setdefault((id(numpy_opt), gi), {0: 1.0})


def _nadam_before_update(self, numpy_opt, gi, group, count):
    # torch's mu_product is a scalar of its default dtype (float32 unless float64 is set).
    numpy_opt._mu_product_float32 = _get_scalar_dtype() == torch.float32
    table = _nadam_table(self, numpy_opt, gi)
    if len(table) > 64:  # forget counts no parameter of the group has any more
        bucket = next(b for b in self._buckets if b.opt is numpy_opt)
        first, stop = bucket.ranges[gi]
        keep = set(bucket.counts[first:stop].tolist()) | {count}
        for key in [k for k in table if k not in keep]:
            del table[key]
    numpy_opt.state["mu_product"][gi] = table[count]
    self._mu_pending[numpy_opt, gi] = count


def _nadam_param_state(self, bucket, i, copy):
    entry = _FlatOptimizer._param_state(self, bucket, i, copy)
    if entry is not None:
        value = _nadam_table(self, bucket.opt, bucket.group_of[i])[int(bucket.counts[i])]
        entry["mu_product"] = torch.tensor(value, dtype=_get_scalar_dtype())
    return entry


def _nadam_load_state_dict(self, state_dict):
    name = type(self).__name__
    state_dict = dict(state_dict)
    stripped, mu = {}, {}
    for pid, entry in dict(state_dict.get("state", {})).items():
        if isinstance(entry, dict) and "mu_product" in entry:
            entry = dict(entry)
            value = entry.pop("mu_product")
            value = float(value.item() if isinstance(value, torch.Tensor) else value)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: state[{pid}]['mu_product'] must be in [0, 1], got {value}")
            mu[pid] = value
        elif isinstance(entry, dict) and entry:
            raise ValueError(f"{name}: state for parameter {pid} lacks 'mu_product'")
        stripped[pid] = entry
    state_dict["state"] = stripped
    _FlatOptimizer.load_state_dict(self, state_dict)
    where = {p: (bucket, i) for bucket in self._buckets for i, p in enumerate(bucket.params)}
    _nadam_tables(self).clear()
    for group, saved in zip(self.param_groups, state_dict["param_groups"]):
        for p, pid in zip(group["params"], saved["params"]):
            if pid in mu:
                bucket, i = where[p]
                _nadam_table(self, bucket.opt, bucket.group_of[i])[int(bucket.counts[i])] = mu[pid]


NAdam = _wrap(_adam_variants.NAdam, _doc("NAdam"), _torch_step=True, _before_update=_nadam_before_update,
              _param_state=_nadam_param_state, load_state_dict=_nadam_load_state_dict)
RAdam = _wrap(_adam_variants.RAdam, _doc("RAdam"), _torch_step=True)
Adamax = _wrap(_adam_variants.Adamax, _doc("Adamax"), _torch_step=True)
Lion = _wrap(_adam_variants.Lion, """Lion on flat buffers (no torch.optim twin).

    ``Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False,
    n_threads=None)``, see :class:`flatopt.Lion`. Its state dict uses torch.optim's
    layout with a per-parameter ``exp_avg`` (as lion-pytorch's).
    """)
__all__ += ["NAdam", "RAdam", "Adamax", "Lion"]

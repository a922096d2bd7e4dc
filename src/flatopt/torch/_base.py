"""The base class of flatopt.torch's optimizers: torch.optim.Optimizer over flat buffers.

A public class (see ``_optimizers.py``) sets ``_numpy_class`` (the flatopt optimizer that
owns the buffers and runs the kernel), ``_torch_step`` (torch keeps a per-parameter
``step`` tensor) and ``_eager_state`` (torch creates state at construction), and may
override :meth:`_uses_state` and :meth:`_fresh_state`. Packing lives in ``_packing``,
run planning in ``_runs``, the checkpoint format in ``_checkpoint``; a step is the NumPy
optimizer's step routine (``_begin_step`` / ``_finish_step``) called per dtype.
"""

import copy as _copy
import functools
import inspect
import math
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, overload

import numpy as np
import numpy.typing as npt
import torch

from .._optimizer import Optimizer as NumpyOptimizer, _Run
from .._norms import ClipGradNormMixin, check_norm_type
from .._threads import check_n_threads, effective_n_threads
from .._validation import check_bool, check_fits, check_real
from . import _checkpoint, _packing, _runs

if TYPE_CHECKING:  # torch.optim's own alias (torch >= 2.2); quoted where used
    from torch.optim.optimizer import ParamsT

# torch.optim arguments that select an implementation, not the update. foreach and fused
# are kept (they are part of torch's state dict) but ignored; the others must be False.
_IMPLEMENTATION_FLAGS = {"foreach": None, "fused": None, "differentiable": False, "capturable": False}

#: A hook called before the kernel runs over a run of parameters (see ``_before_update``).
BeforeUpdate = Callable[["_packing.Bucket", int, dict[str, Any], int, "_runs.Advance"], None]


def _increment_version_each(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        # torch < 2.1 only; the private binding is not in torch's stubs.
        torch._C._autograd._increment_version(t)  # type: ignore[attr-defined]


_increment_version: Callable[[Iterable[torch.Tensor]], None]
try:
    _increment_version = torch.autograd.graph.increment_version
except AttributeError:  # torch < 2.1: one call per tensor
    _increment_version = _increment_version_each


# torch.optim's step wrapper (``Optimizer.profile_hook_step``, applied to every subclass's
# ``step`` unless that is marked ``hooked``) calls the step pre- and post-hooks inside a
# ``record_function`` label for the profiler. That label is expensive even when no
# profiler runs: inside it each torch call the step makes pays the profiler's
# bookkeeping, 30 us a step for flatopt.torch's Adam over 4 tensors (2-core AMD EPYC,
# torch 2.13; 57 us a step wrapped, 26 us not), more than the rest of its step. So
# ``hooked_step`` calls the step directly when no profiler is enabled and no step hook is
# registered (there is then nothing for the wrapper to do), and torch's own wrapper
# otherwise: hooks and profiler traces are exactly torch's.
_Step = TypeVar("_Step", bound=Callable[..., Any])
try:
    from torch.optim.optimizer import (_global_optimizer_post_hooks as _global_post_hooks,
                                       _global_optimizer_pre_hooks as _global_pre_hooks)
    _profiler_enabled: Callable[[], bool] = torch._C._autograd._profiler_enabled
    _is_compiling: Callable[[], bool] = torch.compiler.is_compiling
    _CAN_SKIP_WRAPPER = True
except (ImportError, AttributeError):  # another torch: its wrapper as it is
    _CAN_SKIP_WRAPPER = False


def hooked_step(step: _Step) -> _Step:
    """``step`` wrapped as torch.optim wraps it, without the profiler label's cost when
    nothing would observe it (see above)."""
    if not _CAN_SKIP_WRAPPER:
        return step  # torch wraps it
    wrapped = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if (_profiler_enabled() or _global_pre_hooks or _global_post_hooks
                or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks):
            return wrapped(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()
        return out

    wrapper.hooked = True  # type: ignore[attr-defined]  # torch then leaves it as it is
    return wrapper  # type: ignore[return-value]


def _restore(cls: type["_FlatOptimizer"], param_groups: list[dict[str, Any]], defaults: dict[str, Any],
             n_threads: int | None, entries: dict[int, dict[str, Any]], extra: dict[str, Any],
             master_dtype: torch.dtype | None = None, others: dict[Any, Any] | None = None,
             stale: list[int] | None = None) -> "_FlatOptimizer":
    """Rebuild a pickled or deep-copied optimizer (see ``_FlatOptimizer.__reduce_ex__``);
    ``others``: the keys of ``opt.state`` that are not parameters; ``stale``: positions
    of 16-bit parameters written since the original's last step (their masters are
    reconciled at the copy's next step, as the original's would be)."""
    opt = cls.__new__(cls)
    _FlatOptimizer.__init__(opt, param_groups, defaults, n_threads=n_threads, master_dtype=master_dtype)
    params = [p for g in opt.param_groups for p in g["params"]]
    opt._install_state({params[i]: e for i, e in entries.items()}, known={params[i]: -1 for i in stale or ()})
    dict.update(opt._state_map, others or {})
    opt.__dict__.update(extra)
    return opt


class _FlatOptimizer(ClipGradNormMixin, torch.optim.Optimizer):
    """Base class of flatopt.torch's optimizers (see the module docstring)."""

    if TYPE_CHECKING:  # set by every public class; None on this base class
        _numpy_class: ClassVar[type[NumpyOptimizer]]
    else:
        _numpy_class = None
    _torch_class: ClassVar[type[torch.optim.Optimizer] | None] = None
    _torch_step: ClassVar[bool] = False
    _eager_state: ClassVar[bool] = False
    _fixed: ClassVar[dict[str, Any]] = {}
    _unsupported_defaults: ClassVar[dict[str, Any]] = {}

    _n_threads: int | None
    _buckets: list[_packing.Bucket]
    _param_lists: list[_packing.ParamList]
    _no_empty_group: bool
    _state_map: defaultdict[torch.Tensor, Any]
    skipped_steps: int
    last_step_skipped: bool
    _pending_grad_scale: float
    _constructing: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        numpy_class = cls.__dict__.get("_numpy_class")
        if numpy_class is None:
            return
        cls._torch_class = getattr(torch.optim, cls.__name__, None)
        hyper = numpy_class._hyperparameters
        own = inspect.signature(cls.__init__).parameters
        missing = [k for k in hyper if k not in own and k not in cls._fixed]
        if missing:
            raise TypeError(f"{cls.__name__}.__init__ lacks argument(s) {missing} of flatopt.{numpy_class.__name__}")
        cls._unsupported_defaults = {
            p.name: p.default for p in list(own.values())[2:]
            if p.name not in hyper and p.name not in _IMPLEMENTATION_FLAGS and p.name not in _checkpoint.OPTIMIZER_WIDE}

    def __init__(self, params: "ParamsT", defaults: dict[str, Any], *, n_threads: int | None = None,
                 master_dtype: torch.dtype | None = None) -> None:
        self._n_threads = check_n_threads(n_threads)
        if master_dtype is not None and master_dtype != torch.float32:
            raise TypeError(f"master_dtype must be None or torch.float32, got {master_dtype!r}")
        self._master_dtype = master_dtype
        defaults = {**defaults, **self._fixed}
        self._check_group(defaults, "defaults")  # hyperparameters first, as torch does
        if isinstance(params, torch.Tensor):  # torch's own check, before list() iterates rows
            raise TypeError(f"params must be an iterable of Tensors or dicts, got {torch.typename(params)}")
        self._buckets = []
        self.skipped_steps = 0            # steps skipped by step(skip_if_nonfinite=True)
        self.last_step_skipped = False
        self._pending_grad_scale = 1.0    # set by clip_grad_norm_, used by the next step
        self._constructing = True
        super().__init__(params, defaults)
        self._repack()
        self._constructing = False

    # -- hooks for subclasses ----------------------------------------------------------
    def _uses_state(self, group: dict[str, Any]) -> bool:
        """Whether a step with these hyperparameters uses (and counts) per-parameter state."""
        return True

    # Optional: ``_before_update(self, bucket, gi, group, count, span)``, called before the
    # kernel runs over a run of NumPy group ``gi``'s parameters ``span`` (a range of
    # ``bucket``'s parameters, None when the group keeps no state) that have had ``count``
    # updates (for per-parameter scalars torch keeps, such as NAdam's mu_product).
    _before_update: BeforeUpdate | None = None

    def _run_keys(self, bucket: _packing.Bucket) -> npt.NDArray[Any] | None:
        """A value per parameter of ``bucket`` that the parameters of one kernel call must
        share, besides their step count (None: none)."""
        return None

    def _live_extras(self, bucket: _packing.Bucket, i: int) -> dict[str, torch.Tensor]:
        """Live views of parameter ``i``'s state outside the flat buffers, by key (NAdam's
        mu_product), for its ``opt.state`` entry."""
        return {}

    def _param_state(self, bucket: _packing.Bucket, i: int, copy: bool) -> dict[str, Any] | None:
        """Parameter ``i`` of ``bucket``'s entry as ``state_dict()`` saves it (None: none).
        Override to add per-parameter values that are not views (call this first)."""
        entry: dict[str, Any] | None = self.state.get(bucket.params[i])
        if entry is None:
            return None
        if not copy:
            return entry
        return {k: (v.clone() if isinstance(v, torch.Tensor) else _copy.deepcopy(v)) for k, v in entry.items()}

    def _fresh_state(self, bucket: _packing.Bucket, name: str) -> npt.NDArray[np.floating[Any]]:
        """A whole buffer ``name`` of ``bucket`` as a parameter without state has it."""
        buf = bucket.opt.layout.zeros()
        bucket.opt._init_state(name, buf)
        return buf

    # -- state -----------------------------------------------------------------------------
    @property
    def state(self) -> defaultdict[torch.Tensor, Any]:
        """Per-parameter state as torch.optim keeps it: a ``defaultdict(dict)`` mapping a
        parameter to its entry (``{}`` when it has none). Buffers are live views of the
        flat state; assigning to them copies in. Replace it with ``load_state_dict()``."""
        return self._state_map

    @state.setter
    def state(self, value: defaultdict[torch.Tensor, Any]) -> None:
        # torch.optim.Optimizer.__init__ assigns an empty defaultdict; nothing else may.
        if not getattr(self, "_constructing", False) or len(value):
            raise AttributeError(f"{type(self).__name__}.state cannot be assigned; use load_state_dict()")
        self._state_map = _checkpoint.StateMap(self)

    def _set_param_states(self, changes: dict[Any, Any]) -> None:
        """Apply edits of ``opt.state`` (see ``_checkpoint.StateMap``): ``{key: entry}``,
        an entry ``_checkpoint.REMOVE`` to remove the key. Parameters' new entries are
        checked as a checkpoint's are, all before any change; then every parameter's state
        is installed again, as ``load_state_dict`` installs it. Other keys are stored as
        given."""
        params = self._packed_params()
        state = self._state_map
        # (a parameter's own live entry assigned back to it changes nothing, as in torch)
        ours = [k for k in changes if isinstance(k, torch.Tensor) and k in params
                and not (changes[k] is dict.get(state, k) and isinstance(changes[k], _checkpoint.ParamState)
                         and changes[k].live)]
        if ours:
            entries = self._carried_state()
            emptied = []
            for key in ours:
                value = changes[key]
                # A 16-bit parameter's float32 master is its weights, not optimizer history:
                # it stays unless the new entry brings one (torch keeps the weights too).
                master = entries.get(key, {}).get(_checkpoint.MASTER)
                if value is _checkpoint.REMOVE or (isinstance(value, dict) and not value):
                    entries.pop(key, None)
                    if value is not _checkpoint.REMOVE:
                        emptied.append(key)
                elif isinstance(value, dict):  # cloned: it may view buffers rewritten first (a swap)
                    entries[key] = _checkpoint.check_entry(
                        self, key, f"<parameter of shape {tuple(key.shape)}>", _checkpoint._copied(value))
                else:
                    raise TypeError(f"{type(self).__name__}.state[p] must be a dict (a parameter's "
                                    f"state entry), got {type(value).__name__}")
                if master is not None:
                    entries.setdefault(key, {}).setdefault(_checkpoint.MASTER, master)
            # Masters meet the 16-bit parameters at the next step where those were written
            # since the last, and where an assigned entry brought its own (as a load's do).
            known = _packing.half_known(self._buckets)
            known.update({key: -1 for key in ours
                          if isinstance(changes[key], dict) and _checkpoint.MASTER in changes[key]})
            for key in ours:  # a holder of the old entry keeps its values, as in torch
                old = dict.get(state, key)
                if isinstance(old, _checkpoint.ParamState):
                    old.detach()
            others = self._other_state()
            self._install_state(entries, known=known)
            dict.update(state, others)
            for key in emptied:  # torch keeps the {} it was given until the next step fills it
                if key not in state:
                    dict.__setitem__(state, key, {})
        for key, value in changes.items():
            if not (isinstance(key, torch.Tensor) and key in params):
                if value is _checkpoint.REMOVE:
                    dict.__delitem__(state, key)
                else:
                    dict.__setitem__(state, key, value)

    def _packed_params(self) -> set[torch.Tensor]:
        return {p for bucket in self._buckets for p in bucket.params}

    def _other_state(self) -> dict[Any, Any]:
        """The entries of ``opt.state`` that are not a packed parameter's (kept as given)."""
        params = self._packed_params()
        return {k: v for k, v in self._state_map.items() if not (isinstance(k, torch.Tensor) and k in params)}

    # -- groups ------------------------------------------------------------------------------
    def _constructor_defaults(self) -> dict[str, Any]:
        sig = inspect.signature(type(self).__init__).parameters
        return {k: p.default for k, p in sig.items()
                if p.default is not inspect.Parameter.empty and k not in _checkpoint.OPTIMIZER_WIDE}

    def _hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        return {k: _packing.as_python(group[k], k) for k in self._numpy_class._hyperparameters}

    def _check_group(self, group: dict[str, Any], where: str, gi: int | None = None) -> None:
        """Validate a group's hyperparameters (the NumPy class's rules, torch's rules for
        tensors, the dtypes of the buffers holding group ``gi``) and the torch-only flags."""
        name = type(self).__name__
        for key, required in _IMPLEMENTATION_FLAGS.items():
            if key in group and required is not None and bool(group[key]) != required:
                raise ValueError(f"{name} {where}: {key}={group[key]!r} is not supported by flatopt.torch")
        # torch's ZeroRedundancyOptimizer passes its defaults on to each group of its local
        # optimizer, master_dtype among them: a group may repeat the optimizer's own.
        if "master_dtype" in group and group["master_dtype"] != self._master_dtype:
            raise ValueError(
                f"{name} {where}: master_dtype={group['master_dtype']!r} differs from the optimizer's "
                f"({self._master_dtype!r}); master_dtype is one for the whole optimizer, set by its constructor")
        for key, default in self._unsupported_defaults.items():
            if key in group and group[key] != default:
                raise NotImplementedError(
                    f"{name} {where}: {key}={group[key]!r} is not supported by flatopt.torch "
                    f"(only the default {default!r})")
        betas = group.get("betas")
        if isinstance(betas, (tuple, list)) and any(isinstance(b, torch.Tensor) for b in betas) \
                and not all(isinstance(b, torch.Tensor) for b in betas):
            raise ValueError(f"{name} {where}: betas must be either both floats or both Tensors")
        hyper = self._hyperparameters(group)
        # _check validates a plain dict and uses no instance state.
        self._numpy_class._check(None, hyper, f"{name} {where}")  # type: ignore[arg-type]
        for bucket in self._buckets if gi is not None else ():
            if gi in bucket.group_map:
                check_fits(hyper, bucket.opt.layout.dtype, f"{name} {where}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, as torch.optim does: the buffers are packed again once
        (parameters rebound to a new flat buffer, state carried over). Everything is
        validated before anything is rebound."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        super().add_param_group(param_group)  # torch's checks and defaults; appends
        if self._constructing:
            return
        try:
            self._check_group(self.param_groups[-1], f"param_groups[{len(self.param_groups) - 1}]")
            self._repack()
        except BaseException:
            self.param_groups.pop()
            raise

    def _repack(self) -> None:
        """Pack every parameter into new flat buffers, carrying state and gradients over.
        New buffers are built and validated first; nothing is rebound if that fails."""
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, f"param_groups[{gi}]")
        buckets = _packing.make_buckets(self)  # raises before any parameter is touched
        carried, others = self._carried_state(), self._other_state()
        known = _packing.half_known(getattr(self, "_buckets", []))  # of the carried masters
        # State given to a parameter before its group was added (opt.state[q] = {...}):
        # loaded now, as torch's next step would use it.
        for bucket in buckets:
            for p in bucket.params:
                entry = others.get(p)
                if isinstance(entry, dict) and entry:
                    carried[p] = _checkpoint.check_entry(
                        self, p, f"<parameter of shape {tuple(p.shape)}>", _checkpoint._copied(entry))
                    del others[p]
        packed = self._packed_params()
        for p in [p for p in carried if p not in packed]:
            dict.__delitem__(self._state_map, p)  # loaded: replaced by its live entry
        # The lists packed (step() checks that the groups still hold them; the usual step
        # checks those of the buckets' groups, so it is not taken when a group is empty).
        self._param_lists = _packing.guard_params(self.param_groups)
        self._no_empty_group = all(self._param_lists)
        self._buckets = buckets
        for bucket in buckets:
            _packing.bind(bucket)
        self._install_state(carried, known=known)
        dict.update(self._state_map, {k: v for k, v in others.items() if k not in self._state_map})

    def _carried_state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """A copy of every packed parameter's state entry, to carry over to new buffers."""
        params = self._packed_params()
        return {p: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in e.items()}
                for p, e in self.state.items() if isinstance(p, torch.Tensor) and p in params
                and isinstance(e, dict)}

    def _install_state(self, entries: dict[Any, Any], loaded: bool = False,
                       known: dict[torch.Tensor, int] | None = None) -> None:
        """Replace all state by torch-format ``entries`` ({parameter: entry}; ``loaded``:
        from a checkpoint; ``known``: see ``_checkpoint.install_state``); subclasses with
        state outside the flat buffers (NAdam's mu_product) extend this."""
        _checkpoint.install_state(self, entries, loaded, known)

    def _check_entry(self, pid: Any, entry: dict[str, Any]) -> None:
        """Raise if a parameter's entry (checked by ``_checkpoint.check_entry`` for the
        flat buffers' keys) lacks or has a bad value outside them (NAdam's mu_product)."""

    # -- copy and pickle --------------------------------------------------------------------
    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        """Copies and pickles rebuild the optimizer over new flat buffers: a deep copy's
        parameters are the copied ones when they were deep-copied with it (a model and its
        optimizer in one ``deepcopy``), new tensors otherwise, as with torch.optim."""
        params = [p for g in self.param_groups for p in g["params"]]
        first: dict[torch.Tensor, int] = {}
        for i, p in enumerate(params):
            first.setdefault(p, i)
        entries = {first[p]: e for p, e in self._carried_state().items()}
        # Not the hooks (torch.optim's __getstate__ leaves them out: a copy has none, and
        # an optimizer with a lambda hook pickles).
        extra = dict(skipped_steps=self.skipped_steps, last_step_skipped=self.last_step_skipped,
                     _pending_grad_scale=self._pending_grad_scale)
        known = _packing.half_known(self._buckets)
        stale = [i for i, p in enumerate(params) if first.get(p) == i and p in known
                 and (known[p] < 0 or p._version != known[p])]
        return (_restore, (type(self), self.param_groups, self.defaults, self._n_threads, entries, extra,
                           self._master_dtype, self._other_state(), stale))

    def __copy__(self) -> "_FlatOptimizer":
        raise TypeError(
            f"{type(self).__name__} cannot be shallow-copied: the copy would share the flat "
            "buffers the parameters are bound to, which only one optimizer can own; use "
            "copy.deepcopy (of the model and the optimizer together), or the same optimizer")

    # -- step ----------------------------------------------------------------------------
    def _check_param_lists(self) -> None:
        """Raise if ``param_groups`` no longer holds the groups and parameter lists packed."""
        _packing.check_params(self.param_groups, self._param_lists, type(self).__name__)

    def _sync_groups(self, bucket: _packing.Bucket) -> None:
        """Copy hyperparameters from the torch groups (LR schedulers edit those) into the
        NumPy groups; the NumPy step routine validates them. When the torch groups hold
        the very objects copied last time (the usual step), nothing is copied."""
        if self._in_sync(bucket):
            return
        bucket.usual = None  # the next step that completes re-arms it
        groups = self.param_groups
        getter = bucket.opt._getter
        hyper = self._numpy_class._hyperparameters
        for ngi, tgi in enumerate(bucket.group_map):
            group = groups[tgi]
            numpy_group = bucket.opt.param_groups[ngi]
            for key in hyper:
                value = group[key]
                numpy_group[key] = value if type(value) in (float, int, bool) else _packing.as_python(value, key)
        objects = [getter(groups[tgi]) for tgi in bucket.group_map]
        # Remembered only when no value can change in place (a tensor lr, a list of betas).
        bucket.synced = objects if all(
            type(v) in (float, int, bool) or (type(v) is tuple and all(type(x) in (float, int, bool) for x in v))
            for values in objects for v in values) else None

    def _in_sync(self, bucket: _packing.Bucket) -> bool:
        """Whether the torch groups hold the very hyperparameter objects that
        :meth:`_sync_groups` last copied into ``bucket``'s NumPy groups: then nothing
        needs copying. (Nor checking, when ``bucket`` is also armed: a copy disarms it,
        and only a step that got past the NumPy step routine's checks arms it again.)"""
        synced = bucket.synced
        if synced is None:
            return False
        getter, groups, packed = bucket.opt._getter, self.param_groups, self._param_lists
        try:
            if len(synced) == 1:  # one group, the usual case: no generator (-0.3 us)
                group = groups[bucket.group_map[0]]
                return (group["params"] is packed[bucket.group_map[0]]
                        and all(map(operator.is_, getter(group), synced[0])))
            return all(groups[tgi]["params"] is packed[tgi] and all(map(operator.is_, getter(groups[tgi]), seen))
                       for tgi, seen in zip(bucket.group_map, synced))
        except (KeyError, IndexError, TypeError):
            return False

    @overload
    def step(self, closure: None = None, *, grad_scale: float = 1.0,
             skip_if_nonfinite: bool = False) -> None: ...

    @overload
    def step(self, closure: Callable[[], float], *, grad_scale: float = 1.0,
             skip_if_nonfinite: bool = False) -> float: ...

    @hooked_step
    def step(self, closure: Callable[[], float] | None = None, *, grad_scale: float = 1.0,
             skip_if_nonfinite: bool = False) -> float | None:
        """Perform one optimization step (one kernel call per group and dtype).

        ``closure``: optional callable that re-evaluates the model and returns the loss,
        called with gradients enabled, as in torch.optim. Returns its loss, or None.

        flatopt extensions (keyword-only): ``grad_scale`` multiplies every gradient inside
        the kernel (loss-scale unscaling at no extra pass), times any factor left by
        :meth:`clip_grad_norm_`. With ``skip_if_nonfinite``, a gradient holding inf or NaN
        skips the step: params and state stay bit-identical, :attr:`skipped_steps` counts
        it and :attr:`last_step_skipped` is True.
        """
        if (closure is None and type(grad_scale) is float and grad_scale == 1.0 and skip_if_nonfinite is False
                and self._usual_step()):
            return None
        if grad_scale != 1.0:
            grad_scale = check_real(grad_scale, "grad_scale")
        check_bool(skip_if_nonfinite, "skip_if_nonfinite")
        loss: float | None = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        self._check_param_lists()
        # First half of the step routine for every dtype: validate everything, write nothing.
        scales: list[float] = []
        plans: list[tuple[npt.NDArray[np.bool_], list[torch.Tensor]]] = []
        for bucket in self._buckets:
            self._sync_groups(bucket)
            scales.append(bucket.opt._begin_step(grad_scale, skip_if_nonfinite))
        for bucket in self._buckets:
            plans.append(_packing.gather(bucket, name))
        n_threads = effective_n_threads(self._n_threads)
        # The gradients as each bucket's kernels read them: in place, or copied into the
        # flat buffer (which skip_if_nonfinite's check reads).
        sources = [_packing.step_grads(bucket, taking_part, grads, n_threads, flat=skip_if_nonfinite)
                   for bucket, (taking_part, grads) in zip(self._buckets, plans)]
        for bucket in self._buckets:  # every check passed: now the writes
            if bucket.mixed:
                _packing.reconcile_master(bucket)
        pending, self._pending_grad_scale = self._pending_grad_scale, 1.0
        self.last_step_skipped = False
        if skip_if_nonfinite and len(self._buckets) > 1 and any(
                b.opt._count_nonfinite(b.opt.flat_grads, n_threads) for b in self._buckets):
            self.last_step_skipped = True
        else:
            for bucket, (taking_part, _), scale, source in zip(self._buckets, plans, scales, sources):
                runs, advance = _runs.plan_runs(bucket, taking_part, self._uses_state, self._run_keys(bucket))
                bucket.opt._pending_grad_scale = pending
                before_run: Callable[[int, dict[str, Any], int], None] | None = None
                done = [0]
                hook = self._before_update
                if hook is not None:
                    # The hook sees the counts of the runs already taken advanced, as it
                    # would if every run were a separate step.
                    def before_run(gi: int, group: dict[str, Any], count: int,
                                   bucket: _packing.Bucket = bucket,
                                   advance: list[_runs.Advance] = advance, done: list[int] = done,
                                   hook: BeforeUpdate = hook) -> None:
                        k = done[0]
                        span = advance[k - 1] if k else None
                        if span is not None:
                            a, b = span
                            bucket.counts[a:b] += 1
                        done[0] = k + 1
                        hook(bucket, gi, group, count, advance[k])
                if not bucket.opt._finish_step(source, runs, scale,
                                               skip_if_nonfinite, n_threads, before_run):
                    self.last_step_skipped = True
                    break
                # Counts not yet advanced: all runs but those the hook advanced.
                self._after_update(bucket, taking_part, runs, advance, max(done[0] - 1, 0))
                self._arm(bucket)
        if self.last_step_skipped:
            self.skipped_steps += 1
        return loss

    def _usual_step(self) -> bool:
        """Take the usual step and return True, or return False having written nothing
        when this step is not the usual one (then :meth:`step` takes its general route).

        The usual step: every bucket is armed (``bucket.usual``, see :meth:`_arm`) and
        in sync (:meth:`_in_sync`), and every parameter has a contiguous gradient of its
        own shape and dtype. It makes the general route's kernel calls and writes (the
        tests compare the two) without its per-parameter planning and bookkeeping, which
        cost as much as the kernel at 2**16 elements: flatopt.torch's Adam over one
        1-element tensor took 11 us a step through the general route, 6 us through this
        one, 1.7 us through the NumPy API (Intel Xeon, Python 3.11, one session)."""
        if not self._no_empty_group or len(self.param_groups) != len(self._param_lists):
            return False
        work = []
        for bucket in self._buckets:
            plan = bucket.usual
            if plan is None or bucket.steps._version != bucket.steps_version or not self._in_sync(bucket):
                return False
            if bucket.mixed and not _packing.half_unchanged(bucket):
                return False  # a 16-bit parameter was written: the general route reconciles
            table = _packing.usual_table(bucket)
            if table is None:
                return False
            work.append((bucket, table, *_runs.usual_runs(bucket, plan)))
        n_threads = effective_n_threads(self._n_threads)
        pending, self._pending_grad_scale = self._pending_grad_scale, 1.0
        self.last_step_skipped = False
        for bucket, table, runs, advance in work:
            opt = bucket.opt
            opt._pending_grad_scale = pending
            opt._finish_step(table, runs, 1.0, False, n_threads)
            _runs.advance_counts(bucket, runs, advance)
            _increment_version(bucket.params)
            if bucket.mixed:  # every counter bumped once
                bucket.half_bumps += 1
                bucket.half_total += len(bucket.params)
        return True

    def _arm(self, bucket: _packing.Bucket) -> None:
        """After a step of the general route: let the next steps of ``bucket`` take the
        usual route while they can (every parameter took part, each group's counts are
        uniform, every parameter that keeps state has it, gradients are read in place,
        no per-run hook). ``_sync_groups`` disarms it when it copies hyperparameters,
        ``load_state_dict`` when it rewrites state."""
        plan = _runs.usual_plan(bucket, self._uses_state)
        armed = (bucket.uniform and bucket.synced is not None and bucket.reads_in_place
                 and self._before_update is None and len(bucket.opt.state) == bucket.n_state
                 and all(span is None or bucket.counts[first] > 0 for _, _, _, first, span in plan))
        bucket.usual = plan if armed else None

    def _after_update(self, bucket: _packing.Bucket, taking_part: npt.NDArray[np.bool_], runs: list[_Run],
                      advance: list[_runs.Advance], advanced: int = 0) -> None:
        """Advance step counts (of the runs from ``advanced`` on), give newly stateful
        parameters their entries, and bump the version counters of the parameters
        written (as torch's in-place updates do)."""
        counts = bucket.counts
        fresh: list[int] | None = None
        for run, span in zip(runs, advance):
            if span is not None and run[4]:  # these parameters get state now
                fresh = (fresh or []) + list(range(*span))
        _runs.advance_counts(bucket, runs[advanced:], advance[advanced:])
        if len(bucket.opt.state) != bucket.n_state:  # a buffer was allocated: all entries
            bucket.n_state = len(bucket.opt.state)
            fresh = [i for i in range(len(bucket.params)) if counts[i] > 0 or self._eager_state or bucket.mixed]
        if fresh:
            _checkpoint.refresh_entries(self, bucket, fresh)
        _increment_version(_runs.updated_params(bucket, taking_part))
        if bucket.mixed:
            _packing.note_versions(bucket)

    def grad_norm(self, norm_type: float = 2.0) -> float:
        """The global ``norm_type``-norm of every gradient, in one read-only pass per dtype.

        As ``torch.nn.utils.get_total_norm`` over the parameters' grads (None counts as
        zero), accumulated in double over fixed blocks: bit-identical for any thread
        count; inf or nan when a gradient is not finite.
        """
        norm_type = check_norm_type(norm_type)
        name = type(self).__name__
        plans = [_packing.gather(bucket, name) for bucket in self._buckets]
        n_threads = effective_n_threads(self._n_threads)
        for bucket, plan in zip(self._buckets, plans):
            _packing.copy_in(bucket, *plan, n_threads)
        norms = [b.opt.grad_norm(norm_type) for b in self._buckets]
        if norm_type == math.inf:
            return max(norms, default=0.0)
        return float(math.fsum(n ** norm_type for n in norms) ** (1.0 / norm_type))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's own ``zero_grad``: with ``set_to_none`` (the default) every
        ``p.grad`` becomes None, so that autograd hands the next gradient over without a
        copy and a parameter the next backward pass does not reach is skipped by
        ``step()``; otherwise the gradients are zeroed in place. A pending
        :meth:`clip_grad_norm_` factor is dropped with the gradients it measured.

        torch's ``zero_grad`` runs inside a ``record_function`` label and a dynamo-disabled
        frame, which cost more than the loop itself even with no profiler running: 84 us
        against 18 us a call at the top of a training step, for the 18 tensors of the
        benchmark's width-256 MLP (6% of the whole step; Intel Xeon, torch 2.13). So the
        usual call (``set_to_none``, no profiler, not being compiled) runs the loop
        directly, and torch's own ``zero_grad`` runs otherwise: the same gradients end up
        None, and a profiler sees torch's label."""
        self._pending_grad_scale = 1.0
        if not (set_to_none and _CAN_SKIP_WRAPPER) or _profiler_enabled() or _is_compiling():
            super().zero_grad(set_to_none)
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = None

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state in torch.optim's format (see :mod:`flatopt.torch`):
        ``{"state": {id: {...}}, "param_groups": [{..., "params": [ids]}]}`` with ids
        numbering the parameters as torch does; the tensors are copies."""
        return _checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from this class or from the torch.optim optimizer of the same
        name, saved by any torch version (keys added later get the defaults torch's
        ``__setstate__`` gives them). Everything is checked before anything changes."""
        _checkpoint.load_state_dict(self, state_dict)

"""The Optimizer base class: flat buffers, parameter groups, state, state_dict.

A subclass declares its hyperparameters and their defaults, how to check them, which
state buffers a group needs, and how to run its kernel over one group's segment. This
class does the rest once, at construction: normalise parameter groups, pack (or adopt)
the parameters into one flat buffer, allocate gradients and state with the same layout,
and cache the per-group slices, so that ``step()`` is a few attribute reads and one
kernel call per group.
"""

import math
import operator
from collections.abc import Callable, Iterable, Mapping, MutableSequence, Sequence
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from ._dispatch import kernels, specialized
from ._layout import FlatLayout, adopt, aligned_zeros, check_copy, copy_into, resolve_dtype
from ._mixed import MIXED_BLOCK, check_half_grads, half_kind, resolve_master
from ._mixed import HalfLayout as _HalfLayout, split as _split
from ._norms import (ClipGradNormMixin, check_norm_type, combine_partials, flat_norm,
                     norm_partials_buffer)
from ._threads import check_n_threads, effective_n_threads
from ._validation import (FloatArray, KernelGrad, Segment, check_bool, check_fits, check_flat, check_real,
                          check_step, describe, is_real)

#: What an optimizer is constructed from: arrays, or parameter-group dicts (each with a
#: ``"params"`` sequence of arrays and hyperparameter overrides); not a mix of both (that
#: raises). One iterable of either, so that a literal list of group dicts type-checks.
Params = Iterable[npt.NDArray[Any] | Mapping[str, Any]]
#: A gradient given to :meth:`Optimizer.step`: one flat array, or one array per parameter.
Grads = npt.NDArray[Any] | Sequence[npt.NDArray[Any]]

# Internal types.
_Run = tuple[int, int, int, int, bool]  # (gi, lo, hi, step, fresh): see Optimizer._finish_step
_Getter = Callable[[Mapping[str, Any]], tuple[Any, ...]]  # see _tuple_getter
_Half = tuple[np.dtype[Any], int | None]  # (16-bit dtype, kernel kind): see _mixed.half_kind

STATE_DICT_VERSION = 1

# Hyperparameter types whose objects cannot change in place (see Optimizer._prepare); None
# is Keras's "not set" (flatopt.keras's weight_decay), which took the full check every step.
_IMMUTABLE = frozenset({float, int, bool, np.float64, np.float32, np.int64, np.bool_, type(None)})


def _normalize_groups(params: Params) -> list[tuple[list[npt.NDArray[Any]], dict[str, Any]]]:
    """``params`` as a list of (arrays, overrides) pairs, with arrays as ndarrays."""
    if isinstance(params, np.ndarray) or isinstance(params, dict):
        raise TypeError(
            "params must be a sequence of arrays or of parameter-group dicts, "
            f"got {describe(params)}")
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"params must be a sequence of arrays, got {describe(params)}") from None
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    group_dicts = [p for p in items if isinstance(p, dict)]
    if len(group_dicts) != len(items):  # not all dicts
        if group_dicts:
            raise TypeError("params must be all arrays or all parameter-group dicts, not a mix")
        group_dicts = [{"params": items}]
    groups: list[tuple[list[npt.NDArray[Any]], dict[str, Any]]] = []
    for gi, group in enumerate(group_dicts):
        if "params" not in group:
            raise ValueError(f"param_groups[{gi}] must have a 'params' key")
        arrays = group["params"]
        if isinstance(arrays, np.ndarray):
            arrays = [arrays]
        if isinstance(arrays, (str, bytes, dict)) or not hasattr(arrays, "__iter__"):
            raise TypeError(f"param_groups[{gi}]['params'] must be a sequence of arrays, "
                            f"got {describe(arrays)}")
        arrays = list(arrays)
        if not arrays:
            raise ValueError(f"param_groups[{gi}]['params'] is empty")
        for i, a in enumerate(arrays):
            if not isinstance(a, np.ndarray):
                raise TypeError(
                    f"param_groups[{gi}]['params'][{i}] must be a numpy array, got {describe(a)}")
        overrides = {k: v for k, v in group.items() if k != "params"}
        groups.append((arrays, overrides))
    return groups


try:
    from numpy.lib.array_utils import byte_bounds as _byte_bounds
except ImportError:  # NumPy < 2
    _byte_bounds = np.byte_bounds  # type: ignore[attr-defined]  # gone from NumPy 2 (and its stubs)


_TooHardError = getattr(np, "exceptions", np).TooHardError


def _check_disjoint(arrays: Sequence[npt.NDArray[Any]]) -> None:
    """Raise if two parameter arrays share memory (a parameter listed twice, or views of
    one array that overlap): each gets a place of its own in the flat buffer, so they
    would stop sharing it. Arrays whose byte ranges only interleave (``a[::2]`` and
    ``a[1::2]``) are disjoint."""
    spans = sorted(
        (_byte_bounds(a) + (i,) for i, a in enumerate(arrays) if a.size), key=lambda s: s[0])
    active: list[tuple[int, int]] = []  # (end, index) of the spans that may still overlap
    for lo, hi, j in spans:
        active = [(end, i) for end, i in active if end > lo]
        for _, i in active:
            try:
                # (NumPy's stubs admit only max_work -1 and 0; any bound is valid)
                shared = np.shares_memory(arrays[i], arrays[j], max_work=100_000)  # type: ignore[arg-type]
            except _TooHardError:  # strides too intricate to decide quickly: refused
                shared = True
            if shared:
                a, b = sorted((i, j))
                raise ValueError(
                    f"params[{a}] and params[{b}] share memory (a parameter listed twice, or "
                    "overlapping views of one array); each is packed into a place of its own, "
                    "so parameters must not overlap")
        active.append((hi, j))


class Optimizer(ClipGradNormMixin):
    """Base class of flatopt's NumPy optimizers.

    A subclass sets ``_hyperparameters`` (names in constructor order) and
    ``_all_state_names``, implements ``_check(group, where)``, ``_state_names(group)`` and
    ``_update(gi, group, seg, grad, step, grad_scale, n_threads)`` (one kernel call), and
    optionally ``_init_state(name, buffer)``, ``_plain_state`` with
    ``_check_plain_state`` (per-group values, such as SGD's first-step flags) and
    ``_start_run(gi, group, fresh)``. Its ``__init__`` takes torch's arguments plus
    keyword-only ``n_threads=None, dtype=None, adopt=False, master_dtype=None`` and
    passes them on: ``super().__init__(params, defaults, n_threads=n_threads, dtype=dtype,
    adopt=adopt, master_dtype=master_dtype)``. ``_update``'s kernel takes the gradient
    in any of the forms a ``KernelGrad`` has: a flat buffer, a ``kernels.GradTable``
    (gradients read where they are: flatopt.torch) and a ``kernels.HalfGrads`` (with
    ``master_dtype``, 16-bit gradients and parameters around the float32 master and
    state, in the kernel's one pass), so a subclass needs no code of its own for either.
    A step is ``_begin_step`` then ``_finish_step`` (see there); nothing else calls
    ``_update``.
    """

    _hyperparameters: tuple[str, ...] = ()
    #: The index each group has in its owner's groups, for error messages (flatopt.torch:
    #: a bucket holds the groups with parameters of its dtype); None: its own.
    _group_index: list[int] | None = None

    defaults: dict[str, Any]
    #: The parameter groups: dicts of hyperparameters (which may be changed between
    #: steps) and ``"params"``, the group's views into :attr:`flat_params`.
    param_groups: list[dict[str, Any]]
    layout: FlatLayout
    #: Steps skipped by ``step(skip_if_nonfinite=True)``.
    skipped_steps: int

    # Internal state, set by __init__ (and restored by __setstate__).
    _n_threads: int | None
    _half: _Half | None                     # None unless master_dtype (16-bit params)
    _flat_half: npt.NDArray[Any] | None     # the 16-bit params, set together with _half
    _flat_params: FloatArray                # with _half: the float32 master
    _flat_grads: npt.NDArray[Any]           # with _half: 16-bit
    _scratch: FloatArray                    # with _half: see _mixed_scratch
    _adopted: bool
    _params: "_Views"
    _grads: "_Views"
    _group_sizes: list[int]
    _segments: list[tuple[int, int]]        # each group's [start, stop) in the flat buffers
    _segment_views: list[Segment]  # each group's "param", "grad", state buffers (kernel views)
    _state: "_State"
    _norm_partials: npt.NDArray[np.float64] | None
    _getter: _Getter                         # a group's hyperparameters, as a tuple
    _seen_getter: _Getter                    # and its "params" last (_prepare's identity check)
    _validated: list[list[tuple[type, Any]] | None]  # see _prepare_groups
    _seen: list[tuple[Any, ...] | None]               # see _prepare
    _param_lists: list["_Views"]                        # each group's "params", as attached

    def __init__(self, params: Params, defaults: Mapping[str, Any], *, n_threads: int | None = None,
                 dtype: npt.DTypeLike | None = None, adopt: bool = False,
                 master_dtype: npt.DTypeLike | None = None) -> None:
        self._n_threads = check_n_threads(n_threads)
        adopt = check_bool(adopt, "adopt")
        self.defaults = dict(defaults)
        self._check(self.defaults)
        groups = _normalize_groups(params)

        arrays = [a for group_arrays, _ in groups for a in group_arrays]
        # Mixed precision: 16-bit params with a float32 master (see flatopt._mixed).
        half = half_kind(arrays, master_dtype, dtype)
        buffer_dtype = resolve_master(master_dtype) if half else resolve_dtype(arrays, dtype, "params")
        self.layout = FlatLayout(tuple(a.shape for a in arrays), buffer_dtype)
        self.param_groups = []
        for gi, (_, overrides) in enumerate(groups):
            group = {**self.defaults, **overrides}
            self._check_group(group, f"param_groups[{gi}]")
            self.param_groups.append(group)

        self._half = half  # None, or (16-bit dtype, kernel kind)
        if half:
            half_layout = _HalfLayout(half[0])
            if adopt:
                flat16 = _adopt_or_explain(arrays, half_layout)
            else:
                _check_disjoint(arrays)
                flat16 = aligned_zeros(self.layout.size, half[0])
                copy_into(_split(flat16, self.layout), arrays, flat16, "params")
            self._flat_half = flat16
            flat = self.layout.zeros()  # the master: exactly the 16-bit values, widened
            kernels.widen16(flat16.view(np.uint16), flat.view(np.uint32), half[1], 1)
            self._flat_grads = aligned_zeros(self.layout.size, half[0])
            self._scratch = aligned_zeros(0, self.layout.dtype)  # see _mixed_scratch
        else:
            if adopt:
                flat = _adopt_or_explain(arrays, self.layout)
            else:
                _check_disjoint(arrays)
                flat = self.layout.pack(arrays)
            self._flat_half = None
            self._flat_grads = self.layout.zeros()
        self._adopted = adopt
        self._flat_params = flat
        self._make_views()

        self._group_sizes = [len(group_arrays) for group_arrays, _ in groups]
        self._segments, start = [], 0
        for group_arrays, _ in groups:
            stop = start + sum(a.size for a in group_arrays)
            self._segments.append((start, stop))
            start = stop
        self._attach_group_params()

        self._state = _State(self)
        dict.__setitem__(self._state, "step", 0)
        self.skipped_steps = 0            # steps skipped by step(skip_if_nonfinite=True)
        self._pending_grad_scale = 1.0    # set by clip_grad_norm_, used by the next step
        self._norm_partials = None        # scratch for grad_norm, allocated once
        self._getter = _tuple_getter(self._hyperparameters)
        self._seen_getter = _tuple_getter((*self._hyperparameters, "params"))  # see _prepare
        self._forget_validation()
        self._prepare()

    def _make_views(self) -> None:
        """``opt.params`` / ``opt.grads``: views of the flat buffers the model uses."""
        if self._flat_half is not None:  # set together with _half
            self._params = _Views(_split(self._flat_half, self.layout))
            self._grads = _Views(_split(self._flat_grads, self.layout))
        else:
            self._params = _Views(self.layout.split(self._flat_params))
            self._grads = _Views(self.layout.split(self._flat_grads))

    def _attach_group_params(self) -> None:
        """Give each group its ``"params"``: its views of :attr:`params`, read-only, and
        kept (``_param_lists``) so that a step refuses a group whose list was replaced."""
        first = 0
        for group, n in zip(self.param_groups, self._group_sizes):
            group["params"] = _Views(list(self._params[first:first + n]))
            first += n
        self._param_lists = [group["params"] for group in self.param_groups]

    # -- the buffers: read-only attributes (the kernel caches views of them) ---------------
    @property
    def flat_params(self) -> FloatArray:
        """The flat parameter buffer (1-D, 64-byte aligned); update it in place only.

        With ``master_dtype`` this is the 16-bit buffer the model uses (each step rewrites
        it from :attr:`master_params`; writing to it does not change the master)."""
        return self._flat_params if self._flat_half is None else self._flat_half

    @property
    def master_params(self) -> FloatArray | None:
        """The float32 flat master weights the optimizer updates (``master_dtype``), or
        None when the parameters are float32/float64 (they are their own master)."""
        return None if self._flat_half is None else self._flat_params

    @property
    def flat_grads(self) -> FloatArray:
        """The flat gradient buffer the model writes into (through :attr:`grads`)."""
        return self._flat_grads

    @property
    def params(self) -> list[FloatArray]:
        """The parameters: a read-only list of views into :attr:`flat_params` (input order)."""
        return self._params

    @property
    def grads(self) -> list[FloatArray]:
        """The gradients: a read-only list of views into :attr:`flat_grads` (input order)."""
        return self._grads

    @property
    def adopted(self) -> bool:
        """True when the caller's arrays are the parameters (``adopt=True``): ``step()``
        updates them in place. False when they were copied: use :attr:`params`."""
        return self._adopted

    @property
    def state(self) -> dict[str, Any]:
        """The state: ``"step"``, flat arrays of the parameters' layout, and per-group
        values where an optimizer needs them (SGD's ``momentum_buffer_initialized``,
        NAdam's ``mu_product``: a list, one value per group).

        Assigning an array to an existing entry copies it into the live buffer (shape and
        dtype checked), and so do ``update()`` and ``|=``; entries cannot be added or
        removed (use :meth:`load_state_dict`).
        """
        return self._state

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        # Only what ``opt.state |= {...}`` assigns back: the same dict, already updated.
        if value is not self._state:
            raise AttributeError("state cannot be replaced: set its entries (opt.state['exp_avg'] = "
                                 "array copies into the live buffer) or use load_state_dict()")

    # -- copy and pickle: the views are rebuilt over the copied buffers --------------------
    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        # (rebuilt by __setstate__: the views, and what holds them, would pickle copies)
        for key in ("_params", "_grads", "_segment_views", "_param_lists", "_seen"):
            d.pop(key, None)
        d["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        d.setdefault("_half", None)
        d.setdefault("_flat_half", None)
        self.__dict__.update(d)
        if "_seen_getter" not in d:  # pickled before it existed
            self._seen_getter = _tuple_getter((*self._hyperparameters, "params"))
        self._make_views()
        self._attach_group_params()
        self._forget_validation()
        self._prepare()

    def _add_state(self, name: str) -> FloatArray:
        """Allocate (and initialise) the state buffer ``name``; internal."""
        buf = self.layout.zeros()
        self._init_state(name, buf)
        dict.__setitem__(self._state, name, buf)
        return buf

    def _add_needed_state(self) -> None:
        """Allocate the state buffers the groups' hyperparameters need and lack (a flag
        such as ``amsgrad`` turned on)."""
        needed: set[str] = set()
        for group in self.param_groups:
            needed.update(self._state_names(group))
        for name in sorted(needed):
            if name not in self.state:
                self._add_state(name)

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        """Validate ``group``'s hyperparameters, then check they fit the buffers' dtype."""
        self._check(group, where)
        check_fits({k: group[k] for k in self._hyperparameters}, self.layout.dtype, where)

    # -- subclass interface -------------------------------------------------------------
    def _check(self, group: dict[str, Any], where: str = "defaults") -> None:
        """Validate the hyperparameters in ``group`` (a dict); raise naming ``where``."""
        raise NotImplementedError

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state buffers a group with these hyperparameters needs."""
        return ()

    def _init_state(self, name: str, buffer: FloatArray) -> None:
        """Fill a newly allocated state buffer (zeros by default)."""

    def _update(self, gi: int, group: dict[str, Any], seg: Segment, grad: KernelGrad,
                step: int, grad_scale: float, n_threads: int) -> None:
        """Run the kernel on group ``gi``: ``seg`` holds its param and state views."""
        raise NotImplementedError

    # -- hot path -------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Validate groups whose hyperparameters changed and allocate missing state.

        Runs before any write. When nothing changed it costs one C-level identity check
        per group: the hyperparameter objects, and the group's read-only ``"params"`` list,
        are the very ones validated last time (an immutable object that is still there
        cannot have changed). Anything else (a new float from a scheduler, a list of betas,
        a deleted key, a group added, a ``"params"`` replaced) takes the full comparison of
        :meth:`_prepare_groups`.
        """
        groups, seen = self.param_groups, self._seen
        getter, same = self._seen_getter, operator.is_
        try:
            if len(seen) == 1 == len(groups):  # one group, the usual case: no loop (-180 ns)
                objects = seen[0]
                if objects is not None and all(map(same, getter(groups[0]), objects)):
                    return
            elif len(groups) == len(seen):
                for group, objects in zip(groups, seen):
                    if objects is None or not all(map(same, getter(group), objects)):
                        break  # not seen (validated in full, or mutable), changed, or replaced
                else:
                    return
        except (KeyError, TypeError, IndexError):  # a key deleted, not a dict
            pass
        self._prepare_groups()

    def _forget_validation(self) -> None:
        """Make the next :meth:`_prepare` check every group in full."""
        self._validated = [None] * len(self.param_groups)
        self._seen = [None] * len(self.param_groups)

    def _prepare_groups(self) -> None:
        """The full check behind :meth:`_prepare`."""
        changed = False
        if len(self.param_groups) != len(self._segments):
            raise ValueError(f"param_groups must keep its {len(self._segments)} groups; "
                             f"got {len(self.param_groups)} (groups cannot be added or removed)")
        getter = self._seen_getter
        # Remembered only once every group passed and its state exists: a group that
        # passed before a later one raised is checked again, and its new state made, next time.
        validated, seen = list(self._validated), list(self._seen)
        for gi, group in enumerate(self.param_groups):
            values: list[tuple[type, Any]] | None
            try:
                # What is remembered of each validated hyperparameter: its type as well as
                # its value (1 == True, yet only a bool is a valid flag), and a mutable
                # sequence (a list or an array of betas, say) by a copy of its content, so
                # that changing it in place is noticed too (the object itself would always
                # equal itself). Lists, not tuple(genexpr): CPython sizes such a tuple by
                # guessing and resizing, and the resized tuples pile up on its free list
                # (88 bytes a step, up to 2000 steps, seen by tracemalloc in test_safety.py).
                values = [(type(v), v if type(v) in _IMMUTABLE else _content(v))
                          for v in [group[k] for k in self._hyperparameters]]
                same = values == validated[gi]
            except (KeyError, TypeError, ValueError):  # a key deleted, an array assigned
                values, same = None, False
            where = f"param_groups[{gi if self._group_index is None else self._group_index[gi]}]"
            if not isinstance(group, dict):
                raise TypeError(f"{where} must be a dict, got {describe(group)}")
            if group.get("params") is not self._param_lists[gi]:
                raise ValueError(
                    f"{where}['params'] was replaced or removed: the optimizer steps the arrays it was built "
                    "with (its flat buffer's views, opt.params); build a new optimizer for others")
            if not same:
                missing = [k for k in self._hyperparameters if k not in group]
                if missing:
                    raise ValueError(f"{where} lacks {missing}")
                self._check_group(group, where)
                changed = True
            # The objects themselves, for the identity check of the next _prepare, unless
            # one of them can change in place (a list, an array): then always compare.
            # (The last is the group's "params", a read-only _Views: its identity is enough.)
            objects = getter(group)
            immutable = all(type(v) in _IMMUTABLE or (type(v) is tuple and all(type(x) in _IMMUTABLE for x in v))
                            for v in objects[:-1])
            validated[gi] = values
            seen[gi] = objects if immutable else None
        if changed:
            self._add_needed_state()
            self._make_segment_views()
        self._validated, self._seen = validated, seen

    def _make_segment_views(self) -> None:
        # The kernels' own memoryviews (see kernels.as_view): a step passes them without
        # a buffer request. 16-bit gradients stay arrays (the step wraps them, HalfGrads).
        view = specialized(self.layout.dtype).as_view
        grads = self._flat_grads
        own_dtype = grads.dtype == self.layout.dtype
        self._segment_views = [
            {"param": view(self._flat_params[a:b]),
             "grad": view(grads[a:b]) if own_dtype else grads[a:b],
             **{name: view(buf[a:b]) for name, buf in self.state.items() if isinstance(buf, np.ndarray)}}
            for a, b in self._segments
        ]

    def _check_grads(self, grads: Grads) -> tuple[npt.NDArray[Any] | None, set[int] | None]:
        """Validate :meth:`step`'s ``grads``, writing nothing: ``(array, None)`` for a flat
        array the kernel reads as it is, ``(None, None)`` for :attr:`flat_grads` as it is,
        ``(None, in_place)`` for a list to copy into :attr:`flat_grads` (``in_place`` as
        :func:`check_copy` returns)."""
        if self._pending_grad_scale != 1.0 and not self._is_own_grads(grads):
            raise ValueError(
                "grads: clip_grad_norm_ measured flat_grads, but step() was given other "
                "gradients; clip those instead, or call zero_grad() to drop the clip factor")
        if grads is self.grads:
            return None, None
        if isinstance(grads, np.ndarray):
            if self._half:
                check_half_grads(grads, self._half[0], self.layout.size)
            else:
                check_flat(grads, "grads", dtype=self.layout.dtype, size=self.layout.size, writable=False)
            if grads is not self.flat_grads:
                for name, buf in self._buffers().items():
                    if np.may_share_memory(grads, buf):
                        raise ValueError(f"grads must not share memory with {name}")
            return grads, None
        if not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads must be None, a list of arrays or a flat array, got {describe(grads)}")
        if len(grads) != len(self.grads):
            raise ValueError(f"grads must have {len(self.grads)} arrays (one per parameter), got {len(grads)}")
        if all(g is v for g, v in zip(grads, self.grads)):
            return None, None
        for i, (g, shape) in enumerate(zip(grads, self.layout.shapes)):
            if not isinstance(g, np.ndarray):
                raise TypeError(f"grads[{i}] must be a numpy array, got {describe(g)}")
            if not is_real(g.dtype):  # (copied into flat_grads: converted to its dtype)
                raise TypeError(f"grads[{i}] must have a real (float or integer) dtype, got {g.dtype}")
            if g.shape != shape:
                raise ValueError(f"grads[{i}] must have shape {shape}, got {g.shape}")
        # A view of flat_grads at another parameter's place (swapped views) is refused.
        return None, check_copy(self.grads, grads, self.flat_grads, "grads", "flat_grads")

    def _buffers(self) -> dict[str, npt.NDArray[Any]]:
        return {"params": self.flat_params, "master_params": self._flat_params,
                **{f"state[{k!r}]": v for k, v in self.state.items() if isinstance(v, np.ndarray)}}

    def _detached(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` with every array that may share memory with a buffer of this
        optimizer copied: copied into several buffers in turn, a source that is another
        one's destination (two state entries swapped, say) would be overwritten before
        it is read."""
        live = self._buffers().values()
        return {k: v.copy() if isinstance(v, np.ndarray) and any(np.may_share_memory(v, b) for b in live)
                else v for k, v in values.items()}

    # -- the step routine ------------------------------------------------------------------
    # Every front end takes a step through the two halves of this one routine, in order:
    #
    #   grad_scale = opt._begin_step(grad_scale, skip_if_nonfinite)   # checks, no write
    #   ... the front end validates its gradients and places them in flat_grads ...
    #   taken = opt._finish_step(flat_grad, runs, grad_scale, skip_if_nonfinite, n_threads)
    #
    # step() below is one front end; flatopt.torch's adapters (which pass runs of
    # parameters sharing a step count) are the other. Nothing else calls _update.
    def _begin_step(self, grad_scale: float, skip_if_nonfinite: bool) -> float:
        """First half of the step routine: validate, write nothing.

        Checks ``grad_scale`` (a finite real that fits the buffers' dtype) and
        ``skip_if_nonfinite`` (a bool), then :meth:`_prepare`: hyperparameters of groups
        that changed since the last step are validated (and checked to fit the dtype), and
        state buffers they need are allocated. Returns ``grad_scale`` as a float.
        """
        if type(grad_scale) is not float or grad_scale != 1.0:
            grad_scale = check_real(grad_scale, "grad_scale")
            check_fits({"grad_scale": grad_scale}, self.layout.dtype, "step")
        if skip_if_nonfinite is not False:
            check_bool(skip_if_nonfinite, "skip_if_nonfinite")
        self._prepare()
        return grad_scale

    def _finish_step(self, flat_grad: KernelGrad, runs: Iterable[_Run] | None,
                     grad_scale: float, skip_if_nonfinite: bool, n_threads: int,
                     before_run: Callable[[int, dict[str, Any], int], object] | None = None,
                     ) -> bool:
        """Second half of the step routine: the writes. Returns False if skipped.

        ``flat_grad`` is the validated flat gradient, or (with ``runs``, and not
        ``skip_if_nonfinite``) a ``kernels.GradTable`` of the same length (of 16-bit
        gradients with 16-bit params). With 16-bit params the kernels read it through a
        ``kernels.HalfGrads``, which also writes the 16-bit params: one pass. The factor left by
        :meth:`clip_grad_norm_` multiplies ``grad_scale`` and is consumed (it belongs to
        one step). With ``skip_if_nonfinite`` an inf/NaN gradient skips the step (counted
        in :attr:`skipped_steps`, nothing else written). Then the kernel runs:

        * ``runs is None``: once per group over its whole segment, at step
          ``state["step"] + 1``, which then advances;
        * otherwise once per ``(gi, lo, hi, step, fresh)``: elements ``[lo, hi)`` of group
          ``gi`` (a run of parameters that share a step count), at 1-based ``step``;
          ``fresh`` says these parameters have no state yet, and sets the group's
          first-step flags through :meth:`_start_run`. ``state["step"]`` is left alone
          (the caller keeps per-parameter counts). ``before_run(gi, group, step - 1)``,
          if given, is called before each run's kernel call (per-run state of the caller).
        """
        pending = self._pending_grad_scale
        if pending != 1.0:
            grad_scale *= pending
            self._pending_grad_scale = 1.0
        if skip_if_nonfinite:  # reads a flat buffer (never a GradTable)
            assert isinstance(flat_grad, np.ndarray)
            if self._count_nonfinite(flat_grad, n_threads):
                self.skipped_steps += 1
                return False
        if self._half:  # one pass (see kernels.HalfGrads): widen, step, narrow per piece
            assert self._flat_half is not None and not isinstance(flat_grad, kernels.HalfGrads)
            grad16 = flat_grad.view(np.uint16) if isinstance(flat_grad, np.ndarray) else flat_grad
            flat_grad = kernels.HalfGrads(grad16, self._flat_half.view(np.uint16), self._half[1])
        if runs is None:
            state = self._state
            step: int = state["step"] + 1
            update = self._update
            if flat_grad is self._flat_grads:
                views = self._segment_views
                if len(views) == 1:  # one group, the usual case: no loop (-140 ns)
                    seg = views[0]
                    update(0, self.param_groups[0], seg, seg["grad"], step, grad_scale, n_threads)
                else:
                    gi = 0
                    for group, seg in zip(self.param_groups, views):
                        update(gi, group, seg, seg["grad"], step, grad_scale, n_threads)
                        gi += 1
            else:
                for gi, (group, seg, (a, b)) in enumerate(zip(self.param_groups, self._segment_views,
                                                              self._segments)):
                    update(gi, group, seg, flat_grad[a:b], step, grad_scale, n_threads)
            dict.__setitem__(state, "step", step)
            return True
        own = flat_grad is self._flat_grads
        segments = self._segments
        buffers: dict[str, npt.NDArray[Any]] | None = None
        for gi, lo, hi, step, fresh in runs:
            group = self.param_groups[gi]
            if segments[gi] == (lo, hi):  # a whole group: its cached views
                seg = self._segment_views[gi]
                grad = seg["grad"] if own else flat_grad[lo:hi]
            else:
                if buffers is None:
                    buffers = {"param": self._flat_params,
                               **{k: v for k, v in self._state.items() if isinstance(v, np.ndarray)}}
                seg = {k: v[lo:hi] for k, v in buffers.items()}
                grad = flat_grad[lo:hi]
            self._start_run(gi, group, fresh)
            if before_run is not None:
                before_run(gi, group, step - 1)
            self._update(gi, group, seg, grad, step, grad_scale, n_threads)
        return True

    def _count_nonfinite(self, flat_grad: npt.NDArray[Any], n_threads: int) -> int:
        """How many elements of ``flat_grad`` (16-bit with ``master_dtype``) are inf or NaN."""
        if self._half:
            return int(kernels.count_nonfinite16(flat_grad.view(np.uint16), self._half[1], n_threads))
        return int(kernels.count_nonfinite(flat_grad, n_threads))

    def _mixed_scratch(self, block: int) -> FloatArray:
        """The float32 scratch buffer for blocks of ``block`` elements (grown once)."""
        n = min(block, self.layout.size)
        if self._scratch.shape[0] < n:
            self._scratch = aligned_zeros(n, self.layout.dtype)
        return self._scratch

    def _start_run(self, gi: int, group: dict[str, Any], fresh: bool) -> None:
        """Set group ``gi``'s first-step flags for a run whose parameters are ``fresh``
        (have no state yet). Only optimizers with such flags (SGD) override this."""

    def step(self, grads: Grads | None = None, *, grad_scale: float = 1.0,
             skip_if_nonfinite: bool = False) -> bool:
        """Take one optimization step over every parameter: one kernel call per group.

        ``grads``: None uses :attr:`flat_grads`; a list of arrays shaped like the
        parameters is copied into :attr:`flat_grads` (unless it is :attr:`grads` itself);
        a 1-D array of the flat length and dtype is read directly (it may be read-only).
        ``grad_scale`` multiplies every gradient on the fly (loss-scale unscaling,
        averaging, clipping) without an extra pass; a factor set by
        :meth:`clip_grad_norm_` multiplies it once more (it measured :attr:`flat_grads`,
        so passing other ``grads`` after clipping raises).

        With ``skip_if_nonfinite``, a gradient holding inf or NaN skips the step: params
        and state stay bit-identical, :attr:`skipped_steps` counts it. Returns True when
        the step was taken, False when it was skipped.
        """
        flat, in_place = (None, None) if grads is None else self._check_grads(grads)
        grad_scale = self._begin_step(grad_scale, skip_if_nonfinite)
        if in_place is not None:  # every check passed: now the copy
            copy_into(self.grads, grads, self.flat_grads, "grads", in_place)  # type: ignore[arg-type]
        return self._finish_step(self._flat_grads if flat is None else flat, None, grad_scale,
                                 skip_if_nonfinite, effective_n_threads(self._n_threads))

    def _is_own_grads(self, grads: Grads) -> bool:
        if grads is self._grads or grads is self._flat_grads:
            return True
        return (isinstance(grads, (list, tuple)) and len(grads) == len(self._grads)
                and all(g is v for g, v in zip(grads, self._grads)))

    def grad_norm(self, norm_type: float = 2.0) -> float:
        """The ``norm_type``-norm of :attr:`flat_grads` in one read-only pass.

        Accumulated in double over fixed blocks: bit-identical for any thread count;
        ``inf`` or ``nan`` when any gradient is not finite.
        """
        norm_type = check_norm_type(norm_type)
        partials = self._norm_partials
        if partials is None:
            partials = self._norm_partials = norm_partials_buffer(self.layout.size)
        n_threads = effective_n_threads(self._n_threads)
        if self._half:
            return self._mixed_grad_norm(norm_type, n_threads, partials)
        return flat_norm(self.flat_grads, norm_type, n_threads, partials)

    def _mixed_grad_norm(self, norm_type: float, n_threads: int,
                         partials: npt.NDArray[np.float64]) -> float:
        """:meth:`grad_norm` of 16-bit gradients: the norm of their float32 values, block
        by block through the scratch buffer (blocks are whole ``NORM_BLOCK``s, so the
        partial sums are those of the widened buffer, bit for bit)."""
        assert self._half is not None  # mixed precision
        kind, nb = self._half[1], kernels.NORM_BLOCK
        block = -(-MIXED_BLOCK * max(1, n_threads) // nb) * nb  # whole NORM_BLOCKs
        g16, scratch = self._flat_grads.view(np.uint16), self._mixed_scratch(block)
        for lo in range(0, self.layout.size, block):
            hi = min(lo + block, self.layout.size)
            kernels.widen16(g16[lo:hi], scratch.view(np.uint32), kind, n_threads)
            kernels.norm_partials(scratch[:hi - lo], norm_type,
                                  partials[lo // nb:-(-hi // nb)], n_threads)
        return combine_partials(partials, norm_type)

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero :attr:`flat_grads` in place (the grad views stay valid).

        ``set_to_none`` is accepted for torch compatibility; flat gradients cannot be
        None, so they are zeroed either way. A pending :meth:`clip_grad_norm_` factor is
        dropped with the gradients it measured.
        """
        self._flat_grads.fill(0)
        self._pending_grad_scale = 1.0

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A complete, picklable snapshot: hyperparameters, step count, state buffers, layout.

        With ``master_dtype`` it also carries the float32 master weights
        (``"master_params"``) and the 16-bit parameters' dtype (``"params_dtype"``: it
        must match on loading); the 16-bit parameters are derived from the master then.
        A buffer that a flag turned on since the last step needs (``amsgrad``, say) is
        allocated first, as the next step would, so that the snapshot loads back."""
        try:
            self._add_needed_state()
        except (KeyError, TypeError, ValueError):  # a malformed group: step() will say so
            pass
        d: dict[str, Any] = {
            "optimizer": self._public_name(),
            "version": STATE_DICT_VERSION,
            "layout": self.layout.to_dict(),
            "segments": [list(s) for s in self._segments],
            "param_groups": [{k: _copy_plain(v) for k, v in g.items() if k != "params"}
                             for g in self.param_groups],
            "state": {k: _copy_plain(v) for k, v in self.state.items()},
        }
        if self._half:
            d["master_params"] = self._flat_params.copy()
            d["params_dtype"] = self._half[0].name
        return d

    @classmethod
    def _public_name(cls) -> str:
        """What a state dict names: flatopt's own classes as users import them
        (``flatopt.Adam``, ``flatopt.keras.Adam``: namesakes with other rules), other
        classes (a user's subclass) by their bare name, which a moved module keeps."""
        module = cls.__module__
        if module == "flatopt" or module.startswith("flatopt."):
            return f"{'flatopt.keras' if module == 'flatopt.keras' else 'flatopt'}.{cls.__qualname__}"
        return cls.__qualname__

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Everything is checked before anything changes."""
        d = state_dict
        if not isinstance(d, dict):
            raise TypeError(f"state_dict must be a dict, got {describe(d)}")
        expected = {"optimizer", "version", "layout", "segments", "param_groups", "state"}
        mixed = {"master_params", "params_dtype"}
        # (without "params_dtype": saved before it was recorded, and then not checked)
        allowed = expected | mixed if self._half else expected
        if self._half:
            expected.add("master_params")
        keys = set(d)
        if not expected <= keys <= allowed:
            if keys ^ expected <= mixed and ("master_params" in keys) != bool(self._half):
                raise ValueError(  # all else there: saved with the other precision
                    "state_dict was saved by an optimizer " + ("without" if self._half else "with")
                    + " master_dtype (16-bit parameters with float32 master weights); this one "
                    + ("has 16-bit parameters" if self._half else "has none") + ": create it alike")
            raise ValueError(f"state_dict must have keys {sorted(expected)}, got {sorted(d)}")
        if self._half and d.get("params_dtype", self._half[0].name) != self._half[0].name:
            raise ValueError(f"state_dict was saved with {d['params_dtype']!r} parameters; this optimizer's "
                             f"are {self._half[0].name} (its master rounds to other values)")
        # (the bare class name: saved before names were qualified, and ambiguous then)
        if not isinstance(d["optimizer"], str) or d["optimizer"] not in (self._public_name(), type(self).__name__):
            raise ValueError(f"state_dict is for optimizer {d['optimizer']!r}, not {self._public_name()!r}")
        version = d["version"]
        if type(version) is not int or version != STATE_DICT_VERSION:
            raise ValueError(f"state_dict version must be {STATE_DICT_VERSION}, got {version!r}")
        try:
            layout = FlatLayout.from_dict(d["layout"])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"state_dict layout is invalid: {exc}") from None
        if layout != self.layout:
            summary = [(f"{x.dtype}, {len(x)} arrays, {x.size} elements") for x in (layout, self.layout)]
            if summary[0] == summary[1]:  # the same totals: name the first shape that differs
                i, theirs, mine = next((i, a, b) for i, (a, b) in enumerate(zip(layout.shapes, self.layout.shapes))
                                       if a != b)
                summary = [f"array {i} of shape {theirs}", f"of shape {mine}"]
            raise ValueError(f"state_dict layout ({summary[0]}) does not match this optimizer's ({summary[1]})")
        segments = d["segments"]
        try:
            same = [tuple(operator.index(x) for x in s) for s in segments] == self._segments
        except (TypeError, ValueError):  # not a list of pairs of ints
            same = False
        if not isinstance(segments, list) or not same:
            raise ValueError(f"state_dict segments {d['segments']!r} do not match this optimizer's parameter "
                             f"groups, {[list(x) for x in self._segments]}")
        groups = d["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict must have {len(self.param_groups)} param_groups, got {describe(groups)}")
        for gi, group in enumerate(groups):
            if not isinstance(group, dict) or "params" in group:
                raise ValueError(f"state_dict param_groups[{gi}] must be a dict of hyperparameters")
            missing = set(self._hyperparameters) - set(group)
            if missing:
                raise ValueError(f"state_dict param_groups[{gi}] lacks {sorted(missing)}")
            self._check_group(group, f"state_dict param_groups[{gi}]")
        state = d["state"]
        if not isinstance(state, dict):
            raise TypeError(f"state_dict['state'] must be a dict, got {describe(state)}")
        if "step" not in state:
            raise ValueError("state_dict['state'] lacks 'step'")
        check_step(state["step"], "state_dict['state']['step']", low=0)
        missing_plain = [k for k in self._plain_state if k not in state]
        if missing_plain:
            raise ValueError(f"state_dict['state'] lacks {missing_plain}")
        allowed = self._state_keys()
        for key, value in state.items():
            if key == "step":
                continue
            if key not in allowed:
                raise ValueError(f"state_dict['state'] has unknown entry {key!r} for {type(self).__name__}")
            if key in self._plain_state:
                self._check_plain_state(key, value, len(groups))
            else:
                check_flat(value, f"state_dict['state'][{key!r}]", dtype=self.layout.dtype,
                           size=self.layout.size, writable=False)

        self._check_loaded_state(groups, state)
        if self._half:
            check_flat(d["master_params"], "state_dict['master_params']", dtype=self.layout.dtype,
                       size=self.layout.size, writable=False)

        # Everything is valid: apply.
        loaded = self._detached({**state, "master_params": d.get("master_params")})
        for gi, group in enumerate(groups):
            self.param_groups[gi].update({k: _copy_plain(v) for k, v in group.items()})
        for key in [k for k in self.state if k != "step"]:
            if key not in state:
                dict.__delitem__(self._state, key)
        for key, value in loaded.items():
            if key == "master_params":
                continue
            if key == "step":
                dict.__setitem__(self._state, "step", int(value))
            elif key in self._plain_state:
                dict.__setitem__(self._state, key, _copy_plain(value))
            else:
                if key not in self.state:
                    dict.__setitem__(self._state, key, self.layout.zeros())
                np.copyto(self._state[key], value)
        if self._half:
            assert self._flat_half is not None  # set together with _half
            np.copyto(self._flat_params, loaded["master_params"])
            kernels.narrow16(self._flat_params.view(np.uint32), self._flat_half.view(np.uint16),
                             self._half[1], effective_n_threads(self._n_threads))
        self._forget_validation()
        self._pending_grad_scale = 1.0  # a clip factor belongs to the gradients it measured
        self._prepare()

    def _check_loaded_state(self, groups: list[dict[str, Any]], state: dict[str, Any]) -> None:
        """Raise if a state buffer the loaded groups need is missing from ``state``.

        After the first step every buffer a group's hyperparameters need exists; one
        missing from a checkpoint would silently restart from zeros. Subclasses whose
        buffers are legitimately created later (SGD's momentum) override this.
        """
        if state["step"] == 0:
            return
        for gi, group in enumerate(groups):
            missing = [k for k in self._state_names(group) if k not in state]
            if missing:
                raise ValueError(f"state_dict['state'] lacks {missing}, needed by param_groups[{gi}] "
                                 f"at step {state['step']}")

    # Non-array state entries (per-group flags), declared by subclasses.
    _plain_state: tuple[str, ...] = ()

    def _state_keys(self) -> set[str]:
        return set(self._all_state_names) | set(self._plain_state)

    _all_state_names: tuple[str, ...] = ()

    def _check_plain_state(self, key: str, value: object, n_groups: int) -> None:
        if not isinstance(value, list) or len(value) != n_groups or not all(isinstance(v, bool) for v in value):
            raise ValueError(f"state_dict['state'][{key!r}] must be a list of {n_groups} bools, got {value!r}")

    def __repr__(self) -> str:
        what = (f"{self._half[0]} elements with a {self.layout.dtype} master," if self._half
                else f"{self.layout.dtype} elements")
        lines = [f"{type(self).__name__} ({self.layout.size} {what} in {len(self.layout)} arrays)"]
        for gi, group in enumerate(self.param_groups):
            lines.append(f"  group {gi}: " + ", ".join(
                f"{k}={group[k]!r}" for k in self._hyperparameters))
        return "\n".join(lines)


def _tuple_getter(keys: Sequence[str]) -> _Getter:
    """A C-level callable returning ``group``'s values for ``keys``, as a tuple."""
    return operator.itemgetter(*keys) if len(keys) > 1 else _OneKey(keys[0])


class _OneKey:
    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, group: Mapping[str, Any]) -> tuple[Any]:
        return (group[self.key],)


def _copy_plain(value: object) -> object:
    """A copy of ``value`` if it can change in place (a list, an array), else itself."""
    if isinstance(value, np.ndarray):
        return value.copy()
    return list(value) if isinstance(value, list) else value


def _content(value: object) -> object:
    """``value``'s content if it can change in place (a list, an array), else ``value``."""
    if isinstance(value, np.ndarray):
        return (value.dtype, value.shape, value.tobytes())
    return tuple(value) if isinstance(value, MutableSequence) else value


def _adopt_or_explain(arrays: Sequence[npt.NDArray[Any]], layout: FlatLayout | _HalfLayout,
                      ) -> FloatArray:
    """The flat buffer ``arrays`` are back-to-back views of (``adopt=True``), or raise."""
    flat = adopt(arrays, layout)
    if flat is not None:
        return flat
    for i, a in enumerate(arrays):
        if a.dtype != layout.dtype:
            reason = f"params[{i}] has dtype {a.dtype}, not {layout.dtype}"
            break
        if not a.flags.c_contiguous or not a.flags.writeable:
            reason = f"params[{i}] is not a writable C-contiguous array"
            break
    else:
        reason = "they are not back-to-back views of one flat buffer, in order"
    source = "" if isinstance(layout, _HalfLayout) else "Pass the views returned by flatopt.flatten (in order), or "
    raise ValueError(f"params cannot be adopted (adopt=True): {reason}. {source or 'Pass '}adopt=False to copy "
                     "them and use opt.params")


class _Views(list[FloatArray]):
    """``opt.params`` / ``opt.grads``: a list of the buffer views that cannot be changed
    (the kernel reads the flat buffers; a replaced element would silently not be them).
    Slicing and ``+`` give ordinary lists."""

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("this list of views into the flat buffer is read-only; write into the "
                        "arrays instead (a[...] = values)")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce__(self) -> tuple[type["_Views"], tuple[list[FloatArray]]]:
        return (_Views, (list(self),))


class _State(dict[str, Any]):
    """``opt.state``: a dict whose arrays are the live flat buffers the kernel reads.

    Writing an array to an existing buffer entry copies it in (never rebinds: the kernel
    keeps views of the buffer); ``"step"`` takes an int >= 0 and a per-group flag entry a
    list of bools. Entries cannot be added or removed: the optimizer allocates them.
    """

    __slots__ = ("_opt",)

    def __init__(self, opt: Optimizer) -> None:
        super().__init__()
        self._opt = opt

    def _checked(self, key: str, value: Any) -> Any:
        """``value`` as entry ``key`` takes it, or raise (writing nothing)."""
        opt = self._opt
        if key == "step":
            return check_step(value, "state['step']", low=0)
        if key in opt._plain_state:  # per-group values the subclass declares and checks
            opt._check_plain_state(key, value, len(opt.param_groups))
            return list(value)
        current = self.get(key)
        if not isinstance(current, np.ndarray):
            raise KeyError(f"state[{key!r}]: entries cannot be added ({type(opt).__name__} "
                           f"allocates its state buffers; it has {sorted(self)})")
        if not isinstance(value, np.ndarray) or value.shape != current.shape or value.dtype.kind not in "fiu":
            raise ValueError(f"state[{key!r}] must be set to a real array of shape {current.shape}, "
                             f"got {describe(value)}")
        return value

    def _assign(self, key: str, value: Any) -> None:
        current = self.get(key)
        if isinstance(current, np.ndarray):
            np.copyto(current, value, casting="same_kind")
        else:
            dict.__setitem__(self, key, value)

    def __setitem__(self, key: str, value: Any) -> None:
        self._assign(key, self._checked(key, value))

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Set several entries: all are checked before any is written."""
        items = {k: self._checked(k, v) for k, v in dict(*args, **kwargs).items()}
        for k, v in self._opt._detached(items).items():
            self._assign(k, v)

    def __ior__(self, other: Any) -> "_State":  # type: ignore[override,misc]  # dict's returns a dict
        """``state |= {...}``: as :meth:`update` (dict's own would rebind the buffers)."""
        self.update(other)
        return self

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("state entries cannot be removed; use load_state_dict()")

    __delitem__ = pop = popitem = clear = _refuse

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __reduce__(self) -> tuple[Callable[[Optimizer, dict[str, Any]], "_State"],
                                  tuple[Optimizer, dict[str, Any]]]:
        return (_restore_state, (self._opt, dict(self)))


def _restore_state(opt: Optimizer, items: dict[str, Any]) -> _State:
    state = _State(opt)
    for key, value in items.items():
        dict.__setitem__(state, key, value)
    return state

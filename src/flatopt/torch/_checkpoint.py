"""torch.optim's checkpoint format, and ``opt.state`` as torch's per-parameter mapping.

``opt.state`` is a :class:`StateMap`, a ``defaultdict(dict)`` keyed by parameter, as in
torch: a parameter with state maps to a :class:`ParamState` whose tensors are live views
of the flat state buffers (``step`` is a 0-d view of the bucket's step counts). Everything
that replaces state (``load_state_dict``, ``add_param_group``'s re-pack, copy and pickle,
an entry of ``opt.state`` removed or assigned) goes through :func:`install_state`, which
writes the flat buffers from torch-format entries.
"""

import copy
from collections import defaultdict
from collections.abc import Iterable
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._packing import Bucket, half_known, note_versions

if TYPE_CHECKING:
    from ._base import _FlatOptimizer

# With master_dtype: each 16-bit parameter's float32 master weights, a live entry of its
# state (saved by state_dict(), loaded by load_state_dict(); a checkpoint without it, such
# as torch.optim's, gets the parameter's own values widened).
MASTER = "master_param"


class ParamState(dict[str, Any]):
    """``opt.state[p]`` for a parameter with state: torch's entry, live.

    Its buffer entries (and ``step``) are views of the flat buffers the kernel updates;
    assigning a tensor or number to one copies it in, so the kernel and
    ``state_dict()`` always agree. Other keys (written by hooks, say) are kept as given.
    """

    __slots__ = ("live", "made_for")

    live: set[str]
    made_for: tuple[int, int] | None  # (id of the optimizer, id of the parameter), while live

    def __init__(self) -> None:
        super().__init__()
        self.live = set()
        self.made_for = None

    def detach(self) -> None:
        """Turn this entry into a plain snapshot (its views cloned): what a holder of a
        torch.optim entry keeps when the parameter's state is replaced or removed."""
        for key in self.live:
            dict.__setitem__(self, key, dict.__getitem__(self, key).clone())
        self.live.clear()
        self.made_for = None

    def _set_live(self, key: str, view: torch.Tensor) -> None:
        dict.__setitem__(self, key, view)
        self.live.add(key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self.live:
            view = dict.__getitem__(self, key)
            if isinstance(value, torch.Tensor) and value.shape not in (view.shape, ()):
                raise ValueError(f"state[{key!r}] must have shape {tuple(view.shape)}, got {tuple(value.shape)}")
            with torch.no_grad():
                view.copy_(value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value))
            return
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        if key in self.live:
            raise KeyError(f"state[{key!r}] is a flat-buffer view and cannot be deleted; "
                           "use load_state_dict()")
        dict.__delitem__(self, key)

    def __reduce__(self) -> tuple[type[dict[str, Any]], tuple[dict[str, Any]]]:  # copies and pickles are plain dicts of copies
        return (dict, ({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.items()},))


#: Constructor arguments that are not per group: a group may only repeat the
#: optimizer's (torch's ZeroRedundancyOptimizer copies its defaults into each group), and
#: a loaded checkpoint's groups leave them out.
OPTIMIZER_WIDE = ("n_threads", "master_dtype")

#: ``_FlatOptimizer._set_param_states``'s value for "remove this key".
REMOVE = object()


class StateMap(defaultdict[Any, Any]):
    """``opt.state``: torch's ``defaultdict(dict)`` keyed by parameter (one object for the
    optimizer's life, as torch's).

    A parameter's state lives in the flat buffers the kernel reads, so an entry changed as
    a whole is written through them (:meth:`_FlatOptimizer._set_param_states`): removing
    it (``del``, ``pop``, ``popitem``, ``clear()``) or assigning ``{}`` makes the parameter
    start afresh at its next step, as torch's step does for a parameter without state;
    assigning a filled entry loads it, checked as ``load_state_dict`` checks it. Each such
    edit installs every parameter's state again (as a load does): change many entries in
    one ``update()`` or ``clear()``. Reading the entry of a parameter without state gives
    ``{}``, as a defaultdict does. Copies (``copy()``, ``|``, ``copy.copy``, pickles) are
    plain ``defaultdict(dict)`` objects.
    """

    __slots__ = ("_opt",)

    def __init__(self, opt: "_FlatOptimizer") -> None:
        super().__init__(dict)
        self._opt = opt

    def __missing__(self, key: Any) -> Any:
        value: dict[str, Any] = {}
        dict.__setitem__(self, key, value)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        self._opt._set_param_states({key: value})

    def __delitem__(self, key: Any) -> None:
        if key not in self:
            raise KeyError(key)
        self._opt._set_param_states({key: REMOVE})

    def pop(self, key: Any, *default: Any) -> Any:
        if key not in self:
            if default:
                return default[0]
            raise KeyError(key)
        value = dict.__getitem__(self, key)
        del self[key]  # a live entry is detached first: it keeps its values, as torch's
        return value

    def popitem(self) -> tuple[Any, Any]:
        if not self:
            raise KeyError("popitem(): dictionary is empty")
        key = next(reversed(self))
        return key, self.pop(key)

    def clear(self) -> None:
        self._opt._set_param_states(dict.fromkeys(self, REMOVE))

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._opt._set_param_states(dict(*args, **kwargs))

    def __ior__(self, other: Any) -> "StateMap":
        self.update(other)
        return self

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def copy(self) -> defaultdict[Any, Any]:  # type: ignore[override]
        return defaultdict(dict, self)

    __copy__ = copy  # type: ignore[assignment]

    def __or__(self, other: Any) -> defaultdict[Any, Any]:  # type: ignore[override]
        result = self.copy()
        result.update(other)
        return result

    def __ror__(self, other: Any) -> defaultdict[Any, Any]:  # type: ignore[override]
        result = defaultdict(dict, other)
        result.update(self)
        return result

    def __reduce__(self) -> Any:
        return (defaultdict, (dict,), None, None, iter(dict(self).items()))


def _copied(entry: Any) -> Any:
    """A parameter's entry with its tensors cloned (a plain dict)."""
    if not isinstance(entry, dict):
        return entry
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in entry.items()}


def make_entry(opt: "_FlatOptimizer", bucket: Bucket, i: int, extras: dict[str, Any] | None = None,
               reuse: Any = None) -> ParamState:
    """Parameter ``i`` of ``bucket``'s live state entry, with ``extras`` (other keys):
    ``reuse`` itself, refilled, when it is the live entry this optimizer made for this
    parameter, so that code holding ``opt.state[p]`` keeps seeing it (as in torch, whose
    entries change only when the parameter's state is replaced)."""
    made_for = (id(opt), id(bucket.params[i]))
    if isinstance(reuse, ParamState) and reuse.made_for == made_for:
        entry = reuse
        dict.clear(entry)
        entry.live.clear()
    else:
        entry = ParamState()
        entry.made_for = made_for
    group = bucket.opt.param_groups[bucket.group_of[i]]
    if opt._torch_step:
        entry._set_live("step", bucket.steps[i])
    # A parameter not yet stepped has an entry only for its master (master_dtype); its
    # zero state is torch's fresh state where a step count says so (step 0), but SGD's
    # momentum_buffer would count as history (torch: the first buffer is the gradient).
    if bucket.counts[i] > 0 or opt._eager_state or opt._torch_step:
        for name in bucket.opt._state_names(group):
            if name in bucket.opt.state:
                entry._set_live(name, bucket.state_view(name, i))
    master = bucket.master_view(i)
    if master is not None:
        entry._set_live(MASTER, master)
    for key, view in opt._live_extras(bucket, i).items():
        entry._set_live(key, view)
    for key, value in (extras or {}).items():
        if key not in entry.live:
            dict.__setitem__(entry, key, value)
    return entry


def refresh_entries(opt: "_FlatOptimizer", bucket: Bucket, indices: Iterable[int]) -> None:
    """(Re)make the entries of parameters ``indices``, keeping keys that are not views."""
    state = opt.state
    for i in indices:
        p = bucket.params[i]
        old = state.get(p)
        extras = {k: v for k, v in old.items() if not (isinstance(old, ParamState) and k in old.live)} if old else None
        dict.__setitem__(state, p, make_entry(opt, bucket, i, extras, old))


def torch_defaults(opt: "_FlatOptimizer", saved_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``saved_groups`` (without params) with the keys a checkpoint from another
    torch version lacks filled in as torch's ``__setstate__`` does; for an optimizer
    without a torch twin, from the constructor's defaults."""
    groups = [{**{k: v for k, v in g.items() if k != "params" and k not in OPTIMIZER_WIDE}, "params": []}
              for g in saved_groups]
    torch_class = opt._torch_class
    if torch_class is not None:
        shell = torch_class.__new__(torch_class)
        torch_class.__setstate__(shell, {"defaults": {}, "state": {}, "param_groups": groups})
        groups = shell.param_groups
    else:
        groups = [{**opt._constructor_defaults(), **g} for g in groups]
    for g in groups:
        del g["params"]
        g.update(opt._fixed)  # as torch's AdamW.__setstate__ does
    return groups


def state_dict(opt: "_FlatOptimizer") -> dict[str, Any]:
    """``{"state": {id: entry}, "param_groups": [{..., "params": [ids]}]}``, ids numbered as
    torch numbers them; tensors are copies."""
    for hook in opt._optimizer_state_dict_pre_hooks.values():
        hook(opt)
    param_mappings: dict[int, int] = {}
    start = 0
    param_groups = []
    for group in opt.param_groups:
        param_mappings.update({id(p): i for i, p in enumerate(group["params"], start)
                               if id(p) not in param_mappings})
        packed = {k: v for k, v in group.items() if k != "params"}
        packed["params"] = [param_mappings[id(p)] for p in group["params"]]
        start += len(packed["params"])
        param_groups.append(packed)
    where = {p: (bucket, i) for bucket in opt._buckets for i, p in enumerate(bucket.params)}
    state: dict[Any, Any] = {}
    for key, entry in opt.state.items():
        if isinstance(key, torch.Tensor) and key in where:
            entry = opt._param_state(*where[key], copy=True)
            if entry is not None:
                state[param_mappings[id(key)]] = entry
        else:
            pid = param_mappings[id(key)] if isinstance(key, torch.Tensor) else key
            state[pid] = copy.deepcopy(entry)
    result = {"state": state, "param_groups": param_groups}
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        out = post_hook(opt, result)
        if out is not None:
            result = out
    return result


def load_state_dict(opt: "_FlatOptimizer", state_dict: dict[str, Any]) -> None:
    """Load a checkpoint of this class or of torch.optim's class of the same name (any
    torch version's). Everything is checked, for every dtype's buffers, before anything
    changes."""
    name = type(opt).__name__
    if not isinstance(state_dict, dict):
        raise TypeError(f"{name}: state_dict must be a dict, got {type(state_dict).__name__}")
    state_dict = dict(state_dict)
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    opt._check_param_lists()
    if "shard" in state_dict:
        raise ValueError(f"{name}: this state_dict is one rank's shard of a ShardedOptimizer (it has a "
                         "'shard' key): load it into that rank's ShardedOptimizer, or save a full one "
                         "with consolidate_state_dict() and state_dict()")
    if set(state_dict) != {"state", "param_groups"}:
        raise ValueError(f"{name}: state_dict must have keys 'state' and 'param_groups', got {sorted(state_dict)}")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
        raise ValueError(f"{name}: state_dict must have a list 'param_groups' and a dict 'state'")
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"{name}: loaded state dict has {len(saved_groups)} parameter groups, "
            f"this optimizer has {len(opt.param_groups)}")
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if not isinstance(saved, dict) or "params" not in saved:
            raise ValueError(f"{name}: loaded param_groups[{gi}] must be a dict with 'params'")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{name}: loaded state dict's param_groups[{gi}] has {len(saved['params'])} "
                f"parameters, this optimizer's has {len(group['params'])}")
    groups = torch_defaults(opt, saved_groups)
    for gi, group in enumerate(groups):
        missing = set(opt._numpy_class._hyperparameters) - set(group)
        if missing:
            raise ValueError(f"{name}: loaded param_groups[{gi}] lacks {sorted(missing)}")
        opt._check_group(group, f"loaded param_groups[{gi}]", gi=gi)

    id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                      chain.from_iterable(g["params"] for g in opt.param_groups)))
    entries: dict[Any, Any] = {}
    for pid, entry in saved_state.items():
        if pid not in id_map:
            entries[pid] = entry  # kept as is, as torch does
            continue
        p = id_map[pid]
        if not isinstance(entry, dict):
            raise ValueError(f"{name}: state for parameter {pid} must be a dict")
        entries[p] = check_entry(opt, p, pid, entry)

    # Everything is valid: apply. Groups first, so that the state they need exists.
    for group, loaded in zip(opt.param_groups, groups):
        kept = {k: group[k] for k in ("params", "param_names") if k in group}
        group.clear()
        group.update(loaded)
        for key, value in kept.items():
            if key == "params" or key not in loaded:
                group[key] = value
    opt._install_state(entries, loaded=True)
    opt._pending_grad_scale = 1.0  # a clip factor belongs to the gradients it measured
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def check_entry(opt: "_FlatOptimizer", p: torch.Tensor, pid: Any, entry: dict[str, Any]) -> dict[str, Any]:
    """A saved per-parameter entry, validated, with None values (old torch's
    ``momentum_buffer=None``) dropped."""
    name = type(opt).__name__
    entry = {k: v for k, v in entry.items() if v is not None}
    known = set(opt._numpy_class._all_state_names) | {MASTER}
    for key, value in entry.items():
        if key == "step" and opt._torch_step:
            step = float(value.item() if isinstance(value, torch.Tensor) else value)
            if not step >= 0 or step != int(step):
                raise ValueError(f"{name}: state[{pid}]['step'] must be a whole number >= 0, got {step}")
        elif key in known and (not isinstance(value, torch.Tensor) or value.shape != p.shape
                               or not value.is_floating_point()):
            raise ValueError(
                f"{name}: state[{pid}][{key!r}] must be a floating-point tensor of shape "
                f"{tuple(p.shape)}, got {value!r:.80}")
    opt._check_entry(pid, entry)
    return entry


def install_state(opt: "_FlatOptimizer", entries: dict[Any, Any], loaded: bool = False,
                  known: dict[torch.Tensor, int] | None = None) -> None:
    """Replace all state by ``entries`` (parameter -> torch-format entry; other keys are
    kept as they are): write the flat buffers and the step counts, rebuild ``opt.state``.
    A parameter without an entry starts afresh, as a new parameter does. ``loaded``: from
    a checkpoint, whose masters meet the 16-bit parameters at the next step; ``known``:
    what is known of the masters carried in ``entries`` (``_packing.half_known``; by
    default that of the buckets being refilled), so that a 16-bit parameter written
    since the last step is still reconciled at the next."""
    if known is None:
        known = half_known(opt._buckets)
    for bucket in opt._buckets:
        opt._sync_groups(bucket)
        bucket.opt._begin_step(1.0, False)  # validated already: allocates needed state
    names = set(opt._numpy_class._all_state_names)
    state: defaultdict[Any, Any] = defaultdict(dict)
    for bucket in opt._buckets:
        for key in {k for p in bucket.params for k in entries.get(p, ()) if k in names} - set(bucket.opt.state):
            bucket.opt._add_state(key)
        bucket.opt._forget_validation()
        bucket.opt._prepare()
        fresh: dict[str, np.ndarray[Any, Any]] = {}
        for i, p in enumerate(bucket.params):
            entry = entries.get(p)
            lo, hi = bucket.starts[i], bucket.stops[i]
            for key, buf in bucket.opt.state.items():
                if not isinstance(buf, np.ndarray):
                    continue
                if entry is not None and key in entry:
                    torch.from_numpy(buf[lo:hi]).view(bucket.shapes[i]).copy_(entry[key].detach())
                    continue
                if key not in fresh:
                    fresh[key] = opt._fresh_state(bucket, key)
                buf[lo:hi] = fresh[key][lo:hi]
            master = bucket.master_view(i)
            if master is not None:
                with torch.no_grad():
                    master.copy_(entry[MASTER].detach() if entry is not None and MASTER in entry
                                 else bucket.params[i].detach())
            if opt._torch_step:
                step = (entry or {}).get("step", 0)
                bucket.counts[i] = float(step.item() if isinstance(step, torch.Tensor) else step)
            else:
                bucket.counts[i] = 1 if entry and any(k in entry for k in names) else 0
            if bucket.counts[i] > 0 or opt._eager_state or bucket.mixed:  # a master: always an entry
                # (a master where the parameter has none is kept as given, as torch keeps it)
                own = ("step", MASTER) if bucket.mixed else ("step",)
                extras = {k: v for k, v in (entry or {}).items() if k not in names and k not in own}
                state[p] = make_entry(opt, bucket, i, extras, dict.get(opt._state_map, p))
            elif entry is not None:
                state[p] = dict(entry)
        bucket.n_state = len(bucket.opt.state)
        bucket.uniform = False   # counts were rewritten: the next step plans its runs afresh
        if bucket.mixed:  # a loaded master meets the parameters at the next step
            note_versions(bucket, loaded, known)
        bucket.synced = None
        bucket.usual = None
    for key, value in entries.items():
        if not isinstance(key, torch.Tensor):
            state[key] = value
    dict.clear(opt._state_map)  # the same object: code may hold on to opt.state
    dict.update(opt._state_map, state)

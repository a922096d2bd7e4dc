"""Packing: parameters rebound to views of flat buffers; gradients read where they are.

A :class:`Bucket` holds the parameters of one dtype: a NumPy optimizer that owns one flat
buffer per role (params, grads, state), torch views of those buffers, and per-parameter
step counts. :func:`make_buckets` builds them without touching a parameter;
:func:`bind` then rebinds ``p.data``. Gradients stay where autograd puts them (it *steals*
a fresh gradient into a ``grad`` that is None: no copy, no accumulation). At step time
:func:`gather` validates them and :func:`step_grads` hands them to the kernels:

* as a ``kernels.GradTable`` (:func:`grad_table`): the address of each parameter's
  gradient, which the kernel reads in place, piece by piece, in the same one call per
  run. Bit-identical to reading a flat copy; an Adam step moves 28 bytes a float32
  element instead of 36. 16-bit gradients (16-bit parameters, float32 master) too: the
  kernel widens each piece as it reads it (``kernels.HalfGrads``).
* copied into the flat gradient buffer (:func:`copy_in`, one ``kernels.gather_bytes``
  memcpy call) where something reads that buffer: ``skip_if_nonfinite``'s check,
  and :meth:`grad_norm`.

Why not attach flat-buffer views as ``p.grad`` (as flatopt.torch once did): autograd then
has to *add* every fresh gradient into its view, a read-modify-write pass over the
gradients during backward, plus a Python hook per parameter to re-attach views after
``zero_grad(set_to_none=True)``, plus a pass zeroing the flat buffer. Measured with
``flatopt.bench``'s end-to-end loop (Adam, float32, batch 64, 2 threads, 2-core AMD EPYC,
AVX2; per training step against torch's fused Adam in the same run, 2026-12-04): views
attached 1.03x (219k parameters) and 1.10x (3.2M); gradients copied 0.94x and 1.09x, the
copy costing ~1 ms a step at 3.2M. Reading in place removes that copy: at 3.2M
parameters and 1 thread the step takes 2.7 ms against 4.2 ms copied (torch fused 3.0 ms).
"""

import inspect
import operator
from collections.abc import Callable
from itertools import repeat
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import numpy.typing as npt
import torch

from .._dispatch import kernels
from .._optimizer import Optimizer as NumpyOptimizer
from .._tensor_grads import usual_grads

if TYPE_CHECKING:
    from ._base import _FlatOptimizer


def _fallback_scalar_dtype(is_fused: bool | None = None) -> torch.dtype:
    if is_fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# torch's default dtype for scalar state (``step``); torch's own function is unannotated,
# hence the typed name it is bound to.
_get_scalar_dtype: Callable[[], torch.dtype]
try:
    from torch.optim.optimizer import _get_scalar_dtype as _torch_get_scalar_dtype
    _get_scalar_dtype = _torch_get_scalar_dtype
except ImportError:  # torch < 2.1
    _get_scalar_dtype = _fallback_scalar_dtype

TORCH_DTYPES = (torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)   # with master_dtype=torch.float32


def as_numpy(t: torch.Tensor) -> npt.NDArray[Any]:
    """A NumPy array sharing ``t``'s memory (bfloat16 as ``ml_dtypes.bfloat16``)."""
    t = t.detach()
    if t.dtype != torch.bfloat16:
        return t.numpy()
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError("bfloat16 parameters need the ml_dtypes package: pip install ml-dtypes") from None
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def as_tensor(a: npt.NDArray[Any]) -> torch.Tensor:
    """A tensor sharing NumPy array ``a``'s memory (``ml_dtypes.bfloat16`` as bfloat16)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
_GRAD_OF = operator.attrgetter("grad")
_LAYOUT_OF = operator.attrgetter("layout")
_SIGNATURE_OF = operator.attrgetter("layout", "dtype", "shape")
_VERSION_OF = operator.attrgetter("_version")


def as_python(value: Any, name: str = "a hyperparameter") -> Any:
    """Hyperparameter ``name`` as the NumPy layer takes it: 1-element tensors become floats."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of "
                             f"shape {tuple(value.shape)}")
        return value.item()
    if isinstance(value, (tuple, list)):
        return type(value)(as_python(v, f"{name}[{i}]") for i, v in enumerate(value))
    return value


class ParamList(list[torch.Tensor]):
    """``param_groups[i]["params"]``: the list of a group's parameters, which cannot be
    changed in place (its parameters were packed into flat buffers when the group was
    added; a parameter appended would silently not be stepped). Copies are plain lists."""

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("param_groups[i]['params'] cannot be changed: flatopt.torch packed these "
                        "parameters into flat buffers when the group was added; use "
                        "add_param_group() for new parameters, or build a new optimizer")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce__(self) -> tuple[type[list[torch.Tensor]], tuple[list[torch.Tensor]]]:
        return (list, (list(self),))


def guard_params(groups: list[dict[str, Any]]) -> list[ParamList]:
    """Make each group's ``"params"`` a :class:`ParamList`; return the lists (packed)."""
    for group in groups:
        if type(group["params"]) is not ParamList:
            group["params"] = ParamList(group["params"])
    return [group["params"] for group in groups]


def check_params(groups: list[dict[str, Any]], packed: list[ParamList], name: str) -> None:
    """Raise unless ``groups`` are as many as when packed and each group's ``"params"`` is
    its ``packed`` list, or a list of the same parameters in the same order (then the
    packed one is put back: it cannot change in place)."""
    if len(groups) != len(packed):
        raise ValueError(f"{name}: param_groups must keep its {len(packed)} groups, got "
                         f"{len(groups)}; add groups with add_param_group()")
    for gi, (group, mine) in enumerate(zip(groups, packed)):
        params = group["params"]
        if params is mine:
            continue
        if len(params) != len(mine) or not all(map(operator.is_, params, mine)):
            raise ValueError(
                f"{name}: param_groups[{gi}]['params'] was replaced by another list of "
                "parameters; they were packed into flat buffers when the group was added: use "
                "add_param_group() for new parameters, or build a new optimizer")
        group["params"] = mine


class Bucket:
    """The parameters of one dtype and the NumPy optimizer that owns their buffers."""

    def __init__(self, numpy_opt: NumpyOptimizer, params: list[torch.Tensor], group_map: list[int]) -> None:
        self.opt = numpy_opt
        self.params = params                  # torch parameters, in flat order
        self.group_map = group_map            # NumPy group index -> torch group index
        layout = numpy_opt.layout
        self.shapes = list(layout.shapes)
        self.starts = np.asarray(layout.offsets, dtype=np.int64)
        self.stops = self.starts + np.asarray([int(np.prod(s)) for s in layout.shapes], dtype=np.int64)
        self.ranges: list[tuple[int, int]] = []  # NumPy group index -> (first, stop) param index
        first = 0
        for group in numpy_opt.param_groups:
            self.ranges.append((first, first + len(group["params"])))
            first += len(group["params"])
        self.group_of = np.repeat(np.arange(len(self.ranges)), [b - a for a, b in self.ranges])
        self.mixed = numpy_opt.master_params is not None       # 16-bit params, float32 master
        self.flat_param = as_tensor(numpy_opt.flat_params)   # 16-bit with master_dtype
        self.flat_grad = as_tensor(numpy_opt.flat_grads)
        # What each parameter's gradient must be (see gather): (layout, dtype, shape).
        self.grad_signatures = [(torch.strided, self.flat_grad.dtype, torch.Size(s)) for s in self.shapes]
        self.grad_views = [self.flat_grad[a:b].view(s) for a, b, s in zip(self.starts, self.stops, self.shapes)]
        # For kernels.gather_bytes: where each parameter's gradient goes in the flat buffer
        # (bytes), and where it starts in the concatenation of all gradients.
        self.itemsize = numpy_opt.flat_grads.dtype.itemsize
        self.grad_bytes = numpy_opt.flat_grads.view(np.uint8)
        self.out_offsets = (self.starts * self.itemsize).astype(np.intp)
        self.grad_nbytes = ((self.stops - self.starts) * self.itemsize).astype(np.intp)
        self.byte_starts = np.concatenate(([0], np.cumsum(self.grad_nbytes))).astype(np.intp)
        # For kernels.GradTable: the buffer as 2 sources per parameter, its gradient
        # (elements [starts[i], stops[i])) and the padding after it, read from the flat
        # gradient buffer (zeros: nothing writes there). Parameter i's entry is
        # table_sources[2*i]: its gradient's address in a step, else its flat-buffer place.
        n = len(params)
        self.table_bounds = np.empty(2 * n + 1, dtype=np.intp)
        self.table_bounds[0:2 * n:2] = self.starts
        self.table_bounds[1:2 * n:2] = self.stops
        self.table_bounds[2 * n] = layout.size
        flat_address = numpy_opt.flat_grads.ctypes.data
        self.flat_sources = (flat_address + self.starts * self.itemsize).astype(np.intp)
        self.table_sources = np.empty(2 * n, dtype=np.intp)
        self.table_sources[0::2] = self.flat_sources
        self.table_sources[1::2] = flat_address + self.stops * self.itemsize
        # Whether the kernels read the gradients where they are (16-bit ones too, through
        # a kernels.HalfGrads); every kernel can, the tests compare with the copy.
        self.reads_in_place = True
        self.param_views = [self.flat_param[a:b].view(s) for a, b, s in zip(self.starts, self.stops, self.shapes)]
        # Updates each parameter has received that used its state: torch's state["step"].
        # One tensor; each parameter's state["step"] is a 0-d view of it, and ``counts``
        # is the same memory as a NumPy array for run planning.
        self.steps = torch.zeros(len(params), dtype=_get_scalar_dtype())
        self.counts = self.steps.numpy()
        # torch's version counter of ``steps`` when last seen: flatopt writes ``counts``
        # (NumPy, which leaves it alone), so a change means a step count was written
        # through a state entry (``opt.state[p]["step"].fill_(0)``): see _runs.plan_runs.
        self.steps_version = self.steps._version
        # Other per-parameter scalars of torch's state, arrays of one value per parameter
        # (NAdam's mu_product).
        self.scalars: dict[str, npt.NDArray[Any]] = {}
        # dirty[i]: grad view i may hold values since the flat buffer was last zeroed.
        self.dirty = np.zeros(len(params), dtype=bool)
        self.data_ptrs: list[int] = []
        self.all_taking_part = np.ones(len(params), dtype=bool)  # read-only by convention
        self.index = {p: i for i, p in enumerate(params)}
        # Element bounds of each NumPy group, and whether every group's parameters share
        # one step count (then a step is one run per group; see _runs.plan_runs).
        self.group_bounds = [(int(a), int(b)) for a, b in numpy_opt._segments]
        self.uniform = False
        # the torch groups' hyperparameter objects last copied
        self.synced: list[tuple[Any, ...]] | None = None
        # the runs of the usual step while it can be taken (see _FlatOptimizer._arm)
        self.usual: list[tuple[int, int, int, int, tuple[int, int] | None]] | None = None
        self.n_state: int | None = None  # how many state entries opt.state's entries were made for
        # With master_dtype: the parameters' torch version counters when the float32 master
        # last agreed with them (-1: to be checked at the next step), the usual steps since
        # (each bumps every counter by one; parameters sharing a counter bump it more, which
        # only sends the next step the general way), and the sum the counters should have
        # now (counters only grow: an equal sum means none moved); see reconcile_master.
        self.half_versions: list[int] | None = None
        self.half_bumps = 0
        self.half_total = -1

    def state_view(self, name: str, i: int) -> torch.Tensor:
        a, b = self.starts[i], self.stops[i]
        return torch.from_numpy(self.opt.state[name][a:b]).view(self.shapes[i])

    def master_view(self, i: int) -> torch.Tensor | None:
        """Parameter ``i``'s float32 master weights (``master_dtype``), or None."""
        master = self.opt.master_params
        if master is None:
            return None
        return torch.from_numpy(master[self.starts[i]:self.stops[i]]).view(self.shapes[i])


def note_versions(bucket: Bucket, loaded: bool = False, known: dict[torch.Tensor, int] | None = None) -> None:
    """Record that the master agrees with the 16-bit parameters as they are now (see
    :func:`reconcile_master`), except: with ``loaded`` (a checkpoint's masters, to be
    checked at the next step, as the model may be loaded after the optimizer), and for
    the parameters in ``known`` (:func:`half_known` of the buckets their masters came
    from: still to be checked where they were written since)."""
    versions = list(map(_VERSION_OF, bucket.params))
    if loaded:
        versions = [-1] * len(versions)
    elif known:
        versions = [known.get(p, v) for p, v in zip(bucket.params, versions)]
    bucket.half_versions = versions
    bucket.half_bumps = 0
    bucket.half_total = sum(versions)


def half_known(buckets: list[Bucket]) -> dict[torch.Tensor, int]:
    """Each 16-bit parameter of ``buckets``: the version counter its master agrees with
    (-1: still to be checked), to carry over when its state is installed again."""
    known: dict[torch.Tensor, int] = {}
    for b in buckets:
        if b.mixed and b.half_versions is not None:
            for p, v, ptr in zip(b.params, b.half_versions, b.data_ptrs):
                # (``p.data`` replaced, which no counter sees: its new values win too)
                known[p] = v + b.half_bumps if v >= 0 and p.data_ptr() == ptr else -1
    return known


def half_unchanged(bucket: Bucket) -> bool:
    """Whether no 16-bit parameter was written since :func:`note_versions` (and the
    usual steps since): one C-level pass summing the version counters."""
    total: int = sum(map(_VERSION_OF, bucket.params))
    return total == bucket.half_total


def reconcile_master(bucket: Bucket) -> None:
    """With ``master_dtype``: make the float32 master agree with 16-bit parameters written
    by other code since the last step (``model.load_state_dict``, ``p.mul_(0)`` under
    ``no_grad``: torch's version counter tells), and after a checkpoint was loaded. Each
    element of the master is kept where it still rounds to the parameter (its extra bits
    are the optimizer's, bit-exact resumption) and becomes the parameter, widened,
    elsewhere: the kernel writes the parameters from the master, so a stale master would
    silently undo such a write, where torch.optim would step from it."""
    if half_unchanged(bucket):
        return
    versions = list(map(_VERSION_OF, bucket.params))
    known, bumps = bucket.half_versions, bucket.half_bumps
    with torch.no_grad():
        for i, p in enumerate(bucket.params):
            if known is None or known[i] < 0 or versions[i] != known[i] + bumps:
                master, half = bucket.master_view(i), p.detach()
                assert master is not None
                stale = master.to(half.dtype).view(torch.int16) != half.view(torch.int16)
                if bool(stale.any()):
                    master[stale] = half[stale].to(torch.float32)
    note_versions(bucket)


def check_param(p: torch.Tensor, where: str, name: str, master_dtype: torch.dtype | None = None) -> None:
    """Raise if ``p`` cannot live in a flat buffer (device, layout, dtype, sparse grad)."""
    if p.device.type != "cpu":
        raise ValueError(f"{where} is on device {p.device}; flatopt.torch runs on the CPU only")
    if p.layout != torch.strided:
        raise ValueError(f"{where} has layout {p.layout}; only dense (strided) tensors are supported")
    if p.dtype in HALF_DTYPES and master_dtype is None:
        raise TypeError(f"{where} has dtype {p.dtype}: 16-bit parameters need float32 master "
                        "weights, pass master_dtype=torch.float32")
    if p.dtype not in TORCH_DTYPES + HALF_DTYPES:
        raise TypeError(f"{where} has dtype {p.dtype}; flatopt.torch supports float32 and float64 "
                        "(float16 and bfloat16 with master_dtype=torch.float32)")
    if p.grad is not None and p.grad.layout != torch.strided:
        raise RuntimeError(f"{where}: {name} does not support sparse gradients")


def make_buckets(opt: "_FlatOptimizer") -> list[Bucket]:
    """One :class:`Bucket` per dtype for ``opt.param_groups``: validated and allocated,
    with every parameter's values copied in, but no parameter rebound yet."""
    name = type(opt).__name__
    numpy_class = opt._numpy_class
    by_dtype: dict[torch.dtype, dict[int, list[torch.Tensor]]] = {}
    seen: set[torch.Tensor] = set()
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            check_param(p, f"{name}: param_groups[{gi}]['params'][{pi}]", name, opt._master_dtype)
            if p in seen:  # listed twice in its group (torch warns): packed once
                continue
            seen.add(p)
            by_dtype.setdefault(p.dtype, {}).setdefault(gi, []).append(p)
    accepted = inspect.signature(numpy_class).parameters
    buckets = []
    for groups in by_dtype.values():
        numpy_groups = [{"params": [as_numpy(p) for p in ps],
                         **opt._hyperparameters(opt.param_groups[gi])} for gi, ps in groups.items()]
        defaults = {k: v for k, v in opt._hyperparameters(opt.defaults).items() if k in accepted}
        half = next(iter(groups.values()))[0].dtype in HALF_DTYPES
        numpy_opt = numpy_class(numpy_groups, n_threads=opt._n_threads,
                                master_dtype=np.float32 if half else None, **defaults)
        numpy_opt._group_index = list(groups)  # errors name the torch group
        buckets.append(Bucket(numpy_opt, [p for ps in groups.values() for p in ps], list(groups)))
    return buckets


def bind(bucket: Bucket) -> None:
    """Rebind every parameter of ``bucket`` to its flat-buffer view (gradients stay where
    they are: ``step()`` reads them)."""
    with torch.no_grad():
        for i, p in enumerate(bucket.params):
            p.data = bucket.param_views[i]
            bucket.data_ptrs.append(p.data_ptr())


def check_still_bound(params: list[torch.Tensor], data_ptrs: list[int], name: str) -> None:
    """Raise if a parameter no longer views the flat buffer it was bound to, in its order
    (its data replaced, or replaced by a transposed view of the same memory)."""
    if list(map(torch.Tensor.data_ptr, params)) != data_ptrs or not all(map(torch.Tensor.is_contiguous, params)):
        for p, ptr in zip(params, data_ptrs):
            if p.data_ptr() != ptr or not p.is_contiguous():
                raise RuntimeError(
                    f"{name}: a parameter of shape {tuple(p.shape)} no longer views the optimizer's "
                    "flat buffer in its order (was p.data replaced, e.g. by module.to() or by a "
                    "transposed view?); create the optimizer after such changes")


def usual_table(bucket: Bucket) -> Any:
    """The ``kernels.GradTable`` of the usual step, or None when it is not one: every
    parameter still views its flat buffer and has a contiguous gradient of its own
    layout, dtype and shape (checked in one C loop, ``_tensor_grads.usual_grads``)."""
    grads = usual_grads(bucket.params, bucket.data_ptrs, bucket.grad_signatures, bucket.table_sources)
    if grads is None:
        return None
    # The table keeps `grads` (and so every source) alive while a kernel reads it.
    return kernels.GradTable(bucket.table_bounds, bucket.table_sources, bucket.itemsize, grads)


def gather(bucket: Bucket, name: str) -> tuple[npt.NDArray[np.bool_], list[torch.Tensor]]:
    """Which parameters take part in this step (their ``grad`` is not None), and those
    gradients, validated; nothing is written."""
    grads = usual_grads(bucket.params, bucket.data_ptrs, bucket.grad_signatures, bucket.table_sources)
    if grads is not None:
        return bucket.all_taking_part, grads
    params = bucket.params
    check_still_bound(params, bucket.data_ptrs, name)
    grads = list(map(_GRAD_OF, params))
    if any(map(operator.is_, grads, repeat(None))):  # not `None in grads`: that calls Tensor.__eq__
        taking_part = np.fromiter(map(operator.is_not, grads, repeat(None)), bool, len(grads))
        shapes = [s for s, t in zip(bucket.shapes, taking_part) if t]
        grads = [g for g in grads if g is not None]
        expected = [e for e, t in zip(bucket.grad_signatures, taking_part) if t]
    else:
        taking_part, shapes, expected = bucket.all_taking_part, bucket.shapes, bucket.grad_signatures
    # Layout, dtype and shape of every gradient in one pass (one C-level loop, not three).
    if list(map(_SIGNATURE_OF, grads)) != expected:
        if not all(map(operator.is_, map(_LAYOUT_OF, grads), repeat(torch.strided))):
            raise RuntimeError(f"{name} does not support sparse gradients")
        # torch's grad setter checks shape and dtype; `p.grad.data = ...` can still change them.
        dtype = bucket.flat_grad.dtype
        for g, shape in zip(grads, shapes):
            if g.shape != shape or g.dtype != dtype:
                raise RuntimeError(f"{name}: a gradient of shape {tuple(g.shape)} and dtype {g.dtype} "
                                   f"does not match its parameter ({tuple(shape)}, {dtype})")
    if not all(map(torch.Tensor.is_contiguous, grads)):  # a user's strided gradient: one copy
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    return taking_part, grads


def grad_table(bucket: Bucket, taking_part: npt.NDArray[np.bool_], grads: list[torch.Tensor]) -> Any:
    """A ``kernels.GradTable`` through which the kernels read the ``grads`` (contiguous,
    validated by :func:`gather`) of the parameters ``taking_part`` where they are; the
    others' entries point at the flat buffer (their elements are never in a run)."""
    addresses = np.fromiter(map(torch.Tensor.data_ptr, grads), np.intp, len(grads))
    sources = bucket.table_sources
    if taking_part is bucket.all_taking_part:
        sources[0::2] = addresses
    else:
        own = bucket.flat_sources.copy()
        own[taking_part] = addresses
        sources[0::2] = own
    # The table keeps `grads` (and so every source) alive while a kernel reads it.
    return kernels.GradTable(bucket.table_bounds, sources, bucket.itemsize, grads)


def step_grads(bucket: Bucket, taking_part: npt.NDArray[np.bool_], grads: list[torch.Tensor],
               n_threads: int, flat: bool) -> Any:
    """The gradient argument of this bucket's step: a :func:`grad_table` when its kernels
    read gradients in place, else (or if ``flat``) its flat buffer after :func:`copy_in`."""
    if bucket.reads_in_place and not flat:
        return grad_table(bucket, taking_part, grads)
    copy_in(bucket, taking_part, grads, n_threads)
    return bucket.opt.flat_grads


def copy_in(bucket: Bucket, taking_part: npt.NDArray[np.bool_], grads: list[torch.Tensor],
            n_threads: int) -> None:
    """Make the flat gradient buffer hold exactly the parameters' gradients: the ``grads``
    (contiguous, validated by :func:`gather`) of the parameters ``taking_part`` copied in
    with one ``kernels.gather_bytes`` call, zeros for the others (a None gradient counts as
    zero in norms and finiteness checks; the step skips those parameters either way)."""
    out_offsets, starts = bucket.out_offsets, bucket.byte_starts
    if taking_part is not bucket.all_taking_part:
        flat = bucket.opt.flat_grads
        for i in np.flatnonzero(~taking_part & bucket.dirty):
            flat[bucket.starts[i]:bucket.stops[i]] = 0
        out_offsets = out_offsets[taking_part]
        starts = np.concatenate(([0], np.cumsum(bucket.grad_nbytes[taking_part]))).astype(np.intp)
    # `grads` keeps every source alive through the call.
    sources = np.fromiter(map(torch.Tensor.data_ptr, grads), np.intp, len(grads))
    kernels.gather_bytes(bucket.grad_bytes, sources, out_offsets, starts, bucket.itemsize, n_threads)
    bucket.dirty |= taking_part

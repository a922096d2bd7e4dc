"""ZeRO-style sharded optimizer state over flat buffers, on ``torch.distributed``.

``ShardedOptimizer(params, optimizer_class, *, process_group=None, average_gradients=True,
**defaults)`` trains data-parallel across processes (and hosts) with each rank keeping
optimizer state for one contiguous slice of the model only::

    import torch.distributed as dist
    from flatopt.torch import Adam
    from flatopt.torch.distributed import ShardedOptimizer

    dist.init_process_group("gloo")                     # torchrun sets rank and world size
    model = make_model()                                # the same model on every rank
    opt = ShardedOptimizer(model.parameters(), Adam, lr=1e-3)
    for x, y in my_shard_of_the_data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()                 # no DDP needed
        opt.step()          # average grads, fused Adam on this rank's slice, share params

How it works
------------
At construction the parameters are copied into one flat, 64-byte-aligned buffer per dtype
(padded to a multiple of the world size) and rebound to views of it, as ``flatopt.torch``
does; gradients get a flat buffer of the same layout that autograd accumulates into.
Rank ``r`` owns elements ``[r*c, (r+1)*c)`` of each buffer, ``c`` the padded length over the
world size rounded up to a cache line (16 float32 or 8 float64 elements), so each rank's
slice starts on its own cache line. The slice cuts through parameters: a parameter may be
split between ranks. The *local optimizer*, an ordinary ``optimizer_class`` instance, is
built over 1-D views of the parameter pieces in this rank's slice (its parameter groups
mirror yours), so it keeps state only for the slice: optimizer-state memory is divided by
the world size. ``step()`` is

1. one small all-gather (a byte per parameter) in which the ranks agree which parameters
   have a gradient on some rank (a parameter whose grad is None on every rank is skipped,
   as torch.optim skips it), that no rank failed its checks and that all have the same
   hyperparameters, overlapped with
2. the reduction of each flat gradient buffer into its owners' slices (a reduce-scatter,
   or on gloo one reduce per rank: see Collectives), the average taken inside the kernel
   (``grad_scale = 1/world_size``, no extra pass), when ``average_gradients`` is True;
3. the local optimizer's step on the slice: for ``flatopt.torch`` classes one fused kernel
   call per parameter group and dtype;
4. the all-gather of each flat parameter buffer (on gloo one broadcast per rank), so that
   every rank ends the step with bit-identical parameters.

With ``average_gradients=False`` step 2 is skipped and each rank reads its slice of the
gradients as they are: use it when they are already averaged, for example under
:class:`torch.nn.parallel.DistributedDataParallel`.

Collectives
-----------
Which collectives move the data depends on the backend, and ``repr()`` and
:attr:`ShardedOptimizer.collectives` say which were picked (once, at construction, by
trying each on tiny tensors):

* gloo (the CPU backend): one ``reduce`` of each chunk of the gradient to its owner and one
  ``broadcast`` of each chunk of the parameters from its owner (issued together, waited
  together). These move the least data and are gloo's fastest collectives per byte:
  measured with torch 2.13 on 2 and 4 processes, gloo's ``reduce_scatter`` and
  ``all_gather`` are 2 to 4 times slower, slower even than its ``all_reduce``. The
  gradient is reduced in place: afterwards ``p.grad`` holds the sum over ranks in this
  rank's chunk (the step divides by the world size inside the kernel) and unspecified
  values elsewhere, until ``zero_grad()``. So call ``zero_grad()`` (the optimizer's or the
  model's) between steps: a ``step()`` whose gradients are still those a step reduced in
  place (two steps on one backward pass, or a backward pass accumulating onto them) raises
  on every rank and changes nothing, where torch.optim would reuse ``p.grad``.
* other backends (NCCL and the like): ``reduce_scatter_tensor`` of the gradient into this
  rank's slice and ``all_gather_into_tensor`` of the parameters (under their newer names
  ``reduce_scatter_single``/``all_gather_single`` where torch has them); where a backend
  lacks them, ``all_reduce`` for the gradient and ``all_gather`` into views of the buffer,
  or one ``broadcast`` per rank, for the parameters.

Guarantees and agreement
------------------------
* After every ``step()`` all ranks hold bit-identical parameters (every slice is written
  from its owner's copy).
* Bad input gives the same clear error on every rank before any collective that could
  hang: at construction the ranks first exchange what they were given (parameter shapes
  and dtypes per group, hyperparameters, local errors such as a parameter not on the CPU)
  and all raise if any rank failed or the lists differ; in ``step()`` a rank whose
  gradients fail their checks (a replaced ``p.data``, a gradient of the wrong shape, a
  sparse gradient) makes every rank raise through the agreement of point 1, before any
  parameter or optimizer state changes (``p.grad`` may already hold reduced sums: the
  next ``step()`` raises until ``zero_grad()`` and the gradients are computed again; a
  closure that raised on one rank counts alike, and there raises its own exception, the
  agreed message added as a note); so do, on every ``step()``, retried or after
  :meth:`clip_grad_norm_`, hyperparameters that differ between ranks (a checksum of their
  values is part of that exchange: equal numbers of other types agree, tensors are
  compared by every value), an invalid hyperparameter (checked on every rank, whether or
  not its slice holds parameters of that group: by flatopt.torch's rules, or by the
  torch.optim class's constructor) and an invalid ``grad_scale``; there the reduced
  gradients are kept, and ``step()`` may be called again once mended. torch.optim checks
  some values only inside its step (``capturable``, ``amsgrad`` turned on mid-run), so
  with a torch.optim class one more small exchange follows the local step: if it failed
  on any rank, every rank raises, with the same (possibly partly updated) parameters.
* ``load_state_dict()`` is a collective too: each rank checks its pieces, and if any
  rank's fail, every rank raises the same error with its state unchanged.
* Gradient clipping and ``skip_if_nonfinite`` agree across ranks: :meth:`grad_norm` and
  :meth:`clip_grad_norm_` compute the global norm of the averaged gradient (each rank its
  slice's partial, exchanged and combined in rank order, so every rank gets the same
  number), and ``step(skip_if_nonfinite=True)`` skips on every rank when any slice holds an
  inf or NaN.

Checkpoints
-----------
``state_dict()`` returns this rank's shard: torch's format with the parameters' global ids,
holding 1-D pieces of the state tensors, plus a ``"shard"`` entry describing the slice.
``consolidate_state_dict(to=0)`` (called on every rank) gathers the shards on rank ``to``,
after which ``state_dict()`` there returns the full, torch-format state dict (until the
next ``step()``): it loads into a single-process ``flatopt.torch`` optimizer and into the
``torch.optim`` optimizer of the same name. Both carry the hyperparameters as they are
when ``state_dict()`` is called (an LR scheduler's last step included). ``load_state_dict(full)`` on every rank takes
this rank's pieces, so a job can resume with another world size; a shard loads back into
the same rank of the same layout.

Differences from a single-process optimizer
-------------------------------------------
* After ``step()`` (or :meth:`grad_norm`), ``p.grad`` holds this rank's own gradient with
  a reduce-scatter, and partly reduced sums with gloo's reduce; never the average (DDP's),
  which exists only inside the kernel.
* ``add_param_group`` after construction is not supported (the partition is fixed).
* Hyperparameters (``param_groups``, LR schedulers) must be changed identically on every
  rank (each rank updates its slice with its own copy); ``step()`` raises on every rank
  when they differ.
* ``optimizer_class`` must update element by element (``flatopt.torch``'s classes and
  torch.optim's SGD, Adam, AdamW, RMSprop, Adadelta, Adagrad, Adamax, NAdam, RAdam): its
  parameters are 1-D pieces of your parameters.
* ``self.state`` is empty: the state lives in :attr:`local_optimizer` (this rank's pieces).

Memory per rank: the parameters and gradients in full (as under DDP, whose buckets add
another copy of the gradients), optimizer state for this rank's slice only, and, for
``flatopt.torch`` classes, which own their buffers, a copy of this rank's slice of the
parameters and gradients (values are copied in before the local step, since the model's
parameters may be changed between steps).
"""

import copy
import inspect
import math
import numbers
import weakref
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, cast, overload

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from .. import functional as _functional
from .._layout import FlatLayout
from .._norms import ClipGradNormMixin, check_norm_type
from .._optimizer import _IMMUTABLE as _IMMUTABLE_NUMBERS
from .._validation import check_bool, check_fits, check_real
from ._packing import ParamList, check_params, check_still_bound, guard_params
from ._base import _FlatOptimizer, hooked_step
from ._checkpoint import OPTIMIZER_WIDE

if TYPE_CHECKING:  # torch.optim's own alias (torch >= 2.2); quoted where used
    from torch.optim.optimizer import ParamsT

__all__ = ["ShardedOptimizer"]

CACHE_LINE = 64  # bytes

# torch.optim classes whose update is elementwise, so that they may run on pieces.
_ELEMENTWISE_TORCH = tuple(getattr(torch.optim, name) for name in (
    "SGD", "Adam", "AdamW", "RMSprop", "Adadelta", "Adagrad", "Adamax", "NAdam", "RAdam")
    if hasattr(torch.optim, name))

# Per-parameter state entries that are scalars, not elementwise (told apart by name only
# for 0-dim parameters, whose elementwise state is 0-dim too).
_SCALAR_STATE = ("step",)

# The newer names where torch has them (not in every version's stubs: typed loosely).
_REDUCE_SCATTER: Callable[..., Any] = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER: Callable[..., Any] = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

#: A piece of the local optimizer: (bucket, global parameter index, start, stop, offset in
#: this rank's slice); start/stop are offsets inside the parameter.
_Piece = tuple["_Bucket", int, int, int, int]
#: What a rank reports in the first exchange: (rank, _describe_error(...), _signature()).
_Report = tuple[int, "tuple[type[BaseException], str] | None", Any]


def _is_elementwise_class(cls: object) -> bool:
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return False
    if cls.__module__.startswith("flatopt.torch"):
        return True
    return any(issubclass(cls, base) for base in _ELEMENTWISE_TORCH)


def chunk_size(n: int, world_size: int, itemsize: int) -> int:
    """Elements per rank for ``n`` elements: ``ceil(n / world_size)`` rounded up to a whole
    number of cache lines, so every rank's slice starts on a cache line."""
    align = max(1, CACHE_LINE // itemsize)
    per_rank = -(-n // world_size)
    return -(-per_rank // align) * align


def _span(tensors: Sequence[torch.Tensor], n: int) -> torch.Tensor | None:
    """One 1-D tensor over ``tensors`` if they lie back to back in one storage, else None."""
    if not tensors:
        return None
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    expected = first.data_ptr()
    for t in tensors:
        if (not t.is_contiguous() or t.untyped_storage().data_ptr() != storage
                or t.data_ptr() != expected):
            return None
        expected += t.numel() * t.element_size()
    span = torch.empty(0, dtype=first.dtype)
    span.set_(first.untyped_storage(), first.storage_offset(), (n,), (1,))
    return span


class StaleWatch:
    """Which gradients a step reduced in place are still those sums (``stale``, one flag
    per parameter, shared by the buckets): after such a step, the bucket's flat gradient
    buffer's version counter (every view shares it) is noted; at the first sight of it
    afterwards (its first gradient hook, or the next step's checks, whichever comes
    first) a changed version means other code rewrote the gradients (zeroed them in
    place: ``model.zero_grad(set_to_none=False)``), and the bucket's flags are cleared;
    an unchanged one, that a backward pass is about to accumulate onto the sums."""

    __slots__ = ("members", "stale", "version")

    def __init__(self, members: list[int], stale: npt.NDArray[np.bool_]) -> None:
        self.members = np.asarray(members, dtype=np.intp)
        self.stale = stale
        self.version: int | None = None

    def mark(self, version: int) -> None:
        self.stale[self.members] = True
        self.version = version

    def clear(self) -> None:
        self.stale[self.members] = False
        self.version = None

    def see(self, version: int) -> None:
        if self.version is not None:
            if version != self.version:
                self.clear()
            self.version = None


class AttachGrad:
    """Gradient hook: give a parameter whose ``grad`` is None its flat-buffer view back,
    zeroed, just before autograd accumulates into it. The sharded optimizer keeps
    gradients in the flat buffer (it reduces them in one collective); the single-process
    optimizers read them where autograd leaves them instead (see ``_packing``)."""

    __slots__ = ("param", "view", "dirty", "watch", "sparse", "index")

    param: "weakref.ref[torch.Tensor]"
    view: torch.Tensor
    dirty: npt.NDArray[np.bool_]
    watch: StaleWatch
    sparse: npt.NDArray[np.bool_]
    index: int

    def __init__(self, param: torch.Tensor, view: torch.Tensor, dirty: npt.NDArray[np.bool_],
                 watch: StaleWatch, sparse: npt.NDArray[np.bool_], index: int) -> None:
        self.param = weakref.ref(param)
        self.view = view
        self.dirty = dirty
        self.watch = watch
        self.sparse = sparse
        self.index = index

    def __call__(self, grad: torch.Tensor) -> None:
        self.watch.see(self.view._version)
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
            self.watch.stale[self.index] = False
            p.grad = self.view


class _Bucket:
    """The parameters of one dtype: flat (padded) parameter and gradient buffers, this
    rank's slice, and the pieces of the local optimizer that lie in it."""

    views: list[torch.Tensor]                        # this slice of flat_param, per piece
    grad_views: list[torch.Tensor]                   # this slice of slice_grad, per piece

    def __init__(self, dtype: torch.dtype, indices: list[int], numels: list[int], world_size: int,
                 rank: int, full_grads: bool) -> None:
        self.dtype = dtype
        self.indices = indices                       # global parameter indices, flat order
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self.n = int(sum(numels))
        self.chunk = chunk_size(self.n, world_size, itemsize)
        padded = self.chunk * world_size
        self.starts = np.concatenate([[0], np.cumsum(numels)[:-1]]).astype(np.int64)
        self.stops = self.starts + np.asarray(numels, dtype=np.int64)
        self.lo = min(rank * self.chunk, self.n)     # this rank's real elements [lo, hi)
        self.hi = min((rank + 1) * self.chunk, self.n)
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype if dtype in (torch.float32, torch.float64) else None

        def zeros(n: int) -> torch.Tensor:
            if np_dtype is not None:   # 64-byte aligned
                return torch.from_numpy(FlatLayout(((n,),), np_dtype).zeros())
            return torch.zeros(n, dtype=dtype)

        self.flat_param = zeros(padded)
        # The whole gradient only when this optimizer reduces it (else just this slice).
        self.flat_grad = zeros(padded) if full_grads else None
        self.slice_grad = zeros(self.chunk)
        self.my_chunk = self.flat_param[rank * self.chunk:(rank + 1) * self.chunk]
        self.offset = dict(zip(indices, self.starts.tolist()))
        self.target: torch.Tensor | None = None      # where this step's reduced slice landed
        # (local piece tensor, global index, start, stop)
        self.pieces: list[tuple[torch.Tensor, int, int, int]] = []
        # Where the local optimizer keeps this rank's slice (see locate()).
        self.piece_ptrs: list[int] | None = None
        self.aliased = True                          # its parameters are views of flat_param
        self.param_span: torch.Tensor | None = None  # else one tensor over them, if contiguous
        self.local_grads: list[torch.Tensor] | None = None  # the gradient tensors it reads
        self.grad_span: torch.Tensor | None = None   # one tensor over those, if contiguous

    def locate(self) -> None:
        """Find where the local optimizer keeps this slice: torch.optim keeps our views of
        the flat buffer; flatopt.torch moves its parameters into buffers of its own and
        (after its first step) reads gradients from its own buffer. Cheap when nothing
        moved; called after construction and after every local step."""
        tensors = [p for p, *_ in self.pieces]
        ptrs = [p.data_ptr() for p in tensors]
        if ptrs != self.piece_ptrs:
            self.piece_ptrs = ptrs
            self.aliased = ptrs == [v.data_ptr() for v in self.views]
            self.param_span = None if self.aliased else _span(tensors, self.hi - self.lo)
        grads = [p.grad for p in tensors]
        if self.local_grads is not None and all(map(lambda a, b: a is b, grads, self.local_grads)):
            return
        present = [g for g in grads if g is not None and g.dim() == 1]
        if len(present) == len(grads):
            self.local_grads = present
            self.grad_span = _span(present, self.hi - self.lo)

    def grad_target(self) -> torch.Tensor:
        """Where the reduce-scatter writes: straight into the local optimizer's gradient
        buffer when it spans a whole chunk, else our slice buffer."""
        span = self.grad_span
        return span if span is not None and span.numel() == self.chunk else self.slice_grad

    def deliver(self, target: torch.Tensor) -> None:
        """Make the reduced slice (written to ``target``) what the local optimizer reads."""
        dest = self.reduced()
        if dest.data_ptr() != target.data_ptr():
            dest.copy_(target[:self.hi - self.lo])

    def reduced(self) -> torch.Tensor:
        span = self.grad_span
        return self.slice_grad[:self.hi - self.lo] if span is None else span

    def read_views(self) -> list[torch.Tensor]:
        """Per piece, the tensor the local optimizer reads its gradient from."""
        # local_grads is set whenever grad_span is (see locate()).
        return self.grad_views if self.grad_span is None or self.local_grads is None else self.local_grads

    def params_in(self) -> None:
        """Copy this slice of the parameters into the local optimizer's memory (they may
        have been changed since the last step)."""
        if self.aliased:
            return
        mine = self.flat_param[self.lo:self.hi]
        if self.param_span is not None:
            self.param_span.copy_(mine)
        else:
            torch._foreach_copy_([p for p, *_ in self.pieces], self.views)

    def gather_input(self) -> torch.Tensor:
        """This rank's chunk for the all-gather: the local optimizer's memory itself when
        it is one whole chunk, else the flat buffer's chunk (updated from it)."""
        if self.aliased:
            return self.my_chunk
        span = self.param_span
        if span is not None and span.numel() == self.chunk:
            return span
        mine = self.flat_param[self.lo:self.hi]
        if span is not None:
            mine.copy_(span)
        else:
            torch._foreach_copy_(self.views, [p for p, *_ in self.pieces])
        return self.my_chunk

    def piece_ranges(self) -> list[tuple[int, int, int]]:
        """(global index, start, stop) of each parameter's part in [lo, hi), in flat order;
        start/stop are offsets inside the parameter."""
        out: list[tuple[int, int, int]] = []
        for k, a, b in zip(self.indices, self.starts, self.stops):
            s, e = max(a, self.lo), min(b, self.hi)
            if s < e:
                out.append((k, int(s - a), int(e - a)))
        return out


class ShardedOptimizer(ClipGradNormMixin, torch.optim.Optimizer):
    """ZeRO-1 over flat buffers: each rank keeps ``optimizer_class`` state for one
    contiguous, cache-line-aligned slice of the parameters (see :mod:`flatopt.torch.distributed`).

    ``params``: the model's parameters (or parameter groups), the same on every rank.
    ``optimizer_class``: an elementwise optimizer, e.g. ``flatopt.torch.Adam``; ``**defaults``
    are its arguments. ``process_group``: default the world. ``average_gradients``: False
    when the gradients are already averaged (under DDP).

    Attributes: :attr:`local_optimizer` (this rank's optimizer over its pieces),
    :attr:`rank`, :attr:`world_size`, :attr:`process_group`, :attr:`collectives`.
    """

    # Collectives a test may declare unsupported, to exercise the fallbacks.
    _disabled_collectives: ClassVar[frozenset[str]] = frozenset()

    process_group: dist.ProcessGroup
    rank: int
    world_size: int
    average_gradients: bool
    collectives: tuple[str | None, str]
    local_optimizer: torch.optim.Optimizer
    skipped_steps: int
    last_step_skipped: bool
    _pending_grad_scale: float
    _consolidated: dict[str, Any] | None
    _reduced: tuple[list[bool], tuple[float, float, int] | None] | None
    _grads_spent: bool
    _checked: list[list[tuple[str, Any]] | None]
    _constructor_args: set[str]
    _params: list[torch.Tensor]
    _group_of: list[int]
    _buckets: list[_Bucket]
    _pieces: list[_Piece]
    _param_lists: list[ParamList]
    _n: int
    _control: torch.Tensor
    _control_out: torch.Tensor
    _grad_scale_arg: bool
    _small_gather: str
    # Per parameter: its view of the flat parameter buffer, and of the flat gradient buffer
    # (None unless average_gradients).
    _param_views: list[torch.Tensor]
    _grad_views: list[torch.Tensor | None]
    _dirty: npt.NDArray[np.bool_]
    # Per parameter: its p.grad view still holds what a step reduced in place (sums or a
    # collective's scratch), not this rank's gradient; cleared where it is given back
    # zeroed (zero_grad, AttachGrad), refilled, or rewritten in place (see StaleWatch).
    _stale: npt.NDArray[np.bool_]
    _watches: list[StaleWatch]   # per bucket
    _sparse: npt.NDArray[np.bool_]
    _data_ptrs: list[int]
    _hooks: list[Any]

    def __init__(self, params: "ParamsT", optimizer_class: type[torch.optim.Optimizer], *,
                 process_group: dist.ProcessGroup | None = None, average_gradients: bool = True,
                 **defaults: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedOptimizer needs torch.distributed initialised "
                               "(torch.distributed.init_process_group) on every rank")
        # group.WORLD is set once init_process_group has run (checked above).
        self.process_group = process_group if process_group is not None else cast(dist.ProcessGroup,
                                                                                  dist.group.WORLD)
        self.rank = dist.get_rank(self.process_group)
        if self.rank < 0:
            raise ValueError("ShardedOptimizer: this process is not a member of process_group")
        self.world_size = dist.get_world_size(self.process_group)
        self.average_gradients = average_gradients
        self._constructing = True
        self._consolidated = None
        self._reduced = None          # (mask, stats) once this step's gradients are reduced
        self._grads_spent = False     # combined with a failed rank's: compute them again
        self._checked = []            # see _check_hyperparameters
        self._pending_grad_scale = 1.0
        self.skipped_steps = 0
        self.last_step_skipped = False
        self._hooks = []

        # 1. Everything local, on fresh memory (your parameters are untouched until all
        #    ranks agree); an error is held back for the exchange.
        error: Exception | None = None
        signature = None
        try:
            check_bool(average_gradients, "average_gradients")
            if not _is_elementwise_class(optimizer_class):
                raise TypeError(
                    f"ShardedOptimizer: optimizer_class must be an elementwise torch.optim.Optimizer "
                    f"subclass (a flatopt.torch class, or torch.optim's "
                    f"{', '.join(c.__name__ for c in _ELEMENTWISE_TORCH)}), got {optimizer_class!r}")
            if isinstance(params, torch.Tensor):
                raise TypeError(f"params must be an iterable of Tensors or dicts, got {torch.typename(params)}")
            # A flatopt.torch class's n_threads and master_dtype are the local optimizer's,
            # not the groups' (they would spread into checkpoints and the classes loading them).
            wide = OPTIMIZER_WIDE if issubclass(optimizer_class, _FlatOptimizer) else ()
            super().__init__(params, {k: v for k, v in defaults.items() if k not in wide})
            self._constructing = False
            self._setup(optimizer_class, defaults)
            signature = self._signature()
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            error = exc
        self._constructing = False

        # 2. The first collective: every rank reaches it, whatever happened above.
        failures, signatures = self._exchange_errors(error, signature)
        if failures:
            _raise_agreed("ShardedOptimizer", failures, error)
        first = signatures[0]
        for r, sig in enumerate(signatures):
            if sig != first:   # described alike on every rank: rank 0 against the first other
                raise ValueError(
                    "ShardedOptimizer: the ranks were given different parameters or "
                    f"hyperparameters: {_first_difference(first, sig, 0, r)}")
        total = sum(b.n for b in self._buckets)
        if total < self.world_size:
            raise ValueError(
                f"ShardedOptimizer: world size {self.world_size} is larger than the number of "
                f"parameter elements ({total}); use fewer processes or a single-process optimizer")

        # 3. All ranks agree: pick the collectives, then rebind the parameters.
        self.collectives = self._pick_collectives()
        self._bind()

    # -- construction --------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only during construction: the partition across ranks is fixed."""
        if not self._constructing:
            raise NotImplementedError(
                "ShardedOptimizer partitions its parameters across ranks at construction and "
                "cannot add a parameter group later; create a new one with all groups "
                "(consolidate_state_dict() and load_state_dict() carry the state over)")
        super().add_param_group(param_group)
        params = param_group["params"]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("ShardedOptimizer: a parameter appears twice in one parameter group")

    def _setup(self, optimizer_class: type[torch.optim.Optimizer], defaults: dict[str, Any]) -> None:
        """Validate the parameters, build the flat buffers and the local optimizer."""
        self._params = [p for g in self.param_groups for p in g["params"]]
        if len({id(p) for p in self._params}) != len(self._params):
            raise ValueError("ShardedOptimizer: a parameter appears in two parameter groups")
        self._group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        by_dtype: dict[torch.dtype, list[int]] = {}
        positions = [(gi, i) for gi, g in enumerate(self.param_groups) for i in range(len(g["params"]))]
        for k, p in enumerate(self._params):
            gi, i = positions[k]
            where = f"param_groups[{gi}]['params'][{i}]"
            if p.device.type != "cpu":
                raise ValueError(f"{where} is on device {p.device}; ShardedOptimizer runs on the CPU only")
            if p.layout != torch.strided:
                raise ValueError(f"{where} has layout {p.layout}; only dense tensors are supported")
            if not p.is_floating_point():
                raise TypeError(f"{where} has dtype {p.dtype}; parameters must be floating point")
            if p.dtype in (torch.float16, torch.bfloat16) and issubclass(optimizer_class, _FlatOptimizer):
                raise TypeError(
                    f"{where} has dtype {p.dtype}; ShardedOptimizer does not support 16-bit parameters "
                    "with flatopt.torch classes (float32 master weights) yet: use float32 parameters, a "
                    "torch.optim class, or torch's ZeroRedundancyOptimizer with a flatopt.torch class and "
                    "master_dtype=torch.float32")
            by_dtype.setdefault(p.dtype, []).append(k)
        self._buckets = [
            _Bucket(dtype, ks, [self._params[k].numel() for k in ks], self.world_size, self.rank,
                    self.average_gradients)
            for dtype, ks in by_dtype.items()]
        # Fresh copies of the values: the parameters are rebound only once all ranks agree.
        for b in self._buckets:
            with torch.no_grad():
                for k, a, e in zip(b.indices, b.starts, b.stops):
                    b.flat_param[a:e].copy_(self._params[k].detach().reshape(-1))
        # The local optimizer: one group per group, over this rank's pieces.
        local_groups: list[list[tuple[torch.Tensor, _Bucket, int, int, int, int]]] = [
            [] for _ in self.param_groups]
        self._pieces = []   # local id -> (bucket, global index, start, stop, slice offset)
        for b in self._buckets:
            for k, s, e in b.piece_ranges():
                a = b.offset[k]
                piece = b.flat_param[a + s:a + e].detach()
                b.pieces.append((piece, k, s, e))
                local_groups[self._group_of[k]].append((piece, b, k, s, e, a + s - b.lo))
        local_params: list[dict[str, Any]] = []
        for gi, group in enumerate(self.param_groups):
            hyper = {key: v for key, v in group.items() if key != "params"}
            local_params.append({**hyper, "params": [t[0] for t in local_groups[gi]]})
            self._pieces.extend(t[1:] for t in local_groups[gi])
        self.local_optimizer = optimizer_class(local_params, **defaults)
        self._param_lists = guard_params(self.param_groups)  # (step() checks they stay)
        local = self.local_optimizer
        _copy_hyperparameters(local.param_groups, self.param_groups)  # the local class's defaults
        for key, value in local.defaults.items():  # (schedulers look there: OneCycleLR's betas)
            self.defaults.setdefault(key, value)
        self._grad_scale_arg = "grad_scale" in inspect.signature(local.step).parameters
        self._constructor_args = _constructor_args(type(local))
        self._checked = [None] * len(self.param_groups)
        for b in self._buckets:
            b.views = [b.flat_param[b.offset[k] + s:b.offset[k] + e] for _, k, s, e in b.pieces]
            b.grad_views = [b.slice_grad[o:o + (e - s)] for (_, k, s, e), o in
                            zip(b.pieces, np.cumsum([0] + [e - s for _, _, s, e in b.pieces]))]
            b.locate()
        self._n = len(self._params)
        # Exchanged at every step: has-grad per parameter, a failure flag, and a checksum
        # of the hyperparameters (4 bytes).
        self._control = torch.zeros(self._n + 5, dtype=torch.uint8)
        self._control_out = torch.zeros(self.world_size * (self._n + 5), dtype=torch.uint8)

    def _signature(self) -> tuple[Any, ...]:
        """What every rank must have been given alike."""
        groups = []
        for group in self.param_groups:
            hyper = {k: repr(_canonical(v)) for k, v in group.items() if k not in ("params", "initial_lr")}
            groups.append(([(str(p.dtype), tuple(p.shape)) for p in group["params"]], sorted(hyper.items())))
        return (type(self.local_optimizer).__module__, type(self.local_optimizer).__name__,
                self.average_gradients, groups)

    def _pick_collectives(self) -> tuple[str | None, str]:
        """The collectives for gradients and parameters (and small exchanges), in order of
        preference for the backend, skipping any it lacks (tried once, on tiny tensors).

        gloo's all_reduce (a pipelined ring) is several times faster per byte than its
        reduce_scatter and all_gather, so on gloo both use all_reduce; elsewhere (NCCL and
        the like) the bandwidth-optimal reduce-scatter and all-gather come first.
        """
        world, group = self.world_size, self.process_group
        disabled = self._disabled_collectives

        def works(call: Callable[[], object]) -> bool:
            try:
                call()
                return True
            except (RuntimeError, NotImplementedError, ValueError, TypeError):
                return False

        def reduce_scatter_works(d: torch.dtype) -> bool:
            return works(lambda: _REDUCE_SCATTER(
                torch.zeros(1, dtype=d), torch.zeros(world, dtype=d), group=group))

        def all_gather_into_tensor_works(d: torch.dtype) -> bool:
            return works(lambda: _ALL_GATHER(torch.zeros(world, dtype=d), torch.zeros(1, dtype=d), group=group))

        def all_gather_works(d: torch.dtype) -> bool:
            return works(lambda: dist.all_gather(
                list(torch.split(torch.zeros(world, dtype=d), 1)), torch.zeros(1, dtype=d), group=group))

        dtypes = [b.dtype for b in self._buckets]
        supported: dict[str, Callable[[], bool]] = {
            "reduce_scatter_tensor": lambda: all(reduce_scatter_works(d) for d in dtypes),
            "all_gather_into_tensor": lambda: all(all_gather_into_tensor_works(d)
                                                  for d in dtypes + [torch.uint8, torch.float64]),
            "all_gather": lambda: all(all_gather_works(d) for d in dtypes + [torch.uint8, torch.float64]),
            "all_reduce": lambda: True,
            "reduce": lambda: True,
            "broadcast": lambda: True,
        }
        known: dict[str, bool] = {}

        def first(names: list[str], last_resort: str) -> str:
            for name in names:
                if name not in disabled:
                    if name not in known:
                        known[name] = supported[name]()
                    if known[name]:
                        return name
            return last_resort

        if dist.get_backend(group) == "gloo":
            grads = ["reduce", "all_reduce", "reduce_scatter_tensor"]
            params = ["broadcast", "all_reduce", "all_gather_into_tensor", "all_gather"]
        else:
            grads = ["reduce_scatter_tensor", "all_reduce"]
            params = ["all_gather_into_tensor", "all_gather", "all_reduce", "broadcast"]
        grad_op = first(grads, "all_reduce") if self.average_gradients else None
        param_op = first(params, "broadcast")
        self._small_gather = first(["all_gather_into_tensor", "all_gather"], "broadcast")
        return (grad_op, param_op)

    def _bind(self) -> None:
        """Rebind each parameter to its view of the flat buffer (and its grad, when this
        optimizer averages gradients, to the gradient buffer)."""
        param_views: list[torch.Tensor | None] = [None] * self._n
        self._grad_views = [None] * self._n
        for b in self._buckets:
            for k, a, e in zip(b.indices, b.starts, b.stops):
                p = self._params[k]
                param_views[k] = b.flat_param[a:e].view(p.shape)
                if b.flat_grad is not None:
                    self._grad_views[k] = b.flat_grad[a:e].view(p.shape)
        # Every parameter is in a bucket: no None is left.
        self._param_views = cast(list[torch.Tensor], param_views)
        self._dirty = np.zeros(self._n, dtype=bool)
        self._stale = np.zeros(self._n, dtype=bool)
        self._watches = [StaleWatch(b.indices, self._stale) for b in self._buckets]
        watch_of = {k: w for b, w in zip(self._buckets, self._watches) for k in b.indices}
        self._sparse = np.zeros(self._n, dtype=bool)  # AttachGrad's flag; step() checks layouts
        for k, p in enumerate(self._params):
            grad = p.grad
            p.data = self._param_views[k]
            if self.average_gradients:
                view = _own(self._grad_views[k])
                if grad is not None:
                    view.copy_(grad.detach())
                    self._dirty[k] = True
                    p.grad = view
                if p.requires_grad:
                    # Tensor.register_hook is unannotated in torch (no typed alternative).
                    self._hooks.append(p.register_hook(  # type: ignore[no-untyped-call]
                        AttachGrad(p, view, self._dirty, watch_of[k], self._sparse, k)))
        self._data_ptrs = [p.data_ptr() for p in self._params]

    def __del__(self) -> None:
        for handle in getattr(self, "_hooks", ()):
            handle.remove()

    def __getstate__(self) -> NoReturn:
        raise TypeError("ShardedOptimizer cannot be pickled or copied; save state_dict() instead")

    def __repr__(self) -> str:
        lines = [f"ShardedOptimizer({type(self.local_optimizer).__name__}, rank {self.rank} of "
                 f"{self.world_size}, average_gradients={self.average_gradients})",
                 f"  collectives: {self.collectives[0] or 'none (gradients used as they are)'} "
                 f"for gradients, {self.collectives[1]} for parameters"]
        for b in self._buckets:
            lines.append(f"  {str(b.dtype).replace('torch.', '')}: {b.n} elements in {len(b.indices)} "
                         f"tensors, {b.chunk} per rank; this rank owns [{b.lo}, {b.hi}) "
                         f"({len(b.pieces)} pieces)")
        lines.append(f"  optimizer state on this rank: {self.state_nbytes()} bytes")
        for gi, group in enumerate(self.param_groups):
            lines.append(f"  group {gi}: " + ", ".join(
                f"{k}={v!r}" for k, v in group.items() if k != "params"))
        return "\n".join(lines)

    def state_nbytes(self) -> int:
        """Bytes of optimizer state this rank holds (its local optimizer's state tensors)."""
        total = 0
        seen: set[tuple[int, int]] = set()
        state = self.local_optimizer.state
        for entry in state.values():
            for value in entry.values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    key = (value.untyped_storage().data_ptr(), value.data_ptr())
                    if key not in seen:
                        seen.add(key)
                        total += value.numel() * value.element_size()
        return total

    # -- gradients -----------------------------------------------------------------------
    def _collect(self) -> None:
        """This rank's gradients into the flat buffers (or its slice); the has-grad mask.
        Raises on bad input, before any collective."""
        params = self._params
        check_params(self.param_groups, self._param_lists, "ShardedOptimizer")
        check_still_bound(params, self._data_ptrs, "ShardedOptimizer")
        grads = [p.grad for p in params]
        for b, watch in zip(self._buckets, self._watches):
            if b.flat_grad is not None:
                watch.see(b.flat_grad._version)
        if self._stale.any():
            stale = [k for k, (g, v) in enumerate(zip(grads, self._grad_views)) if g is v and self._stale[k]]
            if stale:
                raise RuntimeError(
                    f"ShardedOptimizer: the gradients of {len(stale)} parameter(s) are still what the last "
                    f"step() reduced in place ({self.collectives[0]}), not this rank's: call "
                    "optimizer.zero_grad() or model.zero_grad() before the next backward pass (to "
                    "accumulate gradients over several backward passes, call step() once, after the "
                    "last)")
        control = self._control
        if self.average_gradients and all(map(lambda g, v: g is v, grads, self._grad_views)):
            control[:self._n] = 1
            return
        has = np.zeros(self._n, dtype=np.uint8)
        for k, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                if self.average_gradients and self._dirty[k]:
                    _own(self._grad_views[k]).zero_()
                    self._dirty[k] = False
                continue
            has[k] = 1
            if g is self._grad_views[k]:
                continue
            if g.layout != torch.strided:
                raise RuntimeError("ShardedOptimizer does not support sparse gradients")
            if g.device.type != "cpu" or g.shape != p.shape or torch.is_complex(g):
                raise RuntimeError(
                    f"ShardedOptimizer: a gradient of shape {tuple(g.shape)} on {g.device} ({g.dtype}) "
                    f"does not match its parameter ({tuple(p.shape)}, cpu, {p.dtype})")
            if self.average_gradients:
                view = _own(self._grad_views[k])
                view.copy_(g.detach())
                self._dirty[k] = True
                self._stale[k] = False
                p.grad = view
        control[:self._n] = torch.from_numpy(has)
        if not self.average_gradients:   # read this rank's slice of each gradient
            for b in self._buckets:
                for (piece, k, s, e), view in zip(b.pieces, b.read_views()):
                    g = grads[k]
                    if g is None:
                        view.zero_()
                    else:
                        view.copy_(g.detach().reshape(-1)[s:e])

    def _reduce(self, error: Exception | None = None, code: int = 0, step_args: Any = None) -> list[bool]:
        """Agree that no rank failed its checks (``error``: this rank's, from :meth:`step`,
        with its ``code``) and that all hold the same hyperparameters, and, once per set of gradients, agree
        on the participating parameters and reduce the gradients into each rank's slice.
        Returns the participation mask. :meth:`step` calls it every time (after
        :meth:`grad_norm`, which reduced the gradients, only the small exchange runs), so
        a retried or changed step is checked again."""
        reduced = self._reduced is not None
        if not reduced:
            try:
                if self._grads_spent:
                    raise RuntimeError(
                        "the last step() failed after these gradients were combined with a failed "
                        "rank's or partly applied; compute them again (zero_grad(), backward()) first")
                self._collect()
            except Exception as exc:  # noqa: BLE001 - every rank raises below
                error, code = error or exc, _FAILED_GRADIENTS
        self._control[self._n] = code
        # ``step_args`` (step()'s grad_scale and skip_if_nonfinite) must agree too: a rank
        # that skipped while another stepped would wait in the parameter exchange.
        digest = zlib.crc32(repr((self._hyperparameters(), step_args)).encode())
        self._control[self._n + 1:] = torch.tensor(list(digest.to_bytes(4, "little")), dtype=torch.uint8)
        group = self.process_group
        works = [self._gather(self._control_out, self._control, async_op=True)]
        if self.average_gradients and not reduced:
            for b in self._buckets:
                flat_grad = _own(b.flat_grad)
                if self.collectives[0] == "reduce_scatter_tensor":
                    target = b.grad_target()
                    works.append(_REDUCE_SCATTER(target, flat_grad, group=group, async_op=True))
                elif self.collectives[0] == "reduce":   # each chunk summed on its owner, in place
                    target = flat_grad[self.rank * b.chunk:(self.rank + 1) * b.chunk]
                    works.extend(dist.reduce(chunk, dst=dist.get_global_rank(group, r), group=group,
                                             async_op=True)
                                 for r, chunk in enumerate(torch.split(flat_grad, b.chunk)))
                else:   # in place: p.grad then holds the sum over ranks
                    target = flat_grad[self.rank * b.chunk:(self.rank + 1) * b.chunk]
                    works.append(dist.all_reduce(flat_grad, group=group, async_op=True))
                b.target = target
        for work in works:
            if work is not None:
                work.wait()
        rows = self._control_out.view(self.world_size, self._n + 5)
        codes = rows[:, self._n]
        if reduced:
            mask = self._reduced[0]  # type: ignore[index]  # reduced: not None
        else:
            mask = rows[:, :self._n].amax(0).bool().tolist()
            if self.average_gradients:
                for b in self._buckets:
                    b.deliver(_own(b.target))
                if self.collectives[0] != "reduce_scatter_tensor":
                    self._dirty[:] = True   # the views hold sums now: zero before reuse
            if bool((codes == _FAILED_GRADIENTS).any()):
                # A rank's gradients did not go in: the sums are not the gradients'.
                self._grads_spent = self.average_gradients
            else:  # reduced for good: a step retried once the error is mended reuses them
                self._reduced = (mask, None)
        if bool(codes.any()):
            kept = ("; the gradients were combined and are kept: step() may be called again once "
                    "this is mended" if self._reduced is not None else
                    "; the gradients must be computed again (zero_grad(), backward())" if self._grads_spent else "")
            self._raise_step_error(error, "; no rank changed its parameters or optimizer state" + kept)
        if not bool((rows[:, self._n + 1:] == rows[0, self._n + 1:]).all()):
            # The reduced gradients are kept: set the hyperparameters alike and step again.
            self._raise_hyperparameter_error(step_args)
        return mask

    def _check_hyperparameters(self) -> None:
        """Check every group's hyperparameters on every rank, whether or not this rank's
        slice holds parameters of the group (a rank that skipped the check would go on to
        the parameter exchange while another raised): by the flatopt.torch class's rules,
        or by building the torch.optim class over a stand-in parameter (its constructor's
        checks, all torch.optim makes). A group whose values are the very immutable
        objects checked last time is not checked again."""
        local = self.local_optimizer
        for gi, group in enumerate(self.param_groups):
            items = [(k, v) for k, v in group.items() if k != "params"]
            seen = self._checked[gi]
            if seen is not None and len(seen) == len(items) and all(
                    k == j and v is w for (k, v), (j, w) in zip(items, seen)):
                continue
            hyper = dict(items)
            where = f"param_groups[{gi}]"
            if isinstance(local, _FlatOptimizer):
                local._check_group(hyper, where)
                for dtype in {_NUMPY_DTYPES[p.dtype] for p in group["params"] if p.dtype in _NUMPY_DTYPES}:
                    check_fits(local._hyperparameters(hyper), dtype, f"{type(local).__name__} {where}")
            else:
                try:
                    type(local)([torch.nn.Parameter(torch.zeros(1))],
                                **{k: v for k, v in hyper.items() if k in self._constructor_args})
                except Exception as exc:  # noqa: BLE001 - named and raised on every rank
                    raise type(exc)(f"{type(local).__name__} {where}: {exc}") if type(exc) in (
                        ValueError, TypeError) else exc
            immutable = all(type(v) in _IMMUTABLE or (type(v) is tuple and all(type(x) in _IMMUTABLE for x in v))
                            for _, v in items)
            self._checked[gi] = items if immutable else None

    def _hyperparameters(self) -> list[list[tuple[str, Any]]]:
        """Each group's hyperparameters, as the ranks compare them (:func:`_canonical`)."""
        return [[(k, _canonical(group[k])) for k in sorted(group) if k != "params"]
                for group in self.param_groups]

    def _raise_hyperparameter_error(self, step_args: Any = None) -> NoReturn:
        reports = cast(list[tuple[Any, Any]], [None] * self.world_size)  # filled below
        dist.all_gather_object(reports, (self._hyperparameters(), step_args), group=self.process_group)
        for r, (_, args) in enumerate(reports):
            if repr(args) != repr(reports[0][1]):
                raise _mark_agreed(ValueError(
                    f"ShardedOptimizer.step: the ranks called step() with different arguments: "
                    f"(grad_scale, skip_if_nonfinite) = {reports[0][1]} on rank 0, {args} on rank {r}; "
                    "no rank changed its parameters or optimizer state, and step() may be called "
                    "again with the same arguments on every rank"))
        groups = cast(list[list[list[tuple[str, Any]]]], [hyper for hyper, _ in reports])
        # Compared as the checksum compares them (by repr: NaN equals NaN there, True is
        # not 1.0), so that the difference the checksum saw is found.
        r, (gi, (a, b)) = next((r, next((gi, (a, b)) for gi, (a, b) in enumerate(zip(groups[0], other))
                                        if repr(a) != repr(b))) for r, other in enumerate(groups)
                               if repr(other) != repr(groups[0]))
        diff = sorted({k for k, v in a} ^ {k for k, v in b}
                      | {k for (k, v), (_, w) in zip(a, b) if repr(v) != repr(w)})
        raise _mark_agreed(ValueError(
            f"ShardedOptimizer.step: the ranks' hyperparameters differ (an LR scheduler or an "
            f"edit of param_groups on some ranks only?): param_groups[{gi}] {dict(a)} on rank 0, "
            f"{dict(b)} on rank {r} (differing: {diff}); no rank changed its parameters or "
            "optimizer state, and step() may be called again once they agree"))

    def _exchange_errors(self, error: Exception | None,
                         extra: Any = None) -> tuple[list[tuple[int, tuple[type[BaseException], str]]], list[Any]]:
        """Every rank's error and ``extra`` (a collective): the ranks that failed, each
        with its error as :func:`_describe_error` gives it, and every rank's ``extra``."""
        reports = cast(list[_Report], [None] * self.world_size)   # filled by all_gather_object
        dist.all_gather_object(reports, (self.rank, _describe_error(error), extra), group=self.process_group)
        return [(r, e) for r, e, _ in reports if e is not None], [x for _, _, x in reports]

    def _raise_step_error(self, error: Exception | None, suffix: str) -> NoReturn:
        """Raise on every rank (a collective) the error naming each rank whose step failed."""
        _raise_agreed("ShardedOptimizer.step", self._exchange_errors(error)[0], error, suffix=suffix)

    def _gather(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False) -> Any:
        """All-gather a small tensor (every rank's ``inp`` into ``out``, in rank order)."""
        how = self._small_gather
        if how == "all_gather_into_tensor":
            return _ALL_GATHER(out, inp, group=self.process_group, async_op=async_op)
        self._gather_list(out, inp, how)
        return None

    def _gather_list(self, out: torch.Tensor, inp: torch.Tensor, how: str) -> None:
        chunks = list(torch.split(out, inp.numel()))
        if how == "all_gather":
            dist.all_gather(chunks, inp, group=self.process_group)
        else:
            if chunks[self.rank].data_ptr() != inp.data_ptr():
                chunks[self.rank].copy_(inp)
            for r, chunk in enumerate(chunks):
                dist.broadcast(chunk, src=dist.get_global_rank(self.process_group, r), group=self.process_group)

    def _refresh_params(self, b: _Bucket) -> None:
        """Every rank's updated slice into every rank's flat parameter buffer."""
        chunk = b.gather_input()
        how = self.collectives[1]
        if how == "all_gather_into_tensor":
            _ALL_GATHER(b.flat_param, chunk, group=self.process_group)
        elif how == "broadcast":
            if chunk.data_ptr() != b.my_chunk.data_ptr():
                b.my_chunk.copy_(chunk)
            group = self.process_group
            works = [dist.broadcast(c, src=dist.get_global_rank(group, r), group=group, async_op=True)
                     for r, c in enumerate(torch.split(b.flat_param, b.chunk))]
            for work in works:
                work.wait()
        elif how == "all_reduce":
            # The other ranks' chunks are zeroed: the sum is exact (x + 0 == x).
            if chunk.data_ptr() != b.my_chunk.data_ptr():
                b.my_chunk.copy_(chunk)
            b.flat_param[:self.rank * b.chunk].zero_()
            b.flat_param[(self.rank + 1) * b.chunk:].zero_()
            dist.all_reduce(b.flat_param, group=self.process_group)
        else:
            self._gather_list(b.flat_param, chunk, how)

    def _stats(self, norm_type: float) -> tuple[float, int]:
        """(global norm of the averaged gradient, global non-finite count), agreed by all."""
        mask = self._reduced[0] if self._reduced is not None else self._reduce()
        stats = self._reduced[1] if self._reduced is not None else None  # set by _reduce()
        if stats is not None and stats[0] == norm_type:
            return stats[1], stats[2]
        partial = torch.zeros(2, dtype=torch.float64)
        norms: list[float] = []
        count = 0
        for b in self._buckets:
            g = b.reduced()
            if g.dtype in (torch.float32, torch.float64):
                norms.append(_functional.grad_norm(g.numpy(), norm_type))
                count += _functional.count_nonfinite(g.numpy())
            else:
                norms.append(float(torch.linalg.vector_norm(g, norm_type, dtype=torch.float64)))
                count += int((~torch.isfinite(g)).sum())
        if norm_type == math.inf:
            partial[0] = max(norms, default=0.0)
        else:
            partial[0] = math.fsum(n ** norm_type for n in norms)
        partial[1] = count
        out = torch.zeros(2 * self.world_size, dtype=torch.float64)
        self._gather(out, partial)
        rows = out.view(self.world_size, 2).tolist()
        if norm_type == math.inf:
            total = max(r[0] for r in rows)
        else:
            total = math.fsum(r[0] for r in rows)
            try:
                total = total ** (1.0 / norm_type)
            except OverflowError:
                total = math.inf
        if self.average_gradients:
            total /= self.world_size
        count = int(sum(r[1] for r in rows))
        self._reduced = (mask, (norm_type, total, count))
        return total, count

    def grad_norm(self, norm_type: float = 2.0) -> float:
        """The global ``norm_type``-norm of the (averaged) gradient, the same on every rank.

        A collective: call it on every rank. It reduces the gradients for the coming
        :meth:`step` (which then does not reduce them again), so call it after the last
        backward pass of the step.
        """
        return self._stats(check_norm_type(norm_type))[0]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients: the flat gradient buffer in one pass, and with
        ``set_to_none`` (the default) every ``p.grad`` set to None, as in torch."""
        self._reduced = None
        self._grads_spent = False
        self._pending_grad_scale = 1.0
        if not self.average_gradients:
            super().zero_grad(set_to_none=set_to_none)
            return
        for b in self._buckets:
            _own(b.flat_grad).zero_()
        self._dirty[:] = False
        for watch in self._watches:
            watch.clear()
        for p, view in zip(self._params, self._grad_views):
            if set_to_none:
                p.grad = None
            elif p.grad is not None and p.grad is not view:
                p.grad = view

    # -- step ----------------------------------------------------------------------------
    @overload
    def step(self, closure: None = None, *, grad_scale: float = 1.0,
             skip_if_nonfinite: bool = False) -> None: ...

    @overload
    def step(self, closure: Callable[[], float], *, grad_scale: float = 1.0,
             skip_if_nonfinite: bool = False) -> float: ...

    @hooked_step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, *, grad_scale: float = 1.0,
             skip_if_nonfinite: bool = False) -> float | None:
        """Reduce the gradients into this rank's slice, run the local optimizer on it, and
        all-gather the parameters (a collective: call it on every rank).

        ``closure`` re-evaluates the model and returns the loss, as in torch.optim.
        ``grad_scale`` multiplies the gradients (times a pending :meth:`clip_grad_norm_`
        factor); with ``skip_if_nonfinite`` a gradient holding inf or NaN on any rank
        skips the step on every rank (:attr:`skipped_steps`, :attr:`last_step_skipped`).
        """
        # The closure (every rank runs it: it may clip, a collective), then this rank's
        # checks; an error is raised on every rank by the exchange in _reduce.
        loss: float | None = None
        error: Exception | None = None
        code = 0
        if closure is not None:
            try:
                with torch.enable_grad():
                    loss = closure()
            except Exception as exc:  # noqa: BLE001 - every rank raises in _reduce
                if _agreed(exc):  # from a clip_grad_norm_ in it: every rank has raised
                    raise
                error, code = exc, _FAILED_GRADIENTS  # the gradients are unfinished
        if error is None:
            try:
                if type(grad_scale) is not float or grad_scale != 1.0:
                    grad_scale = check_real(grad_scale, "grad_scale")
                    # On every rank, for every dtype: a rank without a piece of one would not
                    # fail with the others.
                    applied = grad_scale * self._pending_grad_scale / (self.world_size if self.average_gradients else 1)
                    for dtype in {_NUMPY_DTYPES[b.dtype] for b in self._buckets if b.dtype in _NUMPY_DTYPES}:
                        check_fits({f"grad_scale={grad_scale!r} (as applied)": applied}, dtype, "ShardedOptimizer.step")
                skip_if_nonfinite = check_bool(skip_if_nonfinite, "skip_if_nonfinite")  # (np.True_: True)
                self._check_hyperparameters()
            except Exception as exc:  # noqa: BLE001 - every rank raises in _reduce
                error, code = exc, _FAILED_CHECK
        self._consolidated = None
        agreed: Exception | None = None
        try:
            mask = self._reduce(error, code, (grad_scale, skip_if_nonfinite))
        except Exception as exc:
            if not (code == _FAILED_GRADIENTS and error is not None):
                raise
            agreed = exc
        if agreed is not None and error is not None:
            # This rank's closure failed: its own exception (its class, for the caller's
            # except clause, its cause and context), with what every rank was told.
            if hasattr(error, "add_note"):
                error.add_note(str(agreed))
            else:  # Python 3.10: kept where 3.11's traceback would print it
                setattr(error, "__notes__", [*getattr(error, "__notes__", ()), str(agreed)])
            raise error
        scale = grad_scale * self._pending_grad_scale
        if self.average_gradients:
            scale /= self.world_size
        self._pending_grad_scale = 1.0
        self.last_step_skipped = skip_if_nonfinite and self._stats(2.0)[1] > 0
        self._reduced = None
        if self.last_step_skipped:
            self.skipped_steps += 1
            self._mark_stale()
            return loss
        local = self.local_optimizer
        self._sync_local_groups()
        for b in self._buckets:
            for (piece, k, _, _), grad in zip(b.pieces, b.read_views()):
                if piece.grad is not grad or not mask[k]:
                    piece.grad = grad if mask[k] else None
            b.params_in()
        if self._grad_scale_arg:   # its step() takes grad_scale (a flatopt.torch class)
            try:
                cast(Any, local).step(grad_scale=scale)
            except Exception:
                # Its checks all ran above, alike on every rank, and it writes nothing
                # before they pass: a failure here is everyone's. Refused until recomputed.
                self._grads_spent = self.average_gradients
                raise
        else:
            # torch.optim checks some values only in its step (capturable, amsgrad turned
            # on mid-run), perhaps on some ranks only, and may fail half-way: one more small
            # exchange says whether every rank's step ran.
            failed: Exception | None = None
            try:
                if scale != 1.0:
                    for b in self._buckets:
                        b.reduced().mul_(scale)
                local.step()
            except Exception as exc:  # noqa: BLE001 - every rank raises below
                failed = exc
            self._control[self._n] = failed is not None
            self._gather(self._control_out, self._control)
            if bool(self._control_out.view(self.world_size, self._n + 5)[:, self._n].any()):
                self._grads_spent = True  # combined, or partly applied: not to be used again
                for b in self._buckets:  # every rank ends with the same (partly updated) values
                    self._refresh_params(b)
                    b.locate()
                self._raise_step_error(failed, f"; {type(local).__name__}.step() failed on the ranks named: "
                                       "parameters may be partly updated (alike on every rank); the gradients "
                                       "must be computed again (zero_grad(), backward())")
        for b in self._buckets:
            self._refresh_params(b)
            b.locate()
        self._mark_stale()
        return loss

    def _mark_stale(self) -> None:
        """After a step: the gradients a collective reduced in place hold its sums now
        (reduce_scatter_tensor leaves them as they were; so does a world of one)."""
        if self.average_gradients and self.collectives[0] != "reduce_scatter_tensor" and self.world_size > 1:
            for b, watch in zip(self._buckets, self._watches):
                watch.mark(_own(b.flat_grad)._version)

    def _sync_local_groups(self) -> None:
        """Copy the hyperparameters (LR schedulers edit ``param_groups``) into the local
        optimizer's groups: before its step, and before its state dict is taken."""
        _copy_hyperparameters(self.param_groups, self.local_optimizer.param_groups)

    # -- checkpoints ---------------------------------------------------------------------
    def _local_to_shard(self, local_sd: dict[str, Any]) -> dict[str, Any]:
        """The local optimizer's state dict re-keyed by global parameter ids, plus the slice."""
        state: dict[int, Any] = {}
        ranges: dict[int, tuple[int, int]] = {}
        for j, (b, k, s, e, _) in enumerate(self._pieces):
            ranges[k] = (s, e)
            if j in local_sd["state"]:
                state[k] = local_sd["state"][j]
        groups: list[dict[str, Any]] = []
        pid = 0
        for gi, (group, saved) in enumerate(zip(self.param_groups, local_sd["param_groups"])):
            packed = {k: v for k, v in saved.items() if k != "params"}
            packed["params"] = list(range(pid, pid + len(group["params"])))
            pid += len(group["params"])
            groups.append(packed)
        return {"state": state, "param_groups": groups,
                "shard": {"rank": self.rank, "world_size": self.world_size, "ranges": ranges,
                          "numels": [p.numel() for p in self._params]}}

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard (see the module docstring); after :meth:`consolidate_state_dict`
        on this rank and before the next step, the full torch-format state dict."""
        if self._consolidated is not None:  # with the hyperparameters as they are now
            groups = [{**saved, **{k: v for k, v in mine.items() if k != "params"}, "params": saved["params"]}
                      for saved, mine in zip(self._consolidated["param_groups"], self.param_groups)]
            return {**self._consolidated, "param_groups": groups}
        self._sync_local_groups()
        return self._local_to_shard(self.local_optimizer.state_dict())

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather every rank's shard on rank ``to`` (a collective: call it on every rank),
        whose :meth:`state_dict` then returns the full state dict until the next step."""
        if not isinstance(to, int) or not 0 <= to < self.world_size:
            raise ValueError(f"to must be a rank in 0..{self.world_size - 1}, got {to!r}")
        self._sync_local_groups()
        shard = self._local_to_shard(self.local_optimizer.state_dict())
        shards: list[Any] | None = [None] * self.world_size if self.rank == to else None
        dist.gather_object(shard, shards, dst=dist.get_global_rank(self.process_group, to),
                           group=self.process_group)
        if self.rank == to:
            self._consolidated = self._merge(cast(list[dict[str, Any]], shards))  # filled by gather_object

    def _merge(self, shards: list[dict[str, Any]]) -> dict[str, Any]:
        pieces: dict[int, list[tuple[int, dict[str, Any]]]] = {}   # global id -> [(start, entry)]
        for shard in shards:
            for k, entry in shard["state"].items():
                pieces.setdefault(k, []).append((shard["shard"]["ranges"][k][0], entry))
        state: dict[int, dict[str, Any]] = {}
        for k in sorted(pieces):
            p = self._params[k]
            parts = sorted(pieces[k], key=lambda t: t[0])
            full: dict[str, Any] = {}
            for name, value in parts[0][1].items():
                if isinstance(value, torch.Tensor) and value.dim() == 1 and not (
                        p.dim() == 0 and name in _SCALAR_STATE):
                    full[name] = torch.cat([e[name] for _, e in parts]).view(p.shape)
                else:
                    full[name] = value
            state[k] = full
        return {"state": state, "param_groups": shards[self.rank]["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a full state dict (from :meth:`consolidate_state_dict`, or saved by the
        single-process optimizer of the same class or torch.optim's of the same name),
        taking this rank's pieces; or this rank's own shard. A collective: call it on
        every rank. Each rank checks its pieces; if any rank's fail, every rank raises the
        same error and none has changed its state (those that had loaded go back)."""
        local = self.local_optimizer
        error: Exception | None = None
        backup: dict[str, Any] | None = None
        try:
            local_sd = self._local_state_dict(state_dict)
            backup = copy.deepcopy(local.state_dict())
            local.load_state_dict(local_sd)
        except Exception as exc:  # noqa: BLE001 - every rank raises below
            error = exc
        failures = self._exchange_errors(error)[0]
        if failures:
            if error is None and backup is not None:  # another rank failed: undo this one's load
                local.load_state_dict(backup)
            _raise_agreed("ShardedOptimizer.load_state_dict", failures, error,
                          suffix="; no rank changed its optimizer state")
        _copy_hyperparameters(local.param_groups, self.param_groups)
        self._consolidated = None
        self._pending_grad_scale = 1.0  # (gradients already reduced stay reduced)

    def _local_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The local optimizer's state dict of this rank's pieces of ``state_dict``; raises
        on what this rank can check (its pieces' shapes, the groups, a shard's layout)."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("ShardedOptimizer: state_dict must have keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"ShardedOptimizer: loaded state dict has {len(saved_groups)} parameter "
                             f"groups, this optimizer has {len(self.param_groups)}")
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"ShardedOptimizer: loaded param_groups[{gi}] has {len(saved['params'])} "
                    f"parameters, this optimizer's has {len(group['params'])}")
        ids = [pid for saved in saved_groups for pid in saved["params"]]   # position -> saved id
        shard = state_dict.get("shard")
        if shard is not None:
            ranges = {k: (s, e) for _, k, s, e, _ in self._pieces}
            if (shard.get("world_size") != self.world_size or shard.get("rank") != self.rank
                    or {k: tuple(v) for k, v in shard.get("ranges", {}).items()} != ranges):
                raise ValueError(
                    f"ShardedOptimizer: this is rank {shard.get('rank')} of {shard.get('world_size')}'s "
                    f"shard; it loads only into the same rank of the same layout (rank {self.rank} of "
                    f"{self.world_size} here); load a consolidated state dict to reshard")
        local_state: dict[int, dict[str, Any]] = {}
        for j, (b, k, s, e, _) in enumerate(self._pieces):
            entry = state_dict["state"].get(ids[k])
            if entry is None:
                continue
            if not isinstance(entry, dict):
                raise ValueError(f"ShardedOptimizer: state for parameter {ids[k]} must be a dict")
            p = self._params[k]
            if shard is not None:
                local_state[j] = dict(entry)
                continue
            piece: dict[str, Any] = {}
            for name, value in entry.items():
                if (isinstance(value, torch.Tensor) and value.shape == p.shape
                        and not (p.dim() == 0 and name in _SCALAR_STATE)):
                    piece[name] = value.detach().reshape(-1)[s:e].clone()  # not the whole tensor's memory
                elif isinstance(value, torch.Tensor) and value.dim() > 0:
                    raise ValueError(
                        f"ShardedOptimizer: state[{ids[k]}][{name!r}] has shape {tuple(value.shape)}, "
                        f"its parameter {tuple(p.shape)}")
                else:
                    piece[name] = value
            local_state[j] = piece
        local_groups: list[dict[str, Any]] = []
        j = 0
        for saved, theirs in zip(saved_groups, self.local_optimizer.param_groups):
            n = len(theirs["params"])
            local_groups.append({**{k: v for k, v in saved.items() if k != "params"},
                                 "params": list(range(j, j + n))})
            j += n
        return {"state": local_state, "param_groups": local_groups}


# The control byte of the step exchange: this rank failed a check (its gradients went in),
# or failed while gathering its gradients (the sums are not the gradients').
_FAILED_CHECK, _FAILED_GRADIENTS = 1, 2
_IMMUTABLE = _IMMUTABLE_NUMBERS | {str, type(None)}  # values that cannot change in place
_NUMPY_DTYPES: dict[torch.dtype, np.dtype[Any]] = {torch.float32: np.dtype(np.float32),
                                                   torch.float64: np.dtype(np.float64)}


def _constructor_args(cls: type) -> set[str]:
    """The hyperparameters ``cls``'s constructor takes: the named arguments of each class
    in its MRO down to the first whose ``__init__`` does not pass ``**kwargs`` on (a
    subclass that forwards them takes its own and its base's)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass).parameters.values()
        names |= {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in parameters):
            break
    return names - {"params"}


def _canonical(value: Any) -> Any:
    """A hyperparameter as the ranks compare it: equal numbers alike whatever their type
    (0.1 and np.float64(0.1); a flag stays a flag), tensors and arrays by every value (their
    repr rounds), sequences element by element, anything else by its repr."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Real):
        try:
            return float(value) + 0.0  # -0.0 as 0.0
        except OverflowError:
            return repr(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return (type(value).__name__, str(value.dtype), tuple(value.shape), value.tolist())
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, [_canonical(v) for v in value])
    return repr(value)


def _agreed(exc: BaseException) -> bool:
    """Whether ``exc`` was raised on every rank by an agreement exchange (not to be
    exchanged again: a rank that raised it has no more collectives of this call to make)."""
    return getattr(exc, _AGREED, False)


_AGREED = "_flatopt_agreed_by_every_rank"


def _mark_agreed(exc: Exception) -> Exception:
    setattr(exc, _AGREED, True)
    return exc


def _copy_hyperparameters(sources: list[dict[str, Any]], targets: list[dict[str, Any]]) -> None:
    """Set each target group's hyperparameters (every key but ``"params"``) to its source's."""
    for source, target in zip(sources, targets):
        target.update((k, v) for k, v in source.items() if k != "params")


def _own(view: torch.Tensor | None) -> torch.Tensor:
    """A gradient buffer or view that exists whenever the code reading it runs (those
    kept when ``average_gradients``; a bucket's ``target`` after its reduction)."""
    return cast(torch.Tensor, view)


def _describe_error(error: BaseException | None) -> tuple[type[BaseException], str] | None:
    """(exception class if builtin else RuntimeError, message): picklable for the exchange."""
    if error is None:
        return None
    cls = type(error) if type(error).__module__ == "builtins" else RuntimeError
    return (cls, f"{type(error).__name__}: {error}")


def _raise_agreed(where: str, failures: list[tuple[int, tuple[type[BaseException], str]]],
                  own: BaseException | None, suffix: str = "") -> NoReturn:
    """Raise on every rank the same error naming every rank that failed."""
    cls = failures[0][1][0]
    message = f"{where}: " + "; ".join(f"rank {r}: {e[1]}" for r, e in failures) + suffix
    try:
        exc = cls(message)
    except Exception:  # noqa: BLE001 - an exception class with another signature
        exc = RuntimeError(message)
    if not isinstance(exc, Exception):
        exc = RuntimeError(message)
    setattr(exc, _AGREED, True)
    raise exc from own


def _first_difference(mine: Any, theirs: Any, rank: int, other: int) -> str:
    if theirs is None:
        return f"rank {other} built nothing"
    if mine[:3] != theirs[:3]:
        return f"rank {rank} has {mine[:3]}, rank {other} has {theirs[:3]}"
    if len(mine[3]) != len(theirs[3]):
        return f"rank {rank} has {len(mine[3])} parameter groups, rank {other} has {len(theirs[3])}"
    for gi, ((pa, ha), (pb, hb)) in enumerate(zip(mine[3], theirs[3])):
        if pa != pb:
            if len(pa) != len(pb):
                return (f"param_groups[{gi}] has {len(pa)} parameters on rank {rank}, "
                        f"{len(pb)} on rank {other}")
            i = next(i for i, (x, y) in enumerate(zip(pa, pb)) if x != y)
            return (f"param_groups[{gi}]['params'][{i}] is {pa[i][0]} {pa[i][1]} on rank {rank}, "
                    f"{pb[i][0]} {pb[i][1]} on rank {other}")
        if ha != hb:
            return f"param_groups[{gi}] hyperparameters {dict(ha)} on rank {rank}, {dict(hb)} on rank {other}"
    return "unknown difference"

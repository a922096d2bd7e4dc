# cython: language_level=3
"""Fused optimizer kernels over flat, C-contiguous float32/float64 buffers.

Three layers, as in scikit-learn's ``sklearn/_loss``:

* ``cdef inline`` functions compute one element;
* ``def`` kernels loop over typed memoryviews, reading each element of param, grad and
  state once and writing it once: with ``prange`` where it pays, and for the optimizer
  steps through a ``cdef`` range function called directly when serial, so that a small
  buffer opens no parallel region (see ``_KEEP_GIL_BELOW``);
* the Python layer (``flatopt.functional`` and the optimizer classes) validates and
  forwards. Nothing here checks its arguments beyond what the memoryviews enforce, and
  nothing raises inside the loop.

One source serves both dtypes (``floating``). Hyperparameters arrive as doubles and are
cast to ``floating`` once, before the loop, so float32 arithmetic stays float32. The
extension is compiled with ``-ffp-contract=off``: each element's result depends only on
its inputs, never on the thread count or the vector width.
"""

cimport cython
from cython cimport floating
from cython.parallel cimport prange
from cython.view cimport array as _cvarray

# A kernel runs on the calling thread unless every thread would get at least
# MIN_ELEMENTS_PER_THREAD elements: opening a parallel region costs microseconds (more
# with more threads to wake and join), more than it saves on small buffers. Measured on
# the 2-core project machine (Xeon, AVX-512; kernels rebuilt with no threshold; float32,
# 2 threads vs 1, best of 20-30 interleaved batches because the machine was shared):
#   momentum (cheapest): 12288 elements 2.77 vs 2.77 us (1.00x), 16384 2.99 vs 3.45
#     (0.87x), 32768 0.75x; the AVX2 kernels: 12288 1.02x, 16384 1.07x, 32768 0.77x;
#   adam: 4096 0.99x, 6144 0.88x, 16384 0.69x (AVX2: 6144 0.93x, 16384 0.73x).
# So 8192 per thread (16384 elements for 2 threads), where the cheapest kernels break
# even or win; adam would already gain from ~3000 per thread. On a machine busy with
# other processes a parallel region may wait a whole scheduler slice (milliseconds) for
# its second thread, one more reason not to go parallel early.
# The rule is linear in the thread count: conservative on many-core machines, where
# using fewer threads (not all or one) would be better for mid-sized buffers.
MIN_ELEMENTS_PER_THREAD = 8192
cdef Py_ssize_t _MIN_ELEMENTS_PER_THREAD = MIN_ELEMENTS_PER_THREAD
# The smallest buffer that runs on 2 threads (tests straddle it).
PARALLEL_THRESHOLD = 2 * MIN_ELEMENTS_PER_THREAD


def parallel_threshold(int n_threads):
    """The smallest number of elements a kernel runs on ``n_threads`` threads for (a
    serial build never does)."""
    return max(n_threads, 2) * _MIN_ELEMENTS_PER_THREAD


# Set once a kernel has opened a parallel region: flatopt._threads reads it in a forked
# child (GNU libgomp's thread pool does not survive fork, so that child must stay serial).
cdef bint _parallel_used = False


def parallel_used():
    """True once any kernel of this module has run on more than one thread."""
    return _parallel_used


def as_view(floating[::1] a):
    """``a`` (a writable, C-contiguous float32 or float64 buffer) as this module's typed
    memoryview, for the buffers an optimizer passes to every step. A kernel takes one of
    these as it is, where from an ndarray it must request a buffer, check its format and
    make a new memoryview: 0.1-0.2 us a buffer, about a third of a kernel call's entry
    cost at small sizes (measured with three buffers: 0.96 -> 0.47 us)."""
    return a


#: The type :func:`as_view` returns (Cython's ``_memoryviewslice`` of this module).
KernelView = type(as_view['float'](_cvarray(shape=(1,), itemsize=sizeof(float), format="f")))


cdef inline bint _threads_pay(Py_ssize_t n, int n_threads) noexcept nogil:
    """True when each of ``n_threads`` (more than one) would get MIN_ELEMENTS_PER_THREAD."""
    return n_threads > 1 and n >= n_threads * _MIN_ELEMENTS_PER_THREAD


cdef inline bint _use_threads(Py_ssize_t n, int n_threads) noexcept nogil:
    """``_threads_pay``, and if so, remember that a parallel region opens."""
    global _parallel_used
    if _threads_pay(n, n_threads):
        _parallel_used = True
        return True
    return False


# A kernel on one thread opens no parallel region: even ``if(0)``, ``#pragma omp parallel``
# builds a team of one in libgomp, which cost ~1.4 us per call, more than the whole
# momentum update of 1 to 1000 float32 elements (2-core Xeon, Cython 3.3, gcc, libgomp).
# So each step kernel loops in a ``cdef`` range function: called directly when serial, or
# once per static chunk inside ``prange`` when parallel. Elementwise, so the chunking
# cannot change a bit. A serial call keeps the GIL below _KEEP_GIL_BELOW elements (tens of
# microseconds at most; releasing and re-taking it costs ~0.1 us) and releases it above.
# Every step kernel (the torch.optim family and the keras_* ones) is built this way, and
# so are widen16/narrow16 and gather_bytes; keras_weight_decay and the read-only passes
# (norms, finiteness) still open a (one-thread) region on every call.
cdef Py_ssize_t _KEEP_GIL_BELOW = 65536


# The schedule: a parallel kernel splits its range into chunks of about CHUNK_ELEMENTS
# (1 MiB of float32; one chunk per thread below twice that per thread), each starting on a
# cache line (``_lo``), and deals them out round robin in one parallel region, so that the
# threads walk the buffer front to back side by side. Until 2026-12-06 it split the range
# in halves, one per thread, at whatever element fell in the middle. In a training loop
# the backward pass leaves the first layers' gradients and parameters warm in cache and
# the last layers' cold, so with halves the thread with the far half streams more from
# memory while the other waits. Measured on a 2-core AMD EPYC (Zen 4, 32 MiB L3; MLP of
# 3.2M float32 parameters, flatopt.torch's Adam, torch's fused Adam and both schedules
# interleaved in one process, 40 rounds of 50 steps, three runs): with chunks the step
# took 0.89-0.98x the time of the halves' and the whole training step 0.954-0.989x
# (faster in 24-31 of the 40 rounds). Alone, stepped over and over on that Zen 4, chunks
# took 0.98-1.00x the halves' time from 40k to 2**25 elements; chunks of 16k-64k elements
# cost up to 1.5x in cache (each thread's prefetchers run into the other's chunk, whose
# lines then move between the cores). Not yet measured on other CPUs. DeepSpeed's CPU Adam
# splits each tile of 1M elements across its threads, one parallel region per tile; on the
# 2-core Xeon (AVX-512; Adam float32, 2 threads, medians of 7 interleaved rounds) this
# kernel called tile by tile took 4.23 ms at 2**23 against 3.97 on halves (tiles of 256k:
# 4.86, of 4M: 3.98), and 19.3 ms at 2**25 against 18.2 (20.8, 18.8): a region to open per
# tile, and shorter streams. The chunks here share one region.
# Stepping the tensors in reverse order, last layer first, took 1.25-1.34x torch's time.
# Out of cache the step runs at the memory's speed: on a 2-core AMD EPYC (Zen 1, AVX2,
# 8 MiB L3; benchmarks/bench_large.py, 2026-12-06, two runs) Adam float32 at 2**25 ran at
# 101-103% of stream_add's bandwidth (about 28 GB/s; one thread streams 20), torch's fused
# Adam at 98-101%, and flatopt took 0.97-0.99x torch's time; at 2**23 flatopt
# took 0.89-0.95x torch's (docs/benchmarks.rst). Against Adam's own traffic with no
# arithmetic (``stream_add3``, the ceiling of a one-pass Adam; Zen 4, four runs of
# bench_large.py, 2026-12-06, halves) this kernel ran at 89-107% (median 98.5%) at 2**23, 2**25;
# wherever torch's fused Adam or DeepSpeed reached 97% or more, it took 0.95-1.07x their time.
# Tried on that Zen 4 in C (the same element loop, gcc -O3, 2 threads, 3.2M, 2**23, 2**25
# elements, AVX2 and AVX-512 builds) and not kept: software prefetch 256 B to 2 KiB ahead
# on all four streams took 0.98-1.24x the time without; the two moments interleaved line
# by line (three streams instead of four) took 1.01-1.10x.
CHUNK_ELEMENTS = 262144
cdef Py_ssize_t _CHUNK_ELEMENTS = CHUNK_ELEMENTS


cdef inline Py_ssize_t _count_parts(Py_ssize_t n, int n_threads) noexcept nogil:
    """How many chunks a kernel splits ``n`` elements into: 1 when it runs serially (see
    ``_threads_pay``), else a multiple of ``n_threads``: one chunk a thread below
    2*CHUNK_ELEMENTS a thread, else as many of CHUNK_ELEMENTS to 2*CHUNK_ELEMENTS as fit.
    Dealt out round robin, they give every thread the same number of chunks and the same
    number of elements to within 16 a chunk (``_lo``)."""
    if not _threads_pay(n, n_threads):
        return 1
    return n_threads * max(1, n // (n_threads * _CHUNK_ELEMENTS))


cdef inline Py_ssize_t _parts(Py_ssize_t n, int n_threads) noexcept nogil:
    """``_count_parts`` for a kernel about to run (which marks parallel use)."""
    return _count_parts(n, n_threads) if _use_threads(n, n_threads) else 1


cdef inline int _team(Py_ssize_t parts, int n_threads) noexcept nogil:
    """The number of threads that run a kernel split into ``parts`` chunks."""
    return 1 if parts == 1 else n_threads


def chunks(Py_ssize_t n, int n_threads):
    """The ``(start, stop)`` element ranges, in order, that a kernel splits ``n`` elements
    into on ``n_threads`` threads; range ``t`` runs on thread ``t % n_threads``."""
    cdef Py_ssize_t t, parts = _count_parts(n, n_threads)
    return [(_lo(t, n, parts), _lo(t + 1, n, parts)) for t in range(parts)]


cdef inline bint _inline_call(Py_ssize_t n, Py_ssize_t parts) noexcept nogil:
    """True when the kernel runs on the calling thread with the GIL held."""
    return parts == 1 and n < _KEEP_GIL_BELOW


cdef inline Py_ssize_t _lo(Py_ssize_t t, Py_ssize_t n, Py_ssize_t parts) noexcept nogil:
    """First element of chunk ``t`` of ``parts`` (chunk ``parts`` starts at ``n``): the
    ``t``-th of ``parts`` equal shares, rounded up to a multiple of 16 elements (a 64-byte
    cache line of float32, two of float64) from the start of the range. A flat buffer's
    element 0 is 64-byte aligned, so when a kernel steps a whole buffer (one parameter
    group) every chunk starts on a cache line: no 64-byte vector load straddles two lines
    and no line is written by two threads. A group that starts mid-line (buffers are packed
    without padding) keeps that offset in every chunk; the results are the same. Measured
    on the 2-core Zen 4 (3.2M float32 parameters, flatopt.torch's Adam in a training loop,
    40 interleaved rounds): chunks split at unaligned shares took 1.14x the step time of
    the halves then in use, chunks rounded to 16 elements 0.98x."""
    if t >= parts:
        return n
    return min(n, (n // parts * t + min(t, n % parts) + 15) & ~15)


# ---- gradients: one flat buffer, or a table of sources read where they are -----------------
# A step kernel's ``grad`` is either a flat buffer (the NumPy API) or a ``GradTable``:
# flatopt.torch hands over each parameter's gradient where autograd left it, so that a step
# reads 4 bytes a float32 element of gradient once instead of copying it into the flat
# buffer first (a copy is 8 more bytes an element through memory). The range functions walk
# their elements in *pieces* that read one source each (``_piece``); the element formulas do
# not change, so both forms give bit-identical results.

from libc.stdint cimport intptr_t, uint16_t, uint32_t


cdef struct _Grads:
    const char* flat            # one contiguous gradient for the whole range, or NULL: then
    const Py_ssize_t* bounds    # source k holds the table's elements [bounds[k], bounds[k+1])
    const intptr_t* sources     # at address sources[k],
    Py_ssize_t n_sources
    Py_ssize_t offset           # and the kernel's element 0 is the table's element ``offset``
    int kind                    # -1: gradients of the parameters' dtype; KIND_BF16/KIND_FP16:
    uint16_t* half_params       # 16-bit ones for a float32 master, and the 16-bit parameters


# Mixed precision in one pass (``HalfGrads``): a piece of at most _HALF_PIECE 16-bit
# gradients is widened into a buffer on the range function's stack (4 KiB, in L1), the
# element loop reads it there as it reads any source, and the piece's new master values
# are narrowed into the 16-bit parameters while they are still in L1. Each element of the
# master, the state and the 16-bit gradient and parameter crosses memory once.
cdef enum:
    _HALF_PIECE = 1024


cdef inline Py_ssize_t _segment_of(const Py_ssize_t* starts, Py_ssize_t n,
                                   Py_ssize_t x) noexcept nogil:
    """The last k < n with ``starts[k] <= x`` (``starts`` non-decreasing, ``starts[0] <= x``):
    the segment holding ``x`` where segment k is ``[starts[k], starts[k+1])``."""
    cdef Py_ssize_t a = 0, b = n, k
    while b - a > 1:
        k = (a + b) // 2
        if starts[k] <= x:
            a = k
        else:
            b = k
    return a


cdef inline Py_ssize_t _piece(const _Grads* g, Py_ssize_t lo, Py_ssize_t hi,
                              const floating** src, float* buf) noexcept nogil:
    """The end (at most ``hi``) of the piece of elements from ``lo`` whose gradients lie
    in one source; ``src[0]`` is set to the address of element ``lo``'s gradient. 16-bit
    gradients are widened into ``buf`` (``_HALF_PIECE`` floats), which ``src[0]`` then is."""
    cdef Py_ssize_t j = lo, k, end = hi
    cdef const char* at = g.flat
    if at == NULL:
        j = lo + g.offset
        k = _segment_of(g.bounds, g.n_sources, j)
        at = <const char*>g.sources[k]
        end = min(hi, g.bounds[k + 1] - g.offset)
        j = j - g.bounds[k]
    if g.kind < 0:
        src[0] = <const floating*>at + j
        return end
    end = min(end, lo + _HALF_PIECE)
    _widen16(<const uint16_t*>at + j, <uint32_t*>buf, g.kind, end - lo)
    src[0] = <const floating*>buf
    return end


cdef inline void _piece_done(const _Grads* g, floating[::1] param, Py_ssize_t lo,
                             Py_ssize_t end) noexcept nogil:
    """After the piece ``[lo, end)``: with 16-bit parameters, narrow its master values."""
    if floating is float:
        if g.half_params != NULL and end > lo:
            _narrow16(<const uint32_t*>&param[lo], g.half_params + lo, g.kind, end - lo)


@cython.auto_pickle(False)  # its addresses mean nothing in another process
cdef class GradTable:
    """Gradients read where they are: a step kernel's ``grad`` argument for flatopt.torch.

    ``GradTable(bounds, sources, itemsize, keep)``: source ``k`` is the gradient of the
    elements ``[bounds[k], bounds[k+1])`` of the parameter buffer, stored contiguously at
    address ``sources[k]`` with ``itemsize`` bytes an element (the parameter buffer's own
    dtype, or 2 for the 16-bit gradients of a :class:`HalfGrads`). ``bounds`` (intp, one
    entry more than ``sources``) starts at 0 and never decreases. ``keep`` is held for the
    table's life: the objects owning the memory. ``table[lo:hi]`` is the table of elements
    ``[lo, hi)`` (no copy), as a flat buffer slices. A kernel checks only the itemsize and
    the length; the caller guarantees that every address is valid for ``bounds`` while the
    table is in use.
    """
    cdef const Py_ssize_t[::1] bounds
    cdef const intptr_t[::1] sources
    cdef readonly Py_ssize_t itemsize, offset, size
    cdef readonly object keep

    def __init__(self, const Py_ssize_t[::1] bounds not None, const intptr_t[::1] sources not None,
                 Py_ssize_t itemsize, keep=None):
        cdef Py_ssize_t k, n = sources.shape[0]
        if bounds.shape[0] != n + 1:
            raise ValueError(f"bounds must have len(sources) + 1 = {n + 1} entries, got {bounds.shape[0]}")
        if bounds[0] != 0:
            raise ValueError(f"bounds must start at 0, got {bounds[0]}")
        for k in range(n):
            if bounds[k + 1] < bounds[k]:
                raise ValueError(f"bounds must not decrease; bounds[{k + 1}] < bounds[{k}]")
        if itemsize not in (2, 4, 8):
            raise ValueError(f"itemsize must be 2, 4 or 8, got {itemsize}")
        self.bounds, self.sources, self.itemsize, self.keep = bounds, sources, itemsize, keep
        self.offset, self.size = 0, bounds[n]

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        lo, hi = _slice_bounds(key, self.size, "GradTable")
        cdef GradTable part = GradTable.__new__(GradTable)
        part.bounds, part.sources, part.itemsize, part.keep = self.bounds, self.sources, self.itemsize, self.keep
        part.offset, part.size = self.offset + lo, hi - lo
        return part

    def __repr__(self):
        return (f"<GradTable of {self.sources.shape[0]} sources, elements "
                f"[{self.offset}, {self.offset + self.size}), itemsize {self.itemsize}>")


cdef tuple _slice_bounds(key, Py_ssize_t size, str what):
    """``(lo, hi)`` of a step-1 slice ``key`` of ``size`` elements, ``hi >= lo``."""
    if not isinstance(key, slice) or (key.step is not None and key.step != 1):
        raise TypeError(f"a {what} takes a slice with step 1, got {key!r}")
    lo, hi, _ = key.indices(size)
    return lo, max(hi, lo)


@cython.auto_pickle(False)  # as GradTable
cdef class HalfGrads:
    """Mixed precision in one pass: a step kernel's ``grad`` argument over a float32 master.

    ``HalfGrads(grad, half_params, kind)``: ``grad`` holds the 16-bit gradients, as bit
    patterns (a flat ``uint16`` buffer, or a :class:`GradTable` of itemsize 2); ``kind`` is
    ``KIND_BF16`` or ``KIND_FP16``. The kernel widens them exactly, updates the float32
    master (its ``param``) and state as from float32 gradients, and writes each updated
    master value, rounded to nearest even, to ``half_params`` (``uint16``, the same
    length): bit for bit ``widen16``, the kernel, then ``narrow16``, in one pass over
    memory. ``h[lo:hi]`` slices both, as a flat buffer slices.
    """
    cdef const uint16_t[::1] flat
    cdef GradTable table
    cdef uint16_t[::1] half_params
    cdef readonly int kind
    cdef readonly Py_ssize_t size

    def __init__(self, grad, uint16_t[::1] half_params not None, int kind):
        if kind != KIND_BF16 and kind != KIND_FP16:
            raise ValueError(f"kind must be KIND_BF16 ({KIND_BF16}) or KIND_FP16 ({KIND_FP16}), got {kind}")
        if type(grad) is GradTable:
            self.table = grad
            if self.table.itemsize != 2:
                raise ValueError(f"grad: a GradTable of 16-bit gradients (itemsize 2), got itemsize {self.table.itemsize}")
            self.size = self.table.size
        else:
            self.flat = grad
            self.size = self.flat.shape[0]
        if half_params.shape[0] != self.size:
            raise ValueError(f"half_params has {half_params.shape[0]} elements, grad {self.size}")
        self.half_params, self.kind = half_params, kind

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        lo, hi = _slice_bounds(key, self.size, "HalfGrads")
        cdef HalfGrads part = HalfGrads.__new__(HalfGrads)
        if self.table is not None:
            part.table = self.table[lo:hi]
        else:
            part.flat = self.flat[lo:hi]
        part.half_params, part.kind, part.size = self.half_params[lo:hi], self.kind, hi - lo
        return part

    def __repr__(self):
        kind = "bfloat16" if self.kind == KIND_BF16 else "float16"
        return f"<HalfGrads of {self.size} {kind} elements>"


cdef int _grads(object grad, floating[::1] param, _Grads* out) except -1:
    """Fill ``out`` for a kernel over ``param``: from a flat buffer (which the caller's
    reference keeps alive), a :class:`GradTable` of this dtype and length, or (a float32
    ``param``) a :class:`HalfGrads` of this length."""
    cdef const floating[::1] flat
    cdef GradTable table
    cdef HalfGrads half = None
    cdef Py_ssize_t itemsize
    out.kind = -1
    out.half_params = NULL
    if type(grad) is HalfGrads:
        half = grad
        if floating is not float or half.size != param.shape[0]:
            raise ValueError(f"grad: a HalfGrads of {half.size} elements for a buffer of "
                             f"{param.shape[0]} elements of {sizeof(floating)} bytes (needs float32)")
        out.kind = half.kind
        out.half_params = &half.half_params[0] if half.size else NULL
        if half.table is None:
            out.flat = <const char*>&half.flat[0] if half.size else NULL
            out.n_sources = out.offset = 0
            return 0
        grad = half.table
    if type(grad) is GradTable:
        table = grad
        itemsize = 2 if half is not None else sizeof(floating)
        if table.itemsize != itemsize or table.size != param.shape[0]:
            raise ValueError(f"grad: a GradTable of {table.size} elements of {table.itemsize} bytes "
                             f"for a buffer of {param.shape[0]} elements of {sizeof(floating)}")
        out.flat = NULL
        out.bounds = &table.bounds[0]
        out.sources = &table.sources[0] if table.sources.shape[0] else NULL
        out.n_sources = table.sources.shape[0]
        out.offset = table.offset
        return 0
    flat = grad
    if flat.shape[0] != param.shape[0]:
        raise ValueError(f"grad has {flat.shape[0]} elements, param {param.shape[0]}")
    out.flat = <const char*>&flat[0] if flat.shape[0] else NULL
    out.n_sources = 0
    out.offset = 0
    return 0


cdef inline floating _direction(floating g, floating p, floating scale,
                                floating weight_decay) noexcept nogil:
    """The gradient as the update sees it: scaled, sign-flipped for ``maximize`` (folded
    into ``scale``), plus coupled (L2) weight decay."""
    g = g * scale
    if weight_decay != 0:
        g = g + weight_decay * p
    return g


cdef inline void _sgd(floating[::1] param, const _Grads* grads,
                      floating[::1] momentum_buffer, Py_ssize_t lo, Py_ssize_t hi, floating lr_,
                      floating m, floating c, floating wd, floating scale, bint use_momentum,
                      bint init_buffer, bint nesterov) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating d, b
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            d = _direction(g[i - lo], param[i], scale, wd)
            if use_momentum:
                if init_buffer:
                    b = d
                else:
                    b = m * momentum_buffer[i] + c * d
                momentum_buffer[i] = b
                if nesterov:
                    d = d + m * b
                else:
                    d = b
            param[i] = param[i] - lr_ * d
        _piece_done(grads, param, lo, end)
        lo = end


cdef inline void _sgd_unswitched(floating[::1] param, const _Grads* grad,
                                 floating[::1] momentum_buffer, Py_ssize_t lo, Py_ssize_t hi,
                                 floating lr_, floating m, floating c, floating wd,
                                 floating scale, bint use_momentum, bint init_buffer,
                                 bint nesterov) noexcept nogil:
    """``_sgd`` with its loop-invariant flags as literal constants, one call per case.
    Inlined into the ``def`` wrapper, gcc 12 does not unswitch ``_sgd``'s loop on three
    flags (plus ``_direction``'s weight-decay test) by itself: "control flow in loop", not
    vectorised, 3-4x slower at 4096 float32 elements. The constants do the unswitching."""
    if not use_momentum:
        _sgd(param, grad, momentum_buffer, lo, hi, lr_, m, c, wd, scale, False, False, False)
    elif init_buffer:  # the first step only
        _sgd(param, grad, momentum_buffer, lo, hi, lr_, m, c, wd, scale, True, True, nesterov)
    elif nesterov:
        _sgd(param, grad, momentum_buffer, lo, hi, lr_, m, c, wd, scale, True, False, True)
    else:
        _sgd(param, grad, momentum_buffer, lo, hi, lr_, m, c, wd, scale, True, False, False)


def sgd(floating[::1] param, grad, floating[::1] momentum_buffer,
        double lr, double momentum, double dampening, double weight_decay,
        bint nesterov, bint maximize, bint init_buffer, double grad_scale, int n_threads):
    """torch.optim.SGD, in place. ``momentum_buffer`` is unused (may be empty) when
    ``momentum == 0``; when ``init_buffer`` it is set to the gradient (torch's first step).
    ``grad`` is a flat buffer or a :class:`GradTable`.
    """
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t, n = param.shape[0], parts = _parts(n, n_threads)
    cdef floating lr_ = lr, m = momentum, c = 1.0 - dampening, wd = weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    cdef bint use_momentum = momentum != 0
    if _inline_call(n, parts):
        _sgd_unswitched(param, &g, momentum_buffer, 0, n, lr_, m, c, wd, scale,
                        use_momentum, init_buffer, nesterov)
        return
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _sgd_unswitched(param, &g, momentum_buffer, _lo(t, n, parts), _lo(t + 1, n, parts),
                        lr_, m, c, wd, scale, use_momentum, init_buffer, nesterov)


cdef inline void _momentum(floating[::1] param, const _Grads* grads,
                           floating[::1] velocity, Py_ssize_t lo, Py_ssize_t hi, floating lr_,
                           floating b, floating c, floating wd, floating scale) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating v
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            v = b * velocity[i] + c * _direction(g[i - lo], param[i], scale, wd)
            velocity[i] = v
            param[i] = param[i] - lr_ * v
        _piece_done(grads, param, lo, end)
        lo = end


def momentum(floating[::1] param, grad, floating[::1] velocity,
             double lr, double beta, double weight_decay, bint maximize,
             double grad_scale, int n_threads):
    """Textbook momentum, in place: ``v = beta*v + (1-beta)*g; p -= lr*v``. ``grad`` is a
    flat buffer or a :class:`GradTable`."""
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t, n = param.shape[0], parts = _parts(n, n_threads)
    cdef floating lr_ = lr, b = beta, c = 1.0 - beta, wd = weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    if _inline_call(n, parts):
        _momentum(param, &g, velocity, 0, n, lr_, b, c, wd, scale)
        return
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _momentum(param, &g, velocity, _lo(t, n, parts), _lo(t + 1, n, parts), lr_, b, c,
                  wd, scale)


# ---- gradient hygiene: norms and finiteness, read-only passes ----------------------------

from libc.math cimport fabs, pow

# Norm partial sums are taken over fixed blocks, each summed in a fixed order (8 lanes,
# then the lanes in order), so the result never depends on the thread count or ISA.
NORM_BLOCK = 16384
cdef Py_ssize_t _NORM_BLOCK = NORM_BLOCK


cdef inline double _block_pow_sum(const floating[::1] x, Py_ssize_t lo, Py_ssize_t hi,
                                  double p) noexcept nogil:
    """sum(|x[lo:hi]|**p) in double: p == 1 and 2 have exact fast paths."""
    cdef double s[8]
    cdef double v
    cdef Py_ssize_t i, k
    for k in range(8):
        s[k] = 0.0
    i = lo
    if p == 2.0:
        while i + 8 <= hi:
            for k in range(8):
                v = x[i + k]
                s[k] += v * v
            i += 8
        while i < hi:
            v = x[i]
            s[0] += v * v
            i += 1
    elif p == 1.0:
        while i + 8 <= hi:
            for k in range(8):
                s[k] += fabs(<double>x[i + k])
            i += 8
        while i < hi:
            s[0] += fabs(<double>x[i])
            i += 1
    else:
        while i < hi:
            s[0] += pow(fabs(<double>x[i]), p)
            i += 1
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


cdef inline double _block_abs_max(const floating[::1] x, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """max(|x[lo:hi]|), NaN if any element is NaN."""
    cdef double m = 0.0
    cdef double v
    cdef Py_ssize_t i
    for i in range(lo, hi):
        v = fabs(<double>x[i])
        if v > m or v != v:
            m = v
            if m != m:
                break
    return m


def norm_partials(const floating[::1] x, double norm_type, double[::1] partials_out, int n_threads):
    """Per-block ``sum(|x|**p)`` (or ``max|x|`` for ``p = inf``) into ``partials_out``,
    one entry per ``NORM_BLOCK`` elements; the caller combines them in order."""
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t n_blocks = partials_out.shape[0]
    cdef Py_ssize_t b, lo, hi
    cdef bint inf_norm = norm_type == float("inf")
    for b in prange(n_blocks, nogil=True, schedule="static", num_threads=n_threads,
                    use_threads_if=_use_threads(n, n_threads) and n_blocks > 1):
        lo = b * _NORM_BLOCK
        hi = min(lo + _NORM_BLOCK, n)
        if inf_norm:
            partials_out[b] = _block_abs_max(x, lo, hi)
        else:
            partials_out[b] = _block_pow_sum(x, lo, hi, norm_type)


def count_nonfinite(const floating[::1] x, int n_threads):
    """How many elements of ``x`` are inf or NaN (``x - x`` is 0 exactly when finite)."""
    cdef Py_ssize_t i, n = x.shape[0]
    cdef Py_ssize_t count = 0
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                    use_threads_if=_use_threads(n, n_threads)):
        count += (x[i] - x[i]) != 0
    return count


# ---- benchmark reference -------------------------------------------------------------------

def stream_add(floating[::1] a_out, const floating[::1] b, int n_threads):
    """``a_out += b``: the simplest in-place streaming pass (2 reads, 1 write per element),
    timed by ``flatopt.bench`` as the memory-bandwidth reference."""
    cdef Py_ssize_t i, n = a_out.shape[0]
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                    use_threads_if=_use_threads(n, n_threads)):
        a_out[i] = a_out[i] + b[i]


cdef inline void _add3(floating[::1] a_out, floating[::1] c_out, floating[::1] d_out,
                       const floating[::1] b, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating x
    for i in range(lo, hi):
        x = b[i]
        a_out[i] = a_out[i] + x
        c_out[i] = c_out[i] + x
        d_out[i] = d_out[i] + x


def stream_add3(floating[::1] a_out, floating[::1] c_out, floating[::1] d_out,
                const floating[::1] b, int n_threads):
    """``a_out += b; c_out += b; d_out += b`` in one pass, split into chunks as the step
    kernels are: Adam's memory traffic (param, grad and two moments read, three of them
    written) with next to no arithmetic, timed by ``benchmarks/bench_large.py`` as the
    ceiling of a one-pass Adam step."""
    cdef Py_ssize_t t, n = a_out.shape[0]
    if not c_out.shape[0] == d_out.shape[0] == b.shape[0] == n:
        raise ValueError(f"stream_add3: expected four arrays of one length, got {n}, "
                         f"{c_out.shape[0]}, {d_out.shape[0]} and {b.shape[0]} elements")
    cdef Py_ssize_t parts = _parts(n, n_threads)
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _add3(a_out, c_out, d_out, b, _lo(t, n, parts), _lo(t + 1, n, parts))


# -- the adaptive family ----------------------------------------------------------------------
# Element formulas follow torch.optim's single-tensor implementations operation for
# operation (torch 2.x): ``mul_(b).addcmul_(g, g, value=c)`` is ``s*b + (c*g)*g``,
# ``addcdiv_(t1, t2, value=v)`` is ``p + (v*t1)/t2``, ``lerp_`` is ``_lerp`` below, and eps
# is added after the square root (Adam, RMSprop, Adagrad). Step-dependent scalars (bias
# corrections, Adagrad's decayed lr) are computed once per call in double, then cast.
# The one exception, for speed, is Adam's bias-correction divide (see ``adam``).

from libc.math cimport copysign, copysignf, fabsf, sqrt, sqrtf


cdef inline floating _sqrt(floating x) noexcept nogil:
    """Square root in the buffer's precision (sqrtf keeps float32 loops float32-wide)."""
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _lerp(floating start, floating end, floating weight,
                           floating one_minus_weight, bint small) noexcept nogil:
    """torch.lerp: ``start + w*(end-start)`` when ``|w| < 0.5``, else
    ``end - (end-start)*(1-w)``; ``small`` and ``1-w`` are computed once per call."""
    if small:
        return start + weight * (end - start)
    return end - (end - start) * one_minus_weight


cdef inline floating _square_avg(floating s, floating d, floating a, floating c) noexcept nogil:
    """``s.mul_(a).addcmul_(d, d, value=c)`` for one element."""
    return s * a + (c * d) * d


cdef inline floating _adam_moments(floating grad, floating p, floating[::1] exp_avg,
                                   floating[::1] exp_avg_sq, Py_ssize_t i, floating w1,
                                   floating one_minus_w1, bint small1, floating b2,
                                   floating c2, floating wd, floating scale, floating* m,
                                   floating* v) noexcept nogil:
    """Adam's moments for element ``i`` (Adam, NAdam, RAdam): returns the direction ``d``
    of gradient ``grad`` at parameter value ``p``; ``m = lerp(exp_avg[i], d, 1 - beta1)``
    and ``v = beta2*exp_avg_sq[i] + (1-beta2)*d*d`` are stored back and set in ``m[0]``,
    ``v[0]``."""
    cdef floating d = _direction(grad, p, scale, wd)
    m[0] = _lerp(exp_avg[i], d, w1, one_minus_w1, small1)
    v[0] = _square_avg(exp_avg_sq[i], d, b2, c2)
    exp_avg[i] = m[0]
    exp_avg_sq[i] = v[0]
    return d


cdef inline void _adam(floating[::1] param, const _Grads* grads, floating[::1] exp_avg,
                       floating[::1] exp_avg_sq, floating[::1] max_exp_avg_sq, Py_ssize_t lo,
                       Py_ssize_t hi, floating neg_step_size, floating inv_bc2_sqrt,
                       floating eps_, floating b2, floating c2, floating w1,
                       floating one_minus_w1, bint small1, floating decay, floating wd,
                       floating scale, bint amsgrad) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating p, m, v, v_max
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            p = param[i]
            _adam_moments(g[i - lo], p, exp_avg, exp_avg_sq, i, w1, one_minus_w1, small1, b2,
                          c2, wd, scale, &m, &v)
            p = p * decay
            if amsgrad:
                v_max = max_exp_avg_sq[i]
                if v_max > v or v_max != v_max:  # a NaN propagates, as in torch.maximum
                    v = v_max
                max_exp_avg_sq[i] = v
            param[i] = p + (neg_step_size * m) / (_sqrt(v) * inv_bc2_sqrt + eps_)
        _piece_done(grads, param, lo, end)
        lo = end


cdef inline void _adam_unswitched(floating[::1] param, const _Grads* grads,
                                  floating[::1] exp_avg, floating[::1] exp_avg_sq,
                                  floating[::1] max_exp_avg_sq, Py_ssize_t lo, Py_ssize_t hi,
                                  floating neg_step_size, floating inv_bc2_sqrt, floating eps_,
                                  floating b2, floating c2, floating w1, floating one_minus_w1,
                                  bint small1, floating decay, floating wd, floating scale,
                                  bint amsgrad) noexcept nogil:
    """``_adam`` with ``amsgrad`` a literal constant. gcc 12 does not unswitch the element
    loop inside the piece loop by itself, and the conditional store to ``max_exp_avg_sq``
    then keeps it from vectorising ("control flow in loop"; as ``_sgd_unswitched``)."""
    if amsgrad:
        _adam(param, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, lo, hi, neg_step_size,
              inv_bc2_sqrt, eps_, b2, c2, w1, one_minus_w1, small1, decay, wd, scale, True)
    else:
        _adam(param, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, lo, hi, neg_step_size,
              inv_bc2_sqrt, eps_, b2, c2, w1, one_minus_w1, small1, decay, wd, scale, False)


def adam(floating[::1] param, grad, floating[::1] exp_avg,
         floating[::1] exp_avg_sq, floating[::1] max_exp_avg_sq, Py_ssize_t step,
         double lr, double beta1, double beta2, double eps, double weight_decay,
         bint amsgrad, bint decoupled, bint maximize, double grad_scale, int n_threads):
    """torch.optim.Adam / AdamW (``decoupled``), in place, for the 1-based ``step``.

    ``max_exp_avg_sq`` is unused (may be empty) unless ``amsgrad``. ``grad`` is a flat
    buffer or a :class:`GradTable`.

    One deliberate departure from torch's operation order: ``sqrt(v) / sqrt(bc2)`` is
    computed as ``sqrt(v) * (1/sqrt(bc2))``, the reciprocal taken once per call in double.
    Division and square root are what bound this kernel in cache; dropping one of the two
    divisions per element makes it ~1.35x faster (2**20 float32, 2 threads: 210 -> 156 us)
    and moves the result by at most an ulp of the denominator per step.
    """
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t, n = param.shape[0], parts = _parts(n, n_threads)
    cdef double bias_correction1 = 1.0 - beta1 ** step
    cdef double bias_correction2 = 1.0 - beta2 ** step
    cdef floating neg_step_size = -(lr / bias_correction1)
    cdef floating inv_bc2_sqrt = 1.0 / sqrt(bias_correction2)
    cdef floating eps_ = eps, b2 = beta2, c2 = 1.0 - beta2
    cdef floating w1 = 1.0 - beta1
    cdef floating one_minus_w1 = 1 - w1
    cdef bint small1 = w1 < 0.5
    # Decoupled decay multiplies the parameter by (1 - lr*wd); by exactly 1 otherwise.
    cdef floating decay = 1.0 - lr * weight_decay if decoupled else 1.0
    cdef floating wd = 0.0 if decoupled else weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    if _inline_call(n, parts):
        _adam_unswitched(param, &g, exp_avg, exp_avg_sq, max_exp_avg_sq, 0, n, neg_step_size,
                         inv_bc2_sqrt, eps_, b2, c2, w1, one_minus_w1, small1, decay, wd,
                         scale, amsgrad)
        return
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _adam_unswitched(param, &g, exp_avg, exp_avg_sq, max_exp_avg_sq, _lo(t, n, parts),
                         _lo(t + 1, n, parts), neg_step_size, inv_bc2_sqrt, eps_, b2, c2, w1,
                         one_minus_w1, small1, decay, wd, scale, amsgrad)


cdef inline void _rmsprop(floating[::1] param, const _Grads* grads, floating[::1] square_avg,
                          floating[::1] grad_avg, floating[::1] momentum_buffer, Py_ssize_t lo,
                          Py_ssize_t hi, floating neg_lr, floating a, floating c,
                          floating one_minus_c, bint small, floating eps_, floating mom,
                          floating wd, floating scale, bint centered,
                          bint use_momentum) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating d, s, ga, b, denom
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            d = _direction(g[i - lo], param[i], scale, wd)
            s = _square_avg(square_avg[i], d, a, c)
            square_avg[i] = s
            if centered:
                ga = _lerp(grad_avg[i], d, c, one_minus_c, small)
                grad_avg[i] = ga
                denom = _sqrt(s - ga * ga) + eps_
            else:
                denom = _sqrt(s) + eps_
            if use_momentum:
                b = momentum_buffer[i] * mom + d / denom
                momentum_buffer[i] = b
                param[i] = param[i] + neg_lr * b
            else:
                param[i] = param[i] + (neg_lr * d) / denom
        _piece_done(grads, param, lo, end)
        lo = end


cdef inline void _rmsprop_unswitched(floating[::1] param, const _Grads* grads,
                                     floating[::1] square_avg, floating[::1] grad_avg,
                                     floating[::1] momentum_buffer, Py_ssize_t lo, Py_ssize_t hi,
                                     floating neg_lr, floating a, floating c,
                                     floating one_minus_c, bint small, floating eps_,
                                     floating mom, floating wd, floating scale, bint centered,
                                     bint use_momentum) noexcept nogil:
    """``_rmsprop`` with its (centered, momentum) flags as literal constants, one loop per
    variant: gcc does not unswitch a loop with two conditional stores, and a loop with a
    conditional store does not vectorise (as ``_sgd_unswitched``)."""
    if centered and use_momentum:
        _rmsprop(param, grads, square_avg, grad_avg, momentum_buffer, lo, hi, neg_lr, a, c,
                 one_minus_c, small, eps_, mom, wd, scale, True, True)
    elif centered:
        _rmsprop(param, grads, square_avg, grad_avg, momentum_buffer, lo, hi, neg_lr, a, c,
                 one_minus_c, small, eps_, mom, wd, scale, True, False)
    elif use_momentum:
        _rmsprop(param, grads, square_avg, grad_avg, momentum_buffer, lo, hi, neg_lr, a, c,
                 one_minus_c, small, eps_, mom, wd, scale, False, True)
    else:
        _rmsprop(param, grads, square_avg, grad_avg, momentum_buffer, lo, hi, neg_lr, a, c,
                 one_minus_c, small, eps_, mom, wd, scale, False, False)


def rmsprop(floating[::1] param, grad, floating[::1] square_avg,
            floating[::1] grad_avg, floating[::1] momentum_buffer, double lr, double alpha,
            double eps, double weight_decay, double momentum, bint centered, bint maximize,
            double grad_scale, int n_threads):
    """torch.optim.RMSprop, in place. ``grad_avg`` is unused (may be empty) unless
    ``centered``; ``momentum_buffer`` unless ``momentum > 0``. ``grad`` is a flat buffer or
    a :class:`GradTable`."""
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t, n = param.shape[0], parts = _parts(n, n_threads)
    cdef floating neg_lr = -lr, a = alpha, c = 1.0 - alpha, eps_ = eps, mom = momentum
    cdef floating one_minus_c = 1 - c
    cdef bint small = c < 0.5
    cdef floating wd = weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    cdef bint use_momentum = momentum > 0
    if _inline_call(n, parts):
        _rmsprop_unswitched(param, &g, square_avg, grad_avg, momentum_buffer, 0, n, neg_lr, a,
                            c, one_minus_c, small, eps_, mom, wd, scale, centered, use_momentum)
        return
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _rmsprop_unswitched(param, &g, square_avg, grad_avg, momentum_buffer, _lo(t, n, parts),
                            _lo(t + 1, n, parts), neg_lr, a, c, one_minus_c, small, eps_, mom,
                            wd, scale, centered, use_momentum)


cdef inline void _adadelta(floating[::1] param, const _Grads* grads, floating[::1] square_avg,
                           floating[::1] acc_delta, Py_ssize_t lo, Py_ssize_t hi,
                           floating neg_lr, floating r, floating c, floating eps_, floating wd,
                           floating scale) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating d, s, delta, acc
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            d = _direction(g[i - lo], param[i], scale, wd)
            s = _square_avg(square_avg[i], d, r, c)
            square_avg[i] = s
            acc = acc_delta[i]
            delta = _sqrt(acc + eps_) / _sqrt(s + eps_) * d
            acc_delta[i] = _square_avg(acc, delta, r, c)
            param[i] = param[i] + neg_lr * delta
        _piece_done(grads, param, lo, end)
        lo = end


def adadelta(floating[::1] param, grad, floating[::1] square_avg,
             floating[::1] acc_delta, double lr, double rho, double eps, double weight_decay,
             bint maximize, double grad_scale, int n_threads):
    """torch.optim.Adadelta, in place. ``grad`` is a flat buffer or a :class:`GradTable`."""
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t, n = param.shape[0], parts = _parts(n, n_threads)
    cdef floating neg_lr = -lr, r = rho, c = 1.0 - rho, eps_ = eps, wd = weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    if _inline_call(n, parts):
        _adadelta(param, &g, square_avg, acc_delta, 0, n, neg_lr, r, c, eps_, wd, scale)
        return
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _adadelta(param, &g, square_avg, acc_delta, _lo(t, n, parts), _lo(t + 1, n, parts),
                  neg_lr, r, c, eps_, wd, scale)


cdef inline void _adagrad(floating[::1] param, const _Grads* grads, floating[::1] state_sum,
                          Py_ssize_t lo, Py_ssize_t hi, floating neg_clr, floating eps_,
                          floating wd, floating scale) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating d, s
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            d = _direction(g[i - lo], param[i], scale, wd)
            s = state_sum[i] + d * d
            state_sum[i] = s
            param[i] = param[i] + (neg_clr * d) / (_sqrt(s) + eps_)
        _piece_done(grads, param, lo, end)
        lo = end


def adagrad(floating[::1] param, grad, floating[::1] state_sum,
            Py_ssize_t step, double lr, double lr_decay, double eps, double weight_decay,
            bint maximize, double grad_scale, int n_threads):
    """torch.optim.Adagrad, in place, for the 1-based ``step`` (decays the lr). ``grad`` is
    a flat buffer or a :class:`GradTable`."""
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t, n = param.shape[0], parts = _parts(n, n_threads)
    cdef double clr = lr / (1.0 + (step - 1) * lr_decay)
    cdef floating neg_clr = -clr, eps_ = eps, wd = weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    if _inline_call(n, parts):
        _adagrad(param, &g, state_sum, 0, n, neg_clr, eps_, wd, scale)
        return
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _adagrad(param, &g, state_sum, _lo(t, n, parts), _lo(t + 1, n, parts), neg_clr, eps_,
                 wd, scale)


# -- Adam's variants: NAdam, RAdam, Adamax (torch.optim) and Lion ----------------------------
# Same conventions as the adaptive family above: torch's single-tensor operations, in
# torch's order; step-dependent scalars in C double (``pow`` where torch's Python code
# writes ``**``, so that they are torch's doubles bit for bit), then cast to ``floating``.


cdef inline void _nadam(floating[::1] param, const _Grads* grads, floating[::1] exp_avg,
                        floating[::1] exp_avg_sq, Py_ssize_t lo, Py_ssize_t hi,
                        floating grad_coef, floating avg_coef, floating bc2, floating eps_,
                        floating b2, floating c2, floating w1, floating one_minus_w1,
                        bint small1, floating decay, floating wd,
                        floating scale) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating p, d, m, v, denom
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            p = param[i]
            d = _adam_moments(g[i - lo], p, exp_avg, exp_avg_sq, i, w1, one_minus_w1, small1,
                              b2, c2, wd, scale, &m, &v)
            p = p * decay
            denom = _sqrt(v / bc2) + eps_
            p = p + (grad_coef * d) / denom
            param[i] = p + (avg_coef * m) / denom
        _piece_done(grads, param, lo, end)
        lo = end


def nadam(floating[::1] param, grad, floating[::1] exp_avg,
          floating[::1] exp_avg_sq, Py_ssize_t step, double mu_product, bint mu_product_float32,
          double lr, double beta1, double beta2, double eps, double weight_decay,
          double momentum_decay, bint decoupled, bint maximize, double grad_scale,
          int n_threads):
    """torch.optim.NAdam, in place, for the 1-based ``step``; returns the new mu_product.
    ``grad`` is a flat buffer or a :class:`GradTable`.

    ``mu_product`` is the product of the momentum schedule ``mu_t`` over the steps
    before this one (1.0 before the first). torch keeps it in a scalar tensor of its
    default dtype: with ``mu_product_float32`` the running product is rounded to float32
    as torch does then (``mu_product *= mu`` in float32), otherwise it is a double.
    """
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t, n = param.shape[0], parts = _parts(n, n_threads)
    cdef double bias_correction2 = 1.0 - pow(beta2, <double>step)
    cdef double mu = beta1 * (1.0 - 0.5 * pow(0.96, step * momentum_decay))
    cdef double mu_next = beta1 * (1.0 - 0.5 * pow(0.96, (step + 1) * momentum_decay))
    if mu_product_float32:
        mu_product = <float>(<float>mu_product * <float>mu)
    else:
        mu_product = mu_product * mu
    cdef double mu_product_next = mu_product * mu_next
    cdef floating grad_coef = (-lr * (1.0 - mu)) / (1.0 - mu_product)
    cdef floating avg_coef = (-lr * mu_next) / (1.0 - mu_product_next)
    cdef floating bc2 = bias_correction2
    cdef floating eps_ = eps, b2 = beta2, c2 = 1.0 - beta2
    cdef floating w1 = 1.0 - beta1
    cdef floating one_minus_w1 = 1 - w1
    cdef bint small1 = w1 < 0.5
    cdef floating decay = 1.0 - lr * weight_decay if decoupled else 1.0
    cdef floating wd = 0.0 if decoupled else weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    if _inline_call(n, parts):
        _nadam(param, &g, exp_avg, exp_avg_sq, 0, n, grad_coef, avg_coef, bc2, eps_, b2, c2,
               w1, one_minus_w1, small1, decay, wd, scale)
        return mu_product
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _nadam(param, &g, exp_avg, exp_avg_sq, _lo(t, n, parts), _lo(t + 1, n, parts),
               grad_coef, avg_coef, bc2, eps_, b2, c2, w1, one_minus_w1, small1, decay, wd,
               scale)
    return mu_product


cdef inline void _radam(floating[::1] param, const _Grads* grads, floating[::1] exp_avg,
                        floating[::1] exp_avg_sq, Py_ssize_t lo, Py_ssize_t hi,
                        bint rectified, floating rect, floating sqrt_bc2, floating bc1,
                        floating lr_, floating eps_, floating b2, floating c2, floating w1,
                        floating one_minus_w1, bint small1, floating decay, floating wd,
                        floating scale) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating p, m, v, u, one = 1.0
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            p = param[i]
            _adam_moments(g[i - lo], p, exp_avg, exp_avg_sq, i, w1, one_minus_w1, small1, b2,
                          c2, wd, scale, &m, &v)
            p = p * decay
            u = m / bc1 * lr_
            if rectified:
                u = u * (one / (_sqrt(v) + eps_) * sqrt_bc2) * rect
            param[i] = p - u
        _piece_done(grads, param, lo, end)
        lo = end


def radam(floating[::1] param, grad, floating[::1] exp_avg,
          floating[::1] exp_avg_sq, Py_ssize_t step, double lr, double beta1, double beta2,
          double eps, double weight_decay, bint decoupled, bint maximize, double grad_scale,
          int n_threads):
    """torch.optim.RAdam, in place, for the 1-based ``step``; returns whether the step was
    rectified (torch's ``rho_t > 5``: the adaptive step), else it was plain momentum SGD.
    ``grad`` is a flat buffer or a :class:`GradTable`.

    torch's element order: ``m/bc1 * lr * (sqrt(bc2) * (1/(sqrt(v) + eps))) * rect``
    (``scalar / tensor`` is ``tensor.reciprocal() * scalar`` in torch).
    """
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t, n = param.shape[0], parts = _parts(n, n_threads)
    cdef double bias_correction1 = 1.0 - pow(beta1, <double>step)
    cdef double bias_correction2 = 1.0 - pow(beta2, <double>step)
    cdef double rho_inf = 2.0 / (1.0 - beta2) - 1.0
    cdef double rho_t = rho_inf - 2.0 * step * pow(beta2, <double>step) / bias_correction2
    cdef bint rectified = rho_t > 5.0
    cdef double rect_d = 0.0
    if rectified:
        rect_d = pow((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                     / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), 0.5)
    cdef floating rect = rect_d
    cdef floating sqrt_bc2 = pow(bias_correction2, 0.5)
    cdef floating bc1 = bias_correction1, lr_ = lr, eps_ = eps
    cdef floating b2 = beta2, c2 = 1.0 - beta2
    cdef floating w1 = 1.0 - beta1
    cdef floating one_minus_w1 = 1 - w1
    cdef bint small1 = w1 < 0.5
    cdef floating decay = 1.0 - lr * weight_decay if decoupled else 1.0
    cdef floating wd = 0.0 if decoupled else weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    if _inline_call(n, parts):
        _radam(param, &g, exp_avg, exp_avg_sq, 0, n, rectified, rect, sqrt_bc2, bc1, lr_, eps_,
               b2, c2, w1, one_minus_w1, small1, decay, wd, scale)
        return rectified
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _radam(param, &g, exp_avg, exp_avg_sq, _lo(t, n, parts), _lo(t + 1, n, parts),
               rectified, rect, sqrt_bc2, bc1, lr_, eps_, b2, c2, w1, one_minus_w1, small1,
               decay, wd, scale)
    return rectified


cdef inline void _adamax(floating[::1] param, const _Grads* grads, floating[::1] exp_avg,
                         floating[::1] exp_inf, Py_ssize_t lo, Py_ssize_t hi, floating neg_clr,
                         floating eps_, floating b2, floating w1, floating one_minus_w1,
                         bint small1, floating wd, floating scale) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating d, m, u, a
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            d = _direction(g[i - lo], param[i], scale, wd)
            m = _lerp(exp_avg[i], d, w1, one_minus_w1, small1)
            exp_avg[i] = m
            u = exp_inf[i] * b2
            a = fabs(d) + eps_
            if not (u > a or u != u):
                u = a
            exp_inf[i] = u
            param[i] = param[i] + (neg_clr * m) / u
        _piece_done(grads, param, lo, end)
        lo = end


def adamax(floating[::1] param, grad, floating[::1] exp_avg,
           floating[::1] exp_inf, Py_ssize_t step, double lr, double beta1, double beta2,
           double eps, double weight_decay, bint maximize, double grad_scale, int n_threads):
    """torch.optim.Adamax, in place, for the 1-based ``step``:
    ``u = max(beta2*u, |g| + eps)``, ``p -= lr/bc1 * m / u`` (NaN propagates, as
    torch.maximum). ``grad`` is a flat buffer or a :class:`GradTable`."""
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t, n = param.shape[0], parts = _parts(n, n_threads)
    cdef double clr = lr / (1.0 - pow(beta1, <double>step))
    cdef floating neg_clr = -clr, eps_ = eps, b2 = beta2, wd = weight_decay
    cdef floating w1 = 1.0 - beta1
    cdef floating one_minus_w1 = 1 - w1
    cdef bint small1 = w1 < 0.5
    cdef floating scale = -grad_scale if maximize else grad_scale
    if _inline_call(n, parts):
        _adamax(param, &g, exp_avg, exp_inf, 0, n, neg_clr, eps_, b2, w1, one_minus_w1, small1,
                wd, scale)
        return
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _adamax(param, &g, exp_avg, exp_inf, _lo(t, n, parts), _lo(t + 1, n, parts), neg_clr,
                eps_, b2, w1, one_minus_w1, small1, wd, scale)


cdef inline floating _sign(floating x) noexcept nogil:
    """1, -1, or ``x`` itself for zeros and NaN (so NaN propagates, as torch.sign).

    One select on ``|x| > 0``, with ``copysign`` for the value: gcc 12 vectorises that
    (blends), where ``if x > 0 ... if x < 0`` left a branch per element in the AVX2 and
    baseline builds ("control flow in loop": the second compare may not be speculated
    under trapping math). Lion at 2**20 float32, 1 thread, AMD EPYC, random data: 9.7 ms
    a step with the branches, one mispredicted every other element."""
    cdef floating one = 1
    if floating is float:
        return copysignf(one, x) if fabsf(x) > 0 else x
    else:
        return copysign(one, x) if fabs(x) > 0 else x


cdef inline void _lion(floating[::1] param, const _Grads* grads, floating[::1] exp_avg,
                       Py_ssize_t lo, Py_ssize_t hi, floating neg_lr, floating b1, floating c1,
                       floating b2, floating c2, floating decay, floating scale) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating d, m
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            d = g[i - lo] * scale
            m = exp_avg[i]
            param[i] = param[i] * decay + neg_lr * _sign(m * b1 + c1 * d)
            exp_avg[i] = m * b2 + c2 * d
        _piece_done(grads, param, lo, end)
        lo = end


def lion(floating[::1] param, grad, floating[::1] exp_avg, double lr,
         double beta1, double beta2, double weight_decay, bint maximize, double grad_scale,
         int n_threads):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), in place:
    ``c = beta1*m + (1-beta1)*g``; ``p = p*(1 - lr*wd) - lr*sign(c)``;
    ``m = beta2*m + (1-beta2)*g`` (decoupled decay, as the paper, optax and DeepSpeed).
    ``grad`` is a flat buffer or a :class:`GradTable`."""
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t, n = param.shape[0], parts = _parts(n, n_threads)
    cdef floating neg_lr = -lr, b1 = beta1, c1 = 1.0 - beta1, b2 = beta2, c2 = 1.0 - beta2
    cdef floating decay = 1.0 - lr * weight_decay
    cdef floating scale = -grad_scale if maximize else grad_scale
    if _inline_call(n, parts):
        _lion(param, &g, exp_avg, 0, n, neg_lr, b1, c1, b2, c2, decay, scale)
        return
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _lion(param, &g, exp_avg, _lo(t, n, parts), _lo(t + 1, n, parts), neg_lr, b1, c1, b2,
              c2, decay, scale)


# -- Keras 3's formulas (flatopt.keras) -------------------------------------------------------
# Keras's backend-agnostic ``update_step`` of each optimizer, operation for operation. Keras
# casts its step-dependent scalars (beta powers, Adam's alpha, Nadam's momentum schedule)
# to the variable's dtype *before* computing them, so here they are computed in
# ``floating`` (powf for float32), not in double: in float32 ``1 - beta_2**t`` with beta_2
# rounded to float32 first differs from the double value by ~1e-5 relative. Hyperparameters
# Keras multiplies in as Python numbers (``1 - self.beta_1`` in Adam) are computed in
# double and cast, as there. Weight decay is Keras's, before the update, in the form its
# torch backend computes it, ``p = p * (1 - wd*lr)`` (the backend-agnostic code writes
# ``p - p*wd*lr``: equal in exact arithmetic, and in float32 the factor's rounding is
# systematic, the same every step, so the two forms drift apart by tens of ulp).

from libc.math cimport powf


cdef inline floating _pow(floating x, floating y) noexcept nogil:
    if floating is float:
        return powf(x, y)
    else:
        return pow(x, y)


def keras_weight_decay(floating[::1] param, double lr, double weight_decay, int n_threads):
    """Keras's decoupled weight decay, in place: ``p = p * (1 - wd*lr)``."""
    cdef Py_ssize_t i, n = param.shape[0]
    cdef floating factor = 1.0 - weight_decay * lr
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                    use_threads_if=_use_threads(n, n_threads)):
        param[i] = param[i] * factor


# The keras_* kernels loop in range functions over gradient pieces as the torch family's
# do (so they take a GradTable or a HalfGrads too, and open no parallel region when
# serial); ``_*_unswitched`` pass the flags behind a conditional store as literals, which
# gcc needs to vectorise the element loop (see ``_adam_unswitched``).

cdef inline void _keras_sgd(floating[::1] param, const _Grads* grads,
                            floating[::1] momentum_buffer, Py_ssize_t lo, Py_ssize_t hi,
                            floating lr_, floating mom, floating scale, floating factor,
                            bint decay, bint use_momentum, bint nesterov) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating p, d, m
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            p = param[i]
            d = g[i - lo] * scale
            if decay:
                p = p * factor
            if use_momentum:
                m = momentum_buffer[i] * mom - d * lr_
                momentum_buffer[i] = m
                if nesterov:
                    p = p + (m * mom - d * lr_)
                else:
                    p = p + m
            else:
                p = p - d * lr_
            param[i] = p
        _piece_done(grads, param, lo, end)
        lo = end


cdef inline void _keras_sgd_unswitched(floating[::1] param, const _Grads* grads,
                                       floating[::1] momentum_buffer, Py_ssize_t lo,
                                       Py_ssize_t hi, floating lr_, floating mom,
                                       floating scale, floating factor, bint decay,
                                       bint use_momentum, bint nesterov) noexcept nogil:
    if not use_momentum:
        _keras_sgd(param, grads, momentum_buffer, lo, hi, lr_, mom, scale, factor, decay,
                   False, False)
    elif nesterov:
        _keras_sgd(param, grads, momentum_buffer, lo, hi, lr_, mom, scale, factor, decay,
                   True, True)
    else:
        _keras_sgd(param, grads, momentum_buffer, lo, hi, lr_, mom, scale, factor, decay,
                   True, False)


def keras_sgd(floating[::1] param, grad, floating[::1] momentum_buffer,
              double lr, double momentum, bint nesterov, double weight_decay, double grad_scale,
              int n_threads):
    """keras.optimizers.SGD, in place: ``m = momentum*m - lr*g``; ``p += m`` (Nesterov:
    ``p += momentum*m - lr*g``); without momentum ``p -= lr*g``. ``momentum_buffer`` is
    unused (may be empty) when ``momentum == 0``. ``grad`` is a flat buffer, a
    :class:`GradTable` or a :class:`HalfGrads`."""
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t, n = param.shape[0], parts = _parts(n, n_threads)
    cdef floating lr_ = lr, mom = momentum, scale = grad_scale, factor = 1.0 - weight_decay * lr
    cdef bint decay = weight_decay != 0, use_momentum = momentum != 0
    if _inline_call(n, parts):
        _keras_sgd_unswitched(param, &g, momentum_buffer, 0, n, lr_, mom, scale, factor, decay,
                              use_momentum, nesterov)
        return
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _keras_sgd_unswitched(param, &g, momentum_buffer, _lo(t, n, parts), _lo(t + 1, n, parts),
                              lr_, mom, scale, factor, decay, use_momentum, nesterov)


cdef inline floating _keras_moments(floating grad, floating[::1] m_buf, floating[::1] v_buf,
                                    Py_ssize_t i, floating c1, floating c2, floating scale,
                                    floating* m, floating* v) noexcept nogil:
    """Keras's Adam moments for element ``i`` (Adam, Nadam): returns the scaled gradient
    ``d``; ``m += (d - m)*(1 - beta_1)`` and ``v += (d*d - v)*(1 - beta_2)`` are stored
    back and set in ``m[0]``, ``v[0]``."""
    cdef floating d = grad * scale
    m[0] = m_buf[i] + (d - m_buf[i]) * c1
    v[0] = v_buf[i] + (d * d - v_buf[i]) * c2
    m_buf[i] = m[0]
    v_buf[i] = v[0]
    return d


cdef inline void _keras_adam(floating[::1] param, const _Grads* grads, floating[::1] m_buf,
                             floating[::1] v_buf, floating[::1] v_hat_buf, Py_ssize_t lo,
                             Py_ssize_t hi, floating alpha, floating c1, floating c2,
                             floating eps, floating scale, floating factor, bint decay,
                             bint amsgrad) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating p, m, v, vh
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            p = param[i]
            _keras_moments(g[i - lo], m_buf, v_buf, i, c1, c2, scale, &m, &v)
            if decay:
                p = p * factor
            if amsgrad:
                vh = v_hat_buf[i]
                if not (vh > v or vh != vh):
                    vh = v
                v_hat_buf[i] = vh
                v = vh
            param[i] = p - (m * alpha) / (_sqrt(v) + eps)
        _piece_done(grads, param, lo, end)
        lo = end


cdef inline void _keras_adam_unswitched(floating[::1] param, const _Grads* grads,
                                        floating[::1] m_buf, floating[::1] v_buf,
                                        floating[::1] v_hat_buf, Py_ssize_t lo, Py_ssize_t hi,
                                        floating alpha, floating c1, floating c2, floating eps,
                                        floating scale, floating factor, bint decay,
                                        bint amsgrad) noexcept nogil:
    if amsgrad:
        _keras_adam(param, grads, m_buf, v_buf, v_hat_buf, lo, hi, alpha, c1, c2, eps, scale,
                    factor, decay, True)
    else:
        _keras_adam(param, grads, m_buf, v_buf, v_hat_buf, lo, hi, alpha, c1, c2, eps, scale,
                    factor, decay, False)


def keras_adam(floating[::1] param, grad, floating[::1] m_buf,
               floating[::1] v_buf, floating[::1] v_hat_buf, Py_ssize_t step, double lr,
               double beta_1, double beta_2, double epsilon, bint amsgrad, double weight_decay,
               double grad_scale, int n_threads):
    """keras.optimizers.Adam / AdamW, in place, for the 1-based ``step``:
    ``m += (g-m)*(1-beta_1)``; ``v += (g*g-v)*(1-beta_2)``;
    ``p -= m*alpha / (sqrt(v) + epsilon)`` with ``alpha = lr*sqrt(1-beta_2**t)/(1-beta_1**t)``
    (epsilon is not bias-corrected). ``v_hat_buf`` is unused (may be empty) unless amsgrad."""
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t_, n = param.shape[0], parts = _parts(n, n_threads)
    cdef floating t = step, lr_ = lr, one = 1
    cdef floating beta_1_power = _pow(<floating>beta_1, t)
    cdef floating beta_2_power = _pow(<floating>beta_2, t)
    cdef floating alpha = lr_ * _sqrt(one - beta_2_power) / (one - beta_1_power)
    cdef floating c1 = 1 - beta_1, c2 = 1 - beta_2, eps = epsilon
    cdef floating scale = grad_scale, factor = 1.0 - weight_decay * lr
    cdef bint decay = weight_decay != 0
    if _inline_call(n, parts):
        _keras_adam_unswitched(param, &g, m_buf, v_buf, v_hat_buf, 0, n, alpha, c1, c2, eps,
                               scale, factor, decay, amsgrad)
        return
    for t_ in prange(parts, nogil=True, schedule="static", chunksize=1,
                     num_threads=_team(parts, n_threads)):
        _keras_adam_unswitched(param, &g, m_buf, v_buf, v_hat_buf, _lo(t_, n, parts),
                               _lo(t_ + 1, n, parts), alpha, c1, c2, eps, scale, factor, decay,
                               amsgrad)


cdef inline void _keras_rmsprop(floating[::1] param, const _Grads* grads,
                                floating[::1] velocity, floating[::1] average_grad,
                                floating[::1] momentum_buffer, Py_ssize_t lo, Py_ssize_t hi,
                                floating lr_, floating r, floating c, floating mom,
                                floating eps, floating scale, floating factor, bint decay,
                                bint centered, bint use_momentum) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating p, d, v, a, den, inc
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            p = param[i]
            d = g[i - lo] * scale
            if decay:
                p = p * factor
            v = r * velocity[i] + c * (d * d)
            velocity[i] = v
            if centered:
                a = r * average_grad[i] + c * d
                average_grad[i] = a
                den = v - a * a + eps
            else:
                den = v + eps
            inc = (lr_ * d) / _sqrt(den)
            if use_momentum:
                inc = mom * momentum_buffer[i] + inc
                momentum_buffer[i] = inc
            param[i] = p - inc
        _piece_done(grads, param, lo, end)
        lo = end


cdef inline void _keras_rmsprop_unswitched(floating[::1] param, const _Grads* grads,
                                           floating[::1] velocity, floating[::1] average_grad,
                                           floating[::1] momentum_buffer, Py_ssize_t lo,
                                           Py_ssize_t hi, floating lr_, floating r, floating c,
                                           floating mom, floating eps, floating scale,
                                           floating factor, bint decay, bint centered,
                                           bint use_momentum) noexcept nogil:
    if centered:
        if use_momentum:
            _keras_rmsprop(param, grads, velocity, average_grad, momentum_buffer, lo, hi, lr_,
                           r, c, mom, eps, scale, factor, decay, True, True)
        else:
            _keras_rmsprop(param, grads, velocity, average_grad, momentum_buffer, lo, hi, lr_,
                           r, c, mom, eps, scale, factor, decay, True, False)
    elif use_momentum:
        _keras_rmsprop(param, grads, velocity, average_grad, momentum_buffer, lo, hi, lr_, r,
                       c, mom, eps, scale, factor, decay, False, True)
    else:
        _keras_rmsprop(param, grads, velocity, average_grad, momentum_buffer, lo, hi, lr_, r,
                       c, mom, eps, scale, factor, decay, False, False)


def keras_rmsprop(floating[::1] param, grad, floating[::1] velocity,
                  floating[::1] average_grad, floating[::1] momentum_buffer, double lr,
                  double rho, double momentum, double epsilon, bint centered,
                  double weight_decay, double grad_scale, int n_threads):
    """keras.optimizers.RMSprop, in place: ``v = rho*v + (1-rho)*g*g``; centered:
    ``a = rho*a + (1-rho)*g``, ``den = v - a*a + eps``, else ``den = v + eps`` (epsilon
    inside the square root); ``inc = lr*g / sqrt(den)``; momentum:
    ``b = momentum*b + inc; p -= b``, else ``p -= inc``."""
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t, n = param.shape[0], parts = _parts(n, n_threads)
    cdef floating lr_ = lr, r = rho, c = 1 - rho, mom = momentum, eps = epsilon
    cdef floating scale = grad_scale, factor = 1.0 - weight_decay * lr
    cdef bint decay = weight_decay != 0, use_momentum = momentum > 0
    if _inline_call(n, parts):
        _keras_rmsprop_unswitched(param, &g, velocity, average_grad, momentum_buffer, 0, n, lr_,
                                  r, c, mom, eps, scale, factor, decay, centered, use_momentum)
        return
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _keras_rmsprop_unswitched(param, &g, velocity, average_grad, momentum_buffer,
                                  _lo(t, n, parts), _lo(t + 1, n, parts), lr_, r, c, mom, eps,
                                  scale, factor, decay, centered, use_momentum)


cdef inline void _keras_adagrad(floating[::1] param, const _Grads* grads,
                                floating[::1] accumulator, Py_ssize_t lo, Py_ssize_t hi,
                                floating lr_, floating eps, floating scale, floating factor,
                                bint decay) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating p, d, acc
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            p = param[i]
            d = g[i - lo] * scale
            if decay:
                p = p * factor
            acc = accumulator[i] + d * d
            accumulator[i] = acc
            param[i] = p - (lr_ * d) / _sqrt(acc + eps)
        _piece_done(grads, param, lo, end)
        lo = end


def keras_adagrad(floating[::1] param, grad, floating[::1] accumulator,
                  double lr, double epsilon, double weight_decay, double grad_scale,
                  int n_threads):
    """keras.optimizers.Adagrad, in place: ``acc += g*g``; ``p -= lr*g / sqrt(acc + eps)``
    (epsilon inside the square root; ``acc`` starts at initial_accumulator_value)."""
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t, n = param.shape[0], parts = _parts(n, n_threads)
    cdef floating lr_ = lr, eps = epsilon, scale = grad_scale, factor = 1.0 - weight_decay * lr
    cdef bint decay = weight_decay != 0
    if _inline_call(n, parts):
        _keras_adagrad(param, &g, accumulator, 0, n, lr_, eps, scale, factor, decay)
        return
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _keras_adagrad(param, &g, accumulator, _lo(t, n, parts), _lo(t + 1, n, parts), lr_, eps,
                       scale, factor, decay)


cdef inline void _keras_adamax(floating[::1] param, const _Grads* grads, floating[::1] m_buf,
                               floating[::1] u_buf, Py_ssize_t lo, Py_ssize_t hi,
                               floating lr_, floating bc, floating c1, floating b2,
                               floating eps, floating scale, floating factor,
                               bint decay) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating p, d, m, u, a
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            p = param[i]
            d = g[i - lo] * scale
            if decay:
                p = p * factor
            m = m_buf[i]
            m = m + (d - m) * c1
            m_buf[i] = m
            u = b2 * u_buf[i]
            a = fabs(d)
            if not (u > a or u != u):
                u = a
            u_buf[i] = u
            param[i] = p - (lr_ * m) / (bc * (u + eps))
        _piece_done(grads, param, lo, end)
        lo = end


def keras_adamax(floating[::1] param, grad, floating[::1] m_buf,
                 floating[::1] u_buf, Py_ssize_t step, double lr, double beta_1, double beta_2,
                 double epsilon, double weight_decay, double grad_scale, int n_threads):
    """keras.optimizers.Adamax, in place, for the 1-based ``step``:
    ``m += (g-m)*(1-beta_1)``; ``u = max(beta_2*u, |g|)``;
    ``p -= lr*m / ((1-beta_1**t) * (u + eps))`` (epsilon outside the max)."""
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t_, n = param.shape[0], parts = _parts(n, n_threads)
    cdef floating t = step, lr_ = lr, one = 1
    cdef floating bc = one - _pow(<floating>beta_1, t)
    cdef floating c1 = 1 - beta_1, b2 = beta_2, eps = epsilon
    cdef floating scale = grad_scale, factor = 1.0 - weight_decay * lr
    cdef bint decay = weight_decay != 0
    if _inline_call(n, parts):
        _keras_adamax(param, &g, m_buf, u_buf, 0, n, lr_, bc, c1, b2, eps, scale, factor, decay)
        return
    for t_ in prange(parts, nogil=True, schedule="static", chunksize=1,
                     num_threads=_team(parts, n_threads)):
        _keras_adamax(param, &g, m_buf, u_buf, _lo(t_, n, parts), _lo(t_ + 1, n, parts), lr_, bc,
                      c1, b2, eps, scale, factor, decay)


cdef inline void _keras_nadam(floating[::1] param, const _Grads* grads, floating[::1] m_buf,
                              floating[::1] v_buf, Py_ssize_t lo, Py_ssize_t hi, floating u_t_1,
                              floating den_m, floating one_minus_u_t, floating den_g,
                              floating bc2, floating c1, floating c2, floating lr_,
                              floating eps, floating scale, floating factor,
                              bint decay) noexcept nogil:
    cdef Py_ssize_t i, end
    cdef const floating* g
    cdef float buf[_HALF_PIECE]  # 16-bit gradients, widened a piece at a time
    cdef floating p, d, m, v, m_hat
    while lo < hi:
        end = _piece(grads, lo, hi, &g, buf)
        for i in range(lo, end):
            p = param[i]
            d = _keras_moments(g[i - lo], m_buf, v_buf, i, c1, c2, scale, &m, &v)
            if decay:
                p = p * factor
            m_hat = (u_t_1 * m) / den_m + (one_minus_u_t * d) / den_g
            param[i] = p - (m_hat * lr_) / (_sqrt(v / bc2) + eps)
        _piece_done(grads, param, lo, end)
        lo = end


def keras_nadam(floating[::1] param, grad, floating[::1] m_buf,
                floating[::1] v_buf, Py_ssize_t step, double u_product, double lr,
                double beta_1, double beta_2, double epsilon, double weight_decay,
                double grad_scale, int n_threads):
    """keras.optimizers.Nadam, in place, for the 1-based ``step``; returns the new
    ``u_product`` (the running product of the momentum schedule, in the buffers' dtype).

    ``u_t = beta_1*(1 - 0.5*0.96**t)`` (torch's NAdam has ``0.96**(t*momentum_decay)``);
    ``m_hat = u_{t+1}*m/(1 - prod_{t+1}) + (1-u_t)*g/(1 - prod_t)``,
    ``p -= m_hat*lr / (sqrt(v/(1-beta_2**t)) + eps)``.
    """
    cdef _Grads g
    _grads(grad, param, &g)
    cdef Py_ssize_t t_, n = param.shape[0], parts = _parts(n, n_threads)
    cdef floating t = step, t_next = step + 1, decay_base = 0.96
    cdef floating b1 = beta_1, b2 = beta_2, one = 1, half = 0.5
    cdef floating prod = u_product
    # Keras's _backend_update_step: u_product * beta_1 * (1 - 0.5*0.96**t), in that order.
    prod = prod * <floating>beta_1 * (one - half * _pow(decay_base, t))
    cdef floating u_t = b1 * (one - half * _pow(decay_base, t))
    cdef floating u_t_1 = b1 * (one - half * _pow(decay_base, t_next))
    cdef floating prod_next = prod * u_t_1
    cdef floating den_m = one - prod_next, den_g = one - prod, one_minus_u_t = one - u_t
    cdef floating bc2 = one - _pow(b2, t)
    cdef floating c1 = one - b1, c2 = one - b2
    cdef floating lr_ = lr, eps = epsilon, scale = grad_scale, factor = 1.0 - weight_decay * lr
    cdef bint decay = weight_decay != 0
    if _inline_call(n, parts):
        _keras_nadam(param, &g, m_buf, v_buf, 0, n, u_t_1, den_m, one_minus_u_t, den_g, bc2, c1,
                     c2, lr_, eps, scale, factor, decay)
        return prod
    for t_ in prange(parts, nogil=True, schedule="static", chunksize=1,
                     num_threads=_team(parts, n_threads)):
        _keras_nadam(param, &g, m_buf, v_buf, _lo(t_, n, parts), _lo(t_ + 1, n, parts), u_t_1,
                     den_m, one_minus_u_t, den_g, bc2, c1, c2, lr_, eps, scale, factor, decay)
    return prod


# ---- mixed precision: 16-bit <-> float32 conversions -----------------------------------------
# The optimizers keep float32 master weights and state and run their float32 kernels on
# them; these kernels only convert. A step widens a cache-sized block of the 16-bit
# gradient into a float32 scratch buffer, runs the optimizer kernel on that block, then
# narrows the block's master weights into the 16-bit parameters (flatopt._optimizer).
# Integer arithmetic on the bit patterns, plus float operations only where each is exact
# or a correctly rounded IEEE operation (no intrinsic, no FMA: -ffp-contract=off), so every
# ISA build and thread count gives the same bits; selects, not branches, so the loops
# vectorise. Rounding is round-to-nearest-even, as torch's casts: bfloat16 as c10's round_to_nearest_even (NaN -> 0x7FC0), float16 as the
# FP16 library's fp16_ieee_from_fp32_value (overflow to inf, NaN -> sign | 0x7E00).
# Widening is exact (float16 subnormals included; a float16 NaN becomes a quiet NaN
# with the same payload, as the hardware converters do).


KIND_BF16 = 0
KIND_FP16 = 1


cdef inline uint32_t _bf16_to_f32(uint16_t h) noexcept nogil:
    return (<uint32_t>h) << 16


cdef inline uint16_t _f32_to_bf16(uint32_t u) noexcept nogil:
    if (u & 0x7FFFFFFF) > 0x7F800000:  # NaN
        return 0x7FC0
    return <uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


cdef union _Bits32:
    float f
    uint32_t u


cdef inline uint32_t _sel(bint c, uint32_t a, uint32_t b) noexcept nogil:
    """``a if c else b`` as mask arithmetic: no branch, so the loops vectorise."""
    cdef uint32_t mask = 0u - <uint32_t>c
    return (a & mask) | (b & ~mask)


cdef inline uint32_t _fp16_to_f32(uint16_t h) noexcept nogil:
    # A subnormal m * 2**-24 is converted as the integer m times 2**-24: both exact.
    cdef uint32_t sign = (<uint32_t>(h & 0x8000)) << 16
    cdef uint32_t em = h & 0x7FFF
    cdef uint32_t m = em & 0x3FF
    cdef _Bits32 sub
    sub.f = <float>(<int>m) * <float>5.9604644775390625e-08
    cdef uint32_t normal = (em << 13) + 0x38000000  # rebias the exponent: +112 << 23
    cdef uint32_t special = (em << 13) | 0x7F800000 | _sel(m != 0, 0x400000, 0)  # NaN quiet
    return sign | _sel(em >= 0x7C00, special, _sel(em < 0x400, sub.u, normal))


cdef inline uint16_t _f32_to_fp16(uint32_t u) noexcept nogil:
    # The FP16 library's fp16_ieee_from_fp32_value (what torch's c10 uses), branch-free:
    # scaling by 2**112 then 2**-110 and adding 2**(e+k) makes the float adder round the
    # significand to float16's precision, nearest even (subnormals too). The float
    # operations are exact or correctly rounded IEEE ones, the same on every ISA build
    # (no FMA: -ffp-contract=off; the input's subnormals are not flushed).
    cdef _Bits32 x, base, bias_f
    x.u = u & 0x7FFFFFFF
    base.f = (x.f * <float>5.192296858534828e+33) * <float>7.703719777548943e-34
    cdef uint32_t shl1 = u + u
    cdef uint32_t bias = shl1 & 0xFF000000U
    bias = _sel(bias < 0x71000000, 0x71000000, bias)
    bias_f.u = (bias >> 1) + 0x07800000
    base.f = bias_f.f + base.f
    cdef uint32_t nonsign = ((base.u >> 13) & 0x00007C00) + (base.u & 0x00000FFF)
    # NaN: made quiet, keeping the payload's top 10 bits, as F16C's vcvtps2ph (and torch's
    # vectorised cast) does; the FP16 library returns 0x7E00 for every NaN.
    cdef uint32_t nan = 0x7E00 | ((u >> 13) & 0x3FF)
    return <uint16_t>(((u >> 16) & 0x8000) | _sel(shl1 > 0xFF000000U, nan, nonsign))


# With F16C (x86-64-v3: the avx2 and avx512 builds, see setup.py) float16 conversions are
# one instruction per 8 elements: vcvtph2ps is exact and vcvtps2ph rounds to nearest even
# (its immediate, whatever MXCSR says), NaN made quiet with its payload's top bits, the
# very results of _fp16_to_f32 / _f32_to_fp16, which convert the rest (and everything in
# the baseline build). At 2**16 elements, 1 thread (AMD EPYC): widening 0.53 -> 0.16 ns
# an element, narrowing 0.64 -> 0.22, as fast as bfloat16's shifts.
cdef extern from *:
    """
    #if defined(__F16C__)
    #include <immintrin.h>
    static inline Py_ssize_t flatopt_widen_fp16(const uint16_t *src, uint32_t *out, Py_ssize_t n) {
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps((float *)(out + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
        return i;
    }
    static inline Py_ssize_t flatopt_narrow_fp16(const uint32_t *src, uint16_t *out, Py_ssize_t n) {
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(
                _mm256_loadu_ps((const float *)(src + i)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        return i;
    }
    #else
    static inline Py_ssize_t flatopt_widen_fp16(const uint16_t *src, uint32_t *out, Py_ssize_t n) { return 0; }
    static inline Py_ssize_t flatopt_narrow_fp16(const uint32_t *src, uint16_t *out, Py_ssize_t n) { return 0; }
    #endif
    """
    Py_ssize_t flatopt_widen_fp16(const uint16_t* src, uint32_t* out, Py_ssize_t n) noexcept nogil
    Py_ssize_t flatopt_narrow_fp16(const uint32_t* src, uint16_t* out, Py_ssize_t n) noexcept nogil


cdef inline void _widen16(const uint16_t* src, uint32_t* out, int kind,
                          Py_ssize_t n) noexcept nogil:
    """``out[i] = float32(src[i])`` bits for ``i < n`` (``kind`` as in ``widen16``)."""
    cdef Py_ssize_t i, start = 0
    if kind == 0:
        for i in range(n):
            out[i] = _bf16_to_f32(src[i])
    else:
        if n > 0:
            start = flatopt_widen_fp16(src, out, n)  # F16C: all but the last n % 8
        for i in range(start, n):
            out[i] = _fp16_to_f32(src[i])


cdef inline void _narrow16(const uint32_t* src, uint16_t* out, int kind,
                           Py_ssize_t n) noexcept nogil:
    """``out[i] = src[i]`` rounded to 16 bits for ``i < n`` (``kind`` as in ``narrow16``)."""
    cdef Py_ssize_t i, start = 0
    if kind == 0:
        for i in range(n):
            out[i] = _f32_to_bf16(src[i])
    else:
        if n > 0:
            start = flatopt_narrow_fp16(src, out, n)  # F16C: all but the last n % 8
        for i in range(start, n):
            out[i] = _f32_to_fp16(src[i])


cdef inline void _widen_range(const uint16_t[::1] src, uint32_t[::1] out, int kind,
                              Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    if hi > lo:
        _widen16(&src[lo], &out[lo], kind, hi - lo)


cdef inline void _narrow_range(const uint32_t[::1] src, uint16_t[::1] out, int kind,
                               Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    if hi > lo:
        _narrow16(&src[lo], &out[lo], kind, hi - lo)


def widen16(const uint16_t[::1] src, uint32_t[::1] out, int kind, int n_threads):
    """``out[i] = float32(src[i])``, exactly: ``src`` holds bfloat16 (``kind`` =
    ``KIND_BF16``) or float16 (``KIND_FP16``) bit patterns, ``out`` float32 ones (pass
    ``array.view(np.uint16)`` and ``array.view(np.uint32)``); ``out`` may be longer."""
    cdef Py_ssize_t t, n = src.shape[0], parts = _parts(n, n_threads)
    if _inline_call(n, parts):
        _widen_range(src, out, kind, 0, n)
        return
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _widen_range(src, out, kind, _lo(t, n, parts), _lo(t + 1, n, parts))


def narrow16(const uint32_t[::1] src, uint16_t[::1] out, int kind, int n_threads):
    """``out[i] = src[i]`` rounded to nearest even, as bit patterns: float32 in, bfloat16
    (``KIND_BF16``) or float16 (``KIND_FP16``) out; bit-exact with torch's casts."""
    cdef Py_ssize_t t, n = src.shape[0], parts = _parts(n, n_threads)
    if _inline_call(n, parts):
        _narrow_range(src, out, kind, 0, n)
        return
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _narrow_range(src, out, kind, _lo(t, n, parts), _lo(t + 1, n, parts))


def count_nonfinite16(const uint16_t[::1] x, int kind, int n_threads):
    """How many of the bfloat16/float16 bit patterns in ``x`` are inf or NaN (all
    exponent bits set)."""
    cdef Py_ssize_t i, n = x.shape[0]
    cdef Py_ssize_t count = 0
    cdef uint16_t mask = 0x7F80 if kind == 0 else 0x7C00
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads,
                    use_threads_if=_use_threads(n, n_threads)):
        count += (x[i] & mask) == mask
    return count


# ---- gathering gradients from where a framework left them ------------------------------------
# flatopt.torch reads each gradient where autograd put it (its own tensor) and copies it into
# the flat gradient buffer with this one call: plain memcpy, no framework op dispatched
# (inside torch.optim's step wrapper every torch op also pays the profiler's bookkeeping:
# ~11 us for a _foreach_copy_ of 4 small tensors, measured). The copy is split into chunks
# of whole elements as the step kernels are (``_parts``), each walking the segments its
# byte range covers.

from libc.string cimport memcpy


cdef inline void _gather_range(char* out, const intptr_t[::1] sources,
                               const Py_ssize_t[::1] out_offsets,
                               const Py_ssize_t[::1] starts, Py_ssize_t lo,
                               Py_ssize_t hi) noexcept nogil:
    """Bytes ``[lo, hi)`` of the concatenated sources (source ``k`` holds bytes
    ``[starts[k], starts[k+1])`` of it) to their places in ``out``."""
    cdef Py_ssize_t end, k = _segment_of(&starts[0], sources.shape[0], lo)
    while lo < hi:
        end = min(hi, starts[k + 1])
        if end > lo:
            memcpy(out + out_offsets[k] + (lo - starts[k]),
                   <const char*>sources[k] + (lo - starts[k]), end - lo)
        lo = end
        k = k + 1


def gather_bytes(unsigned char[::1] out, const intptr_t[::1] sources,
                 const Py_ssize_t[::1] out_offsets, const Py_ssize_t[::1] starts,
                 Py_ssize_t itemsize, int n_threads):
    """Copy source ``k`` (``starts[k+1] - starts[k]`` bytes at address ``sources[k]``) to
    ``out[out_offsets[k]:]`` for every k; ``starts`` has one more entry than ``sources``.

    The caller guarantees that every address is valid for the call and every range lies
    inside ``out``: nothing is checked here. ``itemsize`` sets the thread threshold (by
    elements, as for the step kernels) and keeps the threads' ranges whole elements.
    """
    cdef Py_ssize_t t, total = starts[sources.shape[0]] if sources.shape[0] else 0
    cdef Py_ssize_t n = total // itemsize, parts = _parts(n, n_threads)
    if total == 0:
        return
    cdef char* base = <char*>&out[0]
    if _inline_call(n, parts):
        _gather_range(base, sources, out_offsets, starts, 0, total)
        return
    for t in prange(parts, nogil=True, schedule="static", chunksize=1,
                    num_threads=_team(parts, n_threads)):
        _gather_range(base, sources, out_offsets, starts, _lo(t, n, parts) * itemsize,
                      _lo(t + 1, n, parts) * itemsize)

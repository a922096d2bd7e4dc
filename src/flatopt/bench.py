"""``python -m flatopt.bench``: time flatopt's fused step against NumPy, PyTorch and memory.

For each optimizer, dtype and case, the same step runs several ways on the same data:

* ``flatopt``:        the optimizer's fused kernel on its flat buffers (one call);
* ``numpy``:          the same update written as well as NumPy allows, on the same flat
  buffers: in-place ufuncs with ``out=``, one preallocated scratch array, no avoidable
  temporaries. Each ufunc still streams whole arrays through memory: the cost flatopt
  removes;
* ``torch-forloop``, ``torch-foreach``, ``torch-fused``: torch.optim on the same tensors
  (one per parameter), when PyTorch is installed and has that implementation;
* ``flatopt-torch``:  ``flatopt.torch``'s drop-in torch.optim class of the same name on the
  same tensors (rebound to flat buffers, so its step is flatopt's plus the adapter's
  per-tensor bookkeeping);
* ``bandwidth``:      an in-place streaming pass (``a += b``) over a working set of the same
  size: what the memory system delivers to two streams, a reference for a one-pass update
  (not a bound: more streams can use the memory system better, so ``%bw`` can pass 100%);
* ``deepspeed``:      DeepSpeed's ``DeepSpeedCPUAdam`` (Adam/AdamW, float32 rows) when
  ``deepspeed`` is importable (it is not a dependency; its CPU op compiles on first use,
  about two minutes; ``--no-deepspeed`` skips it).

Two more tables follow: the small-size crossover (``flatopt.step()`` against in-place
NumPy from 1 element up: a fast backend must not lose to its baseline at any size; with
PyTorch also flatopt.torch on one tensor, and its "adapter" cost over the NumPy API), and,
with PyTorch, an end-to-end training loop (a small MLP; zero_grad, forward, backward and
step timed separately) with torch.optim's fused Adam and with ``flatopt.torch.Adam``.
The header names the kernels' instruction set and the CPU; runs longer than a few seconds
report progress on stderr, so stdout stays the clean tables.

Times are medians of repeated samples. ``GB/s`` counts the bytes a one-pass update must
move (each of param, grad and state read once, param and state written once), so it is
comparable across implementations and with the bandwidth line; ``%bw`` is its ratio to
the ``a += b`` pass's GB/s. The NumPy baseline runs on one thread (NumPy's ufuncs do),
flatopt and torch on the header's thread count: "vs numpy" includes that difference.
torch's tensors get transparent huge pages as flatopt's buffers do (NumPy asks for them
from 4 MiB up): ``THP_MEM_ALLOC_ENABLE=1`` is set before torch is imported, unless it is
set already; the header says which.

On this project's machines, run benchmarks as
``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m flatopt.bench``
(those variables slow NumPy on some CPUs; flatopt itself does not use BLAS).
"""

import argparse
import copy
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field

import numpy as np

import flatopt
from flatopt._dispatch import ISA, kernels
from flatopt._layout import aligned_zeros
from flatopt._threads import effective_n_threads

LR = 1e-3


# ---- NumPy baselines: the best in-place NumPy for each update ----------------------------
# Each returns a step function over flat arrays. They are competitors, checked against
# flatopt in tests/test_bench.py, not references.

def _zeros(like):
    """A zeroed array of ``like``'s shape and dtype, allocated as flatopt allocates its own
    buffers (64-byte aligned; from 1 MiB up each starts at another offset within its page,
    see ``flatopt._layout``). The NumPy baselines and the streaming reference get their
    arrays this way: with plain ``np.zeros`` large arrays often start at the same page
    offset, and streams that agree in address bits 0-11 stall each other (4K aliasing),
    which flatopt avoids. Measured on a 2-core AMD EPYC (Zen 4, 2 threads, two runs): with
    ``np.zeros`` arrays the NumPy Adam baseline took 1.02-1.11x as long (2**17 to 2**22
    elements), and ``a += b`` 0.98-1.71x as long, depending on where the allocator happened
    to place the two arrays (not always at the same offset): a reference that moves with
    the allocator's history is no reference."""
    return aligned_zeros(like.size, like.dtype).reshape(like.shape)


def _copy(a):
    out = _zeros(a)
    out[...] = a
    return out


def numpy_sgd_momentum(p, g, momentum=0.9):
    """SGD with momentum after its first step: buf = m*buf + g; p -= lr*buf."""
    buf, tmp = _zeros(p), _zeros(p)

    def step():
        np.multiply(buf, momentum, out=buf)
        np.add(buf, g, out=buf)
        np.multiply(buf, LR, out=tmp)
        np.subtract(p, tmp, out=p)
    return step


def numpy_momentum(p, g, beta=0.9):
    """v = beta*v + (1-beta)*g; p -= lr*v."""
    v, tmp = _zeros(p), _zeros(p)

    def step():
        np.multiply(v, beta, out=v)
        np.multiply(g, 1.0 - beta, out=tmp)
        np.add(v, tmp, out=v)
        np.multiply(v, LR, out=tmp)
        np.subtract(p, tmp, out=p)
    return step


def _numpy_first_moment(m, g, tmp, beta1):
    """m = beta1*m + (1-beta1)*g in place, three ufunc passes (the Adam family's baselines)."""
    np.multiply(m, beta1, out=m)
    np.multiply(g, 1 - beta1, out=tmp)
    np.add(m, tmp, out=m)


def _numpy_moments(m, v, g, tmp, beta1, beta2):
    """Adam's two moments in place: m as above, v = beta2*v + (1-beta2)*g*g."""
    _numpy_first_moment(m, g, tmp, beta1)
    np.multiply(v, beta2, out=v)
    np.multiply(g, g, out=tmp)
    np.multiply(tmp, 1 - beta2, out=tmp)
    np.add(v, tmp, out=v)


def numpy_adam(p, g, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False):
    """torch.optim.Adam/AdamW (no amsgrad) with in-place ufuncs."""
    m, v, tmp = _zeros(p), _zeros(p), _zeros(p)
    t = [0]

    def step():
        t[0] += 1
        bc1, bc2 = 1 - beta1 ** t[0], 1 - beta2 ** t[0]
        if weight_decay and decoupled:
            np.multiply(p, 1 - LR * weight_decay, out=p)
        _numpy_moments(m, v, g, tmp, beta1, beta2)
        # m/(sqrt(v)/sqrt(bc2) + eps) as m/(sqrt(v) + eps*sqrt(bc2)) * sqrt(bc2): one pass fewer
        np.sqrt(v, out=tmp)
        np.add(tmp, eps * math.sqrt(bc2), out=tmp)
        np.divide(m, tmp, out=tmp)
        np.multiply(tmp, LR * math.sqrt(bc2) / bc1, out=tmp)
        np.subtract(p, tmp, out=p)
    return step


def _numpy_adaptive_descent(p, g, acc, tmp, eps):
    """p -= lr*g/(sqrt(acc)+eps), with ``tmp`` as scratch (RMSprop's and Adagrad's step)."""
    np.sqrt(acc, out=tmp)
    np.add(tmp, eps, out=tmp)
    np.divide(g, tmp, out=tmp)
    np.multiply(tmp, LR, out=tmp)
    np.subtract(p, tmp, out=p)


def numpy_rmsprop(p, g, alpha=0.99, eps=1e-8):
    """torch.optim.RMSprop (plain): v = a*v + (1-a)*g*g; p -= lr*g/(sqrt(v)+eps)."""
    v, tmp = _zeros(p), _zeros(p)

    def step():
        np.multiply(v, alpha, out=v)
        np.multiply(g, g, out=tmp)
        np.multiply(tmp, 1 - alpha, out=tmp)
        np.add(v, tmp, out=v)
        _numpy_adaptive_descent(p, g, v, tmp, eps)
    return step


def numpy_adagrad(p, g, eps=1e-10):
    """torch.optim.Adagrad (no lr decay): s += g*g; p -= lr*g/(sqrt(s)+eps)."""
    s, tmp = _zeros(p), _zeros(p)

    def step():
        np.multiply(g, g, out=tmp)
        np.add(s, tmp, out=s)
        _numpy_adaptive_descent(p, g, s, tmp, eps)
    return step


def numpy_adadelta(p, g, rho=0.9, eps=1e-6, lr=1.0):
    """torch.optim.Adadelta: v = rho*v + (1-rho)*g*g;
    d = sqrt(u+eps)/sqrt(v+eps)*g; u = rho*u + (1-rho)*d*d; p -= lr*d."""
    v, u, d, tmp = (_zeros(p) for _ in range(4))

    def step():
        np.multiply(v, rho, out=v)
        np.multiply(g, g, out=tmp)
        np.multiply(tmp, 1 - rho, out=tmp)
        np.add(v, tmp, out=v)
        np.add(v, eps, out=tmp)
        np.sqrt(tmp, out=tmp)
        np.add(u, eps, out=d)
        np.sqrt(d, out=d)
        np.divide(d, tmp, out=d)
        np.multiply(d, g, out=d)
        np.multiply(u, rho, out=u)
        np.multiply(d, d, out=tmp)
        np.multiply(tmp, 1 - rho, out=tmp)
        np.add(u, tmp, out=u)
        np.multiply(d, lr, out=tmp)
        np.subtract(p, tmp, out=p)
    return step


def numpy_nadam(p, g, beta1=0.9, beta2=0.999, eps=1e-8, momentum_decay=4e-3):
    """torch.optim.NAdam with in-place ufuncs."""
    m, v, den, tmp = (_zeros(p) for _ in range(4))
    t, mu_product = [0], [1.0]

    def step():
        t[0] += 1
        mu = beta1 * (1 - 0.5 * 0.96 ** (t[0] * momentum_decay))
        mu_next = beta1 * (1 - 0.5 * 0.96 ** ((t[0] + 1) * momentum_decay))
        mu_product[0] *= mu
        _numpy_moments(m, v, g, tmp, beta1, beta2)
        np.divide(v, 1 - beta2 ** t[0], out=den)
        np.sqrt(den, out=den)
        np.add(den, eps, out=den)
        np.divide(g, den, out=tmp)
        np.multiply(tmp, LR * (1 - mu) / (1 - mu_product[0]), out=tmp)
        np.subtract(p, tmp, out=p)
        np.divide(m, den, out=tmp)
        np.multiply(tmp, LR * mu_next / (1 - mu_product[0] * mu_next), out=tmp)
        np.subtract(p, tmp, out=p)
    return step


def numpy_radam(p, g, beta1=0.9, beta2=0.999, eps=1e-8):
    """torch.optim.RAdam with in-place ufuncs (the rectified branch after ~5 steps)."""
    m, v, tmp = _zeros(p), _zeros(p), _zeros(p)
    t = [0]
    rho_inf = 2 / (1 - beta2) - 1

    def step():
        t[0] += 1
        bc1, bc2 = 1 - beta1 ** t[0], 1 - beta2 ** t[0]
        rho_t = rho_inf - 2 * t[0] * beta2 ** t[0] / bc2
        _numpy_moments(m, v, g, tmp, beta1, beta2)
        if rho_t > 5:
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            np.sqrt(v, out=tmp)
            np.add(tmp, eps, out=tmp)
            np.divide(m, tmp, out=tmp)
            np.multiply(tmp, LR / bc1 * math.sqrt(bc2) * rect, out=tmp)
        else:
            np.multiply(m, LR / bc1, out=tmp)
        np.subtract(p, tmp, out=p)
    return step


def numpy_adamax(p, g, beta1=0.9, beta2=0.999, eps=1e-8):
    """torch.optim.Adamax with in-place ufuncs: u = max(beta2*u, |g| + eps)."""
    m, u, tmp = _zeros(p), _zeros(p), _zeros(p)
    t = [0]

    def step():
        t[0] += 1
        _numpy_first_moment(m, g, tmp, beta1)
        np.multiply(u, beta2, out=u)
        np.abs(g, out=tmp)
        np.add(tmp, eps, out=tmp)
        np.maximum(u, tmp, out=u)
        np.divide(m, u, out=tmp)
        np.multiply(tmp, LR / (1 - beta1 ** t[0]), out=tmp)
        np.subtract(p, tmp, out=p)
    return step


def numpy_lion(p, g, beta1=0.9, beta2=0.99):
    """Lion with in-place ufuncs: p -= lr*sign(beta1*m + (1-beta1)*g); m = beta2*m + (1-beta2)*g."""
    m, tmp, tmp2 = _zeros(p), _zeros(p), _zeros(p)

    def step():
        np.multiply(m, beta1, out=tmp)
        np.multiply(g, 1 - beta1, out=tmp2)
        np.add(tmp, tmp2, out=tmp)
        np.sign(tmp, out=tmp)
        np.multiply(tmp, LR, out=tmp)
        np.subtract(p, tmp, out=p)
        np.multiply(m, beta2, out=m)
        np.multiply(g, 1 - beta2, out=tmp)
        np.add(m, tmp, out=m)
    return step


@dataclass
class Optim:
    """One optimizer configuration, built three ways."""

    name: str
    n_state: int                      # state arrays of the parameters' size
    flatopt: callable                 # (params, n_threads) -> flatopt optimizer
    numpy: callable                   # (flat p, flat g) -> step()
    torch: callable = None            # (torch, tensors, **variant kw) -> torch optimizer
    torch_variants: tuple = ("forloop", "foreach", "fused")

    def bytes_per_step(self, n_elements, itemsize):
        # param and state read and written once, grad read once: the one-pass minimum.
        return (2 * (1 + self.n_state) + 1) * n_elements * itemsize


def _optims():
    F = flatopt
    out = [
        Optim("sgd-momentum", 1, lambda ps, t: F.SGD(ps, lr=LR, momentum=0.9, n_threads=t),
              numpy_sgd_momentum, lambda torch, ps, **kw: torch.optim.SGD(ps, lr=LR, momentum=0.9, **kw)),
        Optim("momentum", 1, lambda ps, t: F.Momentum(ps, lr=LR, beta=0.9, n_threads=t), numpy_momentum),
    ]
    if hasattr(F, "Adam"):
        out += [
            Optim("adam", 2, lambda ps, t: F.Adam(ps, lr=LR, n_threads=t), numpy_adam,
                  lambda torch, ps, **kw: torch.optim.Adam(ps, lr=LR, **kw)),
            Optim("adamw", 2, lambda ps, t: F.AdamW(ps, lr=LR, n_threads=t),
                  lambda p, g: numpy_adam(p, g, weight_decay=1e-2, decoupled=True),
                  lambda torch, ps, **kw: torch.optim.AdamW(ps, lr=LR, **kw)),
            Optim("rmsprop", 1, lambda ps, t: F.RMSprop(ps, lr=LR, n_threads=t), numpy_rmsprop,
                  lambda torch, ps, **kw: torch.optim.RMSprop(ps, lr=LR, **kw), ("forloop", "foreach")),
            Optim("adagrad", 1, lambda ps, t: F.Adagrad(ps, lr=LR, n_threads=t), numpy_adagrad,
                  lambda torch, ps, **kw: torch.optim.Adagrad(ps, lr=LR, **kw)),
            Optim("adadelta", 2, lambda ps, t: F.Adadelta(ps, n_threads=t), numpy_adadelta,
                  lambda torch, ps, **kw: torch.optim.Adadelta(ps, **kw), ("forloop", "foreach")),
        ]
    if hasattr(F, "NAdam"):
        out += [
            Optim("nadam", 2, lambda ps, t: F.NAdam(ps, lr=LR, n_threads=t), numpy_nadam,
                  lambda torch, ps, **kw: torch.optim.NAdam(ps, lr=LR, **kw), ("forloop", "foreach")),
            Optim("radam", 2, lambda ps, t: F.RAdam(ps, lr=LR, n_threads=t), numpy_radam,
                  lambda torch, ps, **kw: torch.optim.RAdam(ps, lr=LR, **kw), ("forloop", "foreach")),
            Optim("adamax", 2, lambda ps, t: F.Adamax(ps, lr=LR, n_threads=t), numpy_adamax,
                  lambda torch, ps, **kw: torch.optim.Adamax(ps, lr=LR, **kw), ("forloop", "foreach")),
            Optim("lion", 1, lambda ps, t: F.Lion(ps, lr=LR, n_threads=t), numpy_lion),
        ]
    return {o.name: o for o in out}


OPTIMIZERS = _optims()


# ---- cases: what the parameters look like ------------------------------------------------

def transformer_shapes(width, layers=12):
    """168 tensors for 12 layers: q, k, v, o weights and biases, two MLP matrices (4x width)
    with biases, two LayerNorm weights: 12*width**2 + 11*width elements per layer."""
    d = width
    layer = [(d, d), (d,)] * 4 + [(4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    return layer * layers


@dataclass
class Case:
    name: str
    shapes: list = field(repr=False)

    @property
    def size(self):
        return sum(math.prod(s) for s in self.shapes)


def flat_case(n):
    return Case(f"flat 2**{int(math.log2(n))}" if n & (n - 1) == 0 else f"flat {n}", [(n,)])


def model_case(width):
    return Case(f"model w{width} ({len(transformer_shapes(width))} tensors)", transformer_shapes(width))


# ---- where the numbers come from ------------------------------------------------------------

def cpu_model(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name, as the OS reports it (``platform.processor()`` as a fallback).

    On x86 the CPU family and model numbers follow the name: a virtual machine may report
    only "AMD EPYC", which names neither the microarchitecture nor its memory system (Zen 1
    is family 23, model 1; Zen 4 family 25, model 17), and benchmark files must tell them
    apart.
    """
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:  # the first processor's values (arm64 lists Hardware last)
                key, _, value = line.partition(":")
                if value.strip():
                    fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    for key in ("model name", "hardware", "cpu model"):
        if fields.get(key):
            family, model = fields.get("cpu family"), fields.get("model")
            if key == "model name" and family and model:
                return f"{fields[key]} (family {family}, model {model})"
            return fields[key]
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5)
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


class Progress:
    """Reports on stderr which task of how many is running, the time elapsed and an
    estimate of the time left, once the run has lasted ``delay`` seconds (short runs stay
    silent). Tasks carry weights (their expected relative cost) for the estimate."""

    def __init__(self, weights, out=None, delay=3.0):
        self.weights = list(weights)
        self.out = sys.stderr if out is None else out
        self.delay = delay
        self.index = 0
        self.start = time.perf_counter()
        self.reported = False

    def next(self, label):
        """Call before task ``label`` starts (the tasks before it are done)."""
        elapsed = time.perf_counter() - self.start
        total = len(self.weights)
        if self.index < total and elapsed >= self.delay:
            done, rest = sum(self.weights[:self.index]), sum(self.weights[self.index:])
            left = f", about {elapsed * rest / done:.0f} s left" if done > 0 else ""
            print(f"[{self.index + 1}/{total}] {label} ({elapsed:.0f} s elapsed{left})",
                  file=self.out, flush=True)
            self.reported = True
        self.index += 1

    def finish(self):
        if self.reported:
            print(f"done in {time.perf_counter() - self.start:.0f} s", file=self.out, flush=True)


# ---- timing ----------------------------------------------------------------------------------

def time_call(fn, min_time=0.3, max_samples=200):
    """Median seconds per call of ``fn()``: samples of several calls, ~``min_time`` in all."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(1e-3 / once))      # each sample lasts at least ~1 ms
    samples = []
    deadline = time.perf_counter() + min_time
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < max_samples):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def time_interleaved(fns, min_time=0.3, max_samples=200):
    """Median seconds per call of each of ``fns``, their samples interleaved (a, b, a, b,
    ...) so that all see the same machine: on a shared machine, load that comes and goes
    would otherwise favour whichever ran in the quieter moment. Each sample is several
    calls, ~1 ms."""
    inners = []
    for fn in fns:
        fn()
        t0 = time.perf_counter()
        fn()
        inners.append(max(1, int(1e-3 / max(time.perf_counter() - t0, 1e-7))))
    samples = [[] for _ in fns]
    deadline = time.perf_counter() + len(fns) * min_time
    while len(samples[-1]) < 5 or (time.perf_counter() < deadline and len(samples[-1]) < max_samples):
        for fn, inner, out in zip(fns, inners, samples):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter() - t0) / inner)
    return [statistics.median(x) for x in samples]


_DEEPSPEED = {}


def deepspeed_cpu_adam():
    """DeepSpeed's ``DeepSpeedCPUAdam`` class if ``deepspeed`` is importable, else None.

    ``DS_ACCELERATOR`` defaults to ``cpu`` (set before the import, as DeepSpeed requires);
    the CPU op itself is compiled when the first optimizer is built.
    """
    if "cls" not in _DEEPSPEED:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
        except Exception:  # not installed, or installed without a usable CPU accelerator
            DeepSpeedCPUAdam = None
        _DEEPSPEED["cls"] = DeepSpeedCPUAdam
    return _DEEPSPEED["cls"]


def _deepspeed_impl(optim, torch, arrays, grads):
    """A step function of DeepSpeed CPU Adam for Adam/AdamW in float32, or None."""
    if optim.name not in ("adam", "adamw") or arrays[0].dtype != np.float32:
        return None  # no float64 in DeepSpeed's CPU Adam (and its 16-bit path has no master)
    cls = deepspeed_cpu_adam()
    if cls is None:
        return None
    tensors = [torch.tensor(a) for a in arrays]
    for t, g in zip(tensors, grads):
        t.grad = torch.tensor(g)  # torch's allocation, as autograd's (see _torch_impls)
    decoupled = optim.name == "adamw"
    try:
        opt = cls(tensors, lr=LR, weight_decay=1e-2 if decoupled else 0.0, adamw_mode=decoupled)
        opt.step()
    except Exception as exc:  # the op failed to build or to run: report, leave the row out
        print(f"flatopt.bench: DeepSpeed CPU Adam unavailable ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        _DEEPSPEED["cls"] = None
        return None
    return opt.step


def _flatopt_torch_step(optim, torch, arrays, grads, n_threads):
    """``step`` of flatopt.torch's twin of ``optim`` over torch tensors holding ``arrays``,
    their gradients ``grads`` set."""
    import flatopt.torch as flat_torch

    tensors = [torch.tensor(a) for a in arrays]
    for t, g in zip(tensors, grads):
        t.grad = torch.tensor(g)
    # The same constructor call as torch's, with flatopt.torch in place of torch.optim.
    return optim.torch(types.SimpleNamespace(optim=flat_torch), tensors, n_threads=n_threads).step


def _torch_impls(optim, torch, arrays, grads, n_threads, use_deepspeed=False):
    """torch.optim variants of ``optim`` on copies of ``arrays``: name -> step function
    (and DeepSpeed's CPU Adam when ``use_deepspeed`` and it is installed)."""
    if optim.torch is None or torch is None:
        return {}
    torch.set_num_threads(n_threads)
    kws = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    out = {}
    for variant in optim.torch_variants:
        tensors = [torch.tensor(a) for a in arrays]
        for t, g in zip(tensors, grads):
            # torch's allocation (64-byte aligned), as autograd's, not a NumPy array's
            # (16 bytes into a page from 1 MiB up): what users' gradients are.
            t.grad = torch.tensor(g)
        try:
            opt = optim.torch(torch, tensors, **kws[variant])
            opt.step()
        except (RuntimeError, TypeError, ValueError):
            continue  # this torch has no such implementation for this optimizer/dtype
        out[f"torch-{variant}"] = opt.step

    out["flatopt-torch"] = _flatopt_torch_step(optim, torch, arrays, grads, n_threads)
    if use_deepspeed:
        step = _deepspeed_impl(optim, torch, arrays, grads)
        if step is not None:
            out["deepspeed"] = step
    return out


def bandwidth_step(working_set_elements, dtype, n_threads):
    """An in-place streaming pass over ``working_set_elements`` (two arrays, a += b, on
    flatopt's allocation: see ``_zeros``) and the bytes it moves."""
    half = max(1, working_set_elements // 2)
    a, b = aligned_zeros(half, dtype), aligned_zeros(half, dtype)
    b[:] = 1
    return (lambda: kernels.stream_add(a, b, n_threads)), 3 * half * np.dtype(dtype).itemsize


def adam_traffic_step(n, dtype, n_threads):
    """A pass with Adam's memory traffic over ``n`` elements and no arithmetic to speak of
    (four arrays on flatopt's allocation, three updated: ``kernels.stream_add3``), the
    ceiling a one-pass Adam step can reach on this machine, and the bytes it moves."""
    p, m, v, g = (aligned_zeros(max(1, n), dtype) for _ in range(4))
    g[:] = 1
    return (lambda: kernels.stream_add3(p, m, v, g, n_threads)), 7 * p.nbytes


def run_case(optim, case, dtype, n_threads, min_time, torch=None, use_deepspeed=False):
    """Time every implementation of ``optim`` on ``case``; return result rows."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(dtype) for s in case.shapes]
    grads = [(rng.standard_normal(s) * 1e-3).astype(dtype) for s in case.shapes]
    opt = optim.flatopt([a.copy() for a in arrays], n_threads)
    for view, g in zip(opt.grads, grads):
        view[...] = g
    p_np, g_np = _copy(opt.flat_params), _copy(opt.flat_grads)
    impls = {"numpy": optim.numpy(p_np, g_np), "flatopt": opt.step,
             **_torch_impls(optim, torch, arrays, grads, n_threads, use_deepspeed)}
    nbytes = optim.bytes_per_step(case.size, np.dtype(dtype).itemsize)
    bw_fn, bw_bytes = bandwidth_step((2 + optim.n_state) * case.size, dtype, n_threads)
    bw_gbps = bw_bytes / time_call(bw_fn, min_time) / 1e9
    rows = []
    times = {name: time_call(fn, min_time) for name, fn in impls.items()}
    for name, t in times.items():
        gbps = nbytes / t / 1e9
        rows.append(dict(optimizer=optim.name, case=case.name, size=case.size,
                         dtype=np.dtype(dtype).name, threads=n_threads, impl=name, seconds=t,
                         speedup=times["numpy"] / t, gbps=gbps, bandwidth_gbps=bw_gbps,
                         bandwidth_share=gbps / bw_gbps))
    return rows


def format_rows(rows):
    lines = [f"  {'impl':<15}{'median':>12}{'vs numpy':>10}{'GB/s':>8}{'%bw':>7}"]
    for r in rows:
        lines.append(f"  {r['impl']:<15}{r['seconds'] * 1e3:>10.4f}ms{r['speedup']:>9.2f}x"
                     f"{r['gbps']:>8.1f}{100 * r['bandwidth_share']:>6.0f}%")
    lines.append(f"  {'bandwidth':<15}{'':>22}{rows[0]['bandwidth_gbps']:>8.1f}")
    return "\n".join(lines)


def _import_torch(use_torch):
    if not use_torch:
        return None
    # Like for like at large sizes: NumPy, and so flatopt, asks for transparent huge pages
    # for buffers of 4 MiB and up; torch's CPU allocator asks only with this variable set,
    # and reads it once, at its first allocation (so: before the import). An explicit
    # THP_MEM_ALLOC_ENABLE=0 is kept, and the header says which it was.
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        import torch
    except ImportError:
        return None
    return torch


def _torch_label(torch):
    if torch is None:
        return "torch not used"
    pages = "huge pages" if os.environ.get("THP_MEM_ALLOC_ENABLE", "").strip() == "1" else "4 KiB pages"
    return f"torch {torch.__version__} ({pages}, THP_MEM_ALLOC_ENABLE)"


def machine_load():
    """(1-minute load average, CPUs this process may run on), or None where unknown."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return load, cpus or 1


def busy_note(load=None):
    """A warning when the machine ran more than it has CPUs for (other processes took
    turns with the benchmark: timings then include waits of a scheduler time slice,
    milliseconds, and mean nothing), else ``""``."""
    load = machine_load() if load is None else load
    if load is None or load[0] <= load[1] + 0.5:
        return ""
    return (f"note: the machine was busy (1-minute load {load[0]:.1f} on {load[1]} CPUs): the "
            "timings include waits for a CPU; measure again when it is idle")


def header(n_threads, torch=None, use_deepspeed=False, numpy_baseline=True):
    """One line naming what is measured: versions, kernels' ISA, threads, CPU model, and
    the load when it starts."""
    parts = [f"flatopt {flatopt.__version__} ({ISA} kernels, OpenMP "
             f"{'on' if flatopt.openmp_enabled() else 'off'})",
             f"{n_threads} thread(s)" + (" (numpy baseline: 1)" if numpy_baseline else ""),
             f"CPU: {cpu_model()}", f"numpy {np.__version__}",
             _torch_label(torch)]
    capability = getattr(getattr(getattr(torch, "backends", None), "cpu", None), "get_cpu_capability", None)
    if capability is not None:
        parts.append(f"torch's CPU kernels: {capability()}")
    load = machine_load()
    if load is not None:
        parts.append(f"load {load[0]:.1f} on {load[1]} CPUs")
    if torch is not None and use_deepspeed:
        cls = deepspeed_cpu_adam()
        if cls is not None:
            import deepspeed
            parts.append(f"deepspeed {deepspeed.__version__}")
    return ", ".join(parts)


def case_weight(optim, case, torch=None):
    """Expected relative cost of a case, for progress estimates: timed implementations
    (numpy, flatopt, bandwidth, torch's three and the adapter) times a size factor."""
    n_impls = 3 + (len(optim.torch_variants) + 1 if torch is not None and optim.torch else 0)
    return n_impls * (1 + case.size / 2**22)


def run(optims, cases, dtypes, n_threads, min_time, use_torch=True, out=None,
        use_deepspeed=False, progress=None):
    """Time every (optimizer, dtype, case); print a table per case (to ``out``, default
    stdout); return all rows. ``progress`` (a :class:`Progress` over the same tasks, in
    order) reports on stderr.
    """
    out = sys.stdout if out is None else out
    torch = _import_torch(use_torch)
    threads = effective_n_threads(n_threads)
    if progress is None:
        print(header(threads, torch, use_deepspeed), file=out)
    rows = []
    for optim in optims:
        for dtype in dtypes:
            for case in cases:
                if progress is not None:
                    progress.next(f"{optim.name}, {np.dtype(dtype).name}, {case.name}")
                case_rows = run_case(optim, case, dtype, threads, min_time, torch, use_deepspeed)
                rows += case_rows
                print(f"\n{optim.name}, {np.dtype(dtype).name}, {case.name}, "
                      f"{case.size:,} elements", file=out)
                print(format_rows(case_rows), file=out, flush=True)
    return rows


# ---- small sizes: where does flatopt overtake NumPy? ----------------------------------------

CROSSOVER_SIZES = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)


def crossover(optims, sizes, dtype, n_threads, min_time, out=None, progress=None, torch=None):
    """``opt.step()`` (the NumPy API, per-call overhead included) against the in-place
    NumPy step on small flat buffers, samples interleaved (see :func:`time_interleaved`);
    prints one table per optimizer, returns rows. With ``torch``, a column for
    flatopt.torch on one tensor of the same size, and its overhead over the NumPy API:
    the adapter's own cost per step."""
    out = sys.stdout if out is None else out
    threads = effective_n_threads(n_threads)
    rows = []
    for optim in optims:
        if progress is not None:
            progress.next(f"crossover, {optim.name}")
        adapter = torch is not None and optim.torch is not None
        print(f"\ncrossover, {optim.name}, {np.dtype(dtype).name}: us per step, "
              f"flatopt.step() vs in-place NumPy{', and flatopt.torch' if adapter else ''}, "
              f"{threads} thread(s)", file=out)
        print(f"  {'elements':>9}{'flatopt':>11}{'numpy':>11}{'vs numpy':>10}"
              + (f"{'fo.torch':>11}{'adapter':>10}" if adapter else ""), file=out)
        slower = []
        for n in sizes:
            rng = np.random.default_rng(0)
            p0, g0 = rng.standard_normal(n).astype(dtype), (rng.standard_normal(n) * 1e-3).astype(dtype)
            opt = optim.flatopt([p0.copy()], threads)
            opt.flat_grads[...] = g0
            fns = [opt.step, optim.numpy(_copy(opt.flat_params), _copy(opt.flat_grads))]
            if adapter:
                fns.append(_flatopt_torch_step(optim, torch, [p0], [g0], threads))
            times = time_interleaved(fns, min_time)
            t_flat, t_np = times[:2]
            row = dict(optimizer=optim.name, case="crossover", size=n,
                       dtype=np.dtype(dtype).name, threads=threads, flatopt=t_flat,
                       numpy=t_np, speedup=t_np / t_flat)
            line = f"  {n:>9,}{t_flat * 1e6:>11.2f}{t_np * 1e6:>11.2f}{t_np / t_flat:>9.2f}x"
            if adapter:
                row["flatopt_torch"] = times[2]
                line += f"{times[2] * 1e6:>11.2f}{(times[2] - t_flat) * 1e6:>10.2f}"
            rows.append(row)
            if t_flat > t_np:
                slower.append(n)
            print(line, file=out, flush=True)
        verdict = ("flatopt is at least as fast at every size measured" if not slower else
                   f"flatopt is slower at {', '.join(f'{n:,}' for n in slower)} elements")
        print(f"  {verdict}", file=out)
    return rows


# ---- end to end: a training loop, each phase timed -------------------------------------------

def _mlp(torch, width, depth, seed=0):
    torch.manual_seed(seed)
    layers, n_in = [], 64
    for _ in range(depth):
        layers += [torch.nn.Linear(n_in, width), torch.nn.LayerNorm(width), torch.nn.GELU()]
        n_in = width
    layers.append(torch.nn.Linear(n_in, 10))
    return torch.nn.Sequential(*layers)


def end_to_end(torch, n_threads, steps=50, rounds=5, width=256, depth=4, batch=64,
               out=None, progress=None):
    """A small MLP training loop (Adam, float32, synthetic 8x8-image-sized data): the
    optimizers take turns, ``steps`` training steps each per round, and every phase of
    every step is timed. Prints medians per step, and the two compared round by round
    (``paired_rounds``); returns one row per optimizer, flatopt's with the paired figures."""
    out = sys.stdout if out is None else out
    import flatopt.torch as flat_torch

    threads = effective_n_threads(n_threads)
    torch.set_num_threads(threads)
    model = _mlp(torch, width, depth)
    n_tensors = len(list(model.parameters()))
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.rand(steps * batch, 64, generator=g)
    y = torch.randint(0, 10, (steps * batch,), generator=g)
    makers = {
        "torch.optim.Adam(fused=True)": lambda ps: torch.optim.Adam(ps, lr=LR, fused=True),
        "flatopt.torch.Adam": lambda ps: flat_torch.Adam(ps, lr=LR, n_threads=threads),
    }
    runs = {}
    for label, make in makers.items():
        m = copy.deepcopy(model)
        runs[label] = (m, make(m.parameters()))
    phases = ("zero_grad", "forward", "backward", "step")
    times = {label: {p: [] for p in phases + ("total",)} for label in runs}
    for r in range(rounds + 1):  # round 0 warms up (allocator, thread pools, first step)
        if progress is not None and r > 0:
            progress.next(f"end to end (width {width}), round {r} of {rounds}")
        # Alternate the order: the second of two runs in a round was measured slower in
        # forward and backward (allocator and cache state left by the first).
        for label, (m, opt) in (list(runs.items()) if r % 2 else list(runs.items())[::-1]):
            for i in range(steps):
                xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
                t0 = time.perf_counter()
                opt.zero_grad()
                t1 = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(m(xb), yb)
                t2 = time.perf_counter()
                loss.backward()
                t3 = time.perf_counter()
                opt.step()
                t4 = time.perf_counter()
                if r > 0:
                    for p, t in zip(phases + ("total",), (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                        times[label][p].append(t)
    print(f"\nend to end: MLP 64-{width}x{depth}-10 ({n_tensors} tensors, {n_params:,} float32 "
          f"parameters), Adam, batch {batch}, {threads} thread(s); ms per training step, "
          f"medians of {rounds} x {steps} steps (total: of whole steps, not the sum of the "
          f"phase medians)", file=out)
    print(f"  {'optimizer':<30}" + "".join(f"{p:>10}" for p in phases + ("total",)), file=out)
    rows = []
    for label, t in times.items():
        med = {p: statistics.median(v) for p, v in t.items()}
        rows.append(dict(optimizer="adam", case="end to end", size=n_params, dtype="float32",
                         threads=threads, impl=label, seconds=med["total"],
                         **{p: med[p] for p in phases}))
        print(f"  {label:<30}" + "".join(f"{med[p] * 1e3:>10.3f}" for p in phases + ("total",)),
              file=out)
    base, ours = rows[0]["seconds"], rows[1]["seconds"]
    print(f"  flatopt.torch takes {ours / base:.2f}x the time of torch's fused Adam per "
          f"training step", file=out, flush=True)
    paired = paired_rounds(*times.values(), steps)
    rows[1].update(paired)
    ratios = paired["round_ratios"]
    faster = sum(r < 1 for r in ratios)
    print(f"  paired by round (medians over the rounds of each round's comparison, which a "
          f"machine whose speed drifts from round to round distorts least): {paired['ratio']:.2f}x "
          f"({min(ratios):.2f}-{max(ratios):.2f}x over {rounds} rounds, flatopt.torch faster in "
          f"{faster}); step() saves "
          f"{paired['step_saving'] * 1e3:.3f} ms, the whole training step "
          f"{paired['total_saving'] * 1e3:.3f} ms", file=out, flush=True)
    return rows


def paired_rounds(base, ours, steps):
    """Compare two runs of ``end_to_end`` round by round.

    ``base`` and ``ours`` map ``"step"`` and ``"total"`` to per-step times, ``steps`` per
    round, rounds in order. Per round, the medians of the two are compared: the ratio of
    whole training steps, and the time saved in ``step()`` and in the whole training step.
    Returns their medians over the rounds (``ratio``, ``step_saving``, ``total_saving``,
    in seconds) and the per-round ratios (``round_ratios``).
    """
    def per_round(t):
        return [statistics.median(t[i:i + steps]) for i in range(0, len(t), steps)]

    b_total, o_total = per_round(base["total"]), per_round(ours["total"])
    b_step, o_step = per_round(base["step"]), per_round(ours["step"])
    ratios = [o / b for o, b in zip(o_total, b_total)]
    return dict(ratio=statistics.median(ratios), round_ratios=ratios,
                step_saving=statistics.median([b - o for b, o in zip(b_step, o_step)]),
                total_saving=statistics.median([b - o for b, o in zip(b_total, o_total)]))


def plot(rows, path):
    """GB/s against size for each implementation, with the bandwidth reference as a line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'flatopt[plot]'") from None
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(len(names), len(dtypes), figsize=(5.5 * len(dtypes), 3.6 * len(names)),
                             squeeze=False)
    for (name, dtype), ax in zip([(n, d) for n in names for d in dtypes], axes.flat):
        sel = [r for r in rows if r["optimizer"] == name and r["dtype"] == dtype]
        for impl in dict.fromkeys(r["impl"] for r in sel):
            pts = sorted((r["size"], r["gbps"]) for r in sel if r["impl"] == impl)
            ax.plot(*zip(*pts), marker="o", label=impl)
        bw = sorted({(r["size"], r["bandwidth_gbps"]) for r in sel})
        ax.plot(*zip(*bw), "k--", label="bandwidth (a += b)")
        ax.set(xscale="log", xlabel="elements", ylabel="GB/s", title=f"{name}, {dtype}, {sel[0]['threads']} threads")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m flatopt.bench",
                                     description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS),
                        default=[n for n in ("sgd-momentum", "momentum", "adam") if n in OPTIMIZERS])
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help="flat buffer sizes (elements; default 2**16 2**20 2**23, with --quick "
                             "2**10 2**16)")
    parser.add_argument("--models", nargs="*", type=int, default=None,
                        help="transformer widths for 168-tensor model cases (768 is 85M elements; "
                             "default 128, with --quick none)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="default: flatopt.get_num_threads()")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of timing per measurement (default 0.3, with --quick 0.02)")
    parser.add_argument("--large", action="store_true", help="add 2**25 elements and the width-768 model")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and short timings (a smoke run; no DeepSpeed); options "
                             "given explicitly are kept")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip torch.optim, DeepSpeed and the end-to-end loop even if installed")
    parser.add_argument("--no-deepspeed", action="store_true",
                        help="skip DeepSpeed's CPU Adam even if installed (its first use compiles for ~2 min)")
    parser.add_argument("--no-crossover", action="store_true", help="skip the small-size table")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training loop")
    parser.add_argument("--e2e-widths", nargs="+", type=int, default=None,
                        help="hidden widths of the end-to-end MLP (default: 64 256 1024, with "
                             "--quick 32; 256 is examples/torch_cpu_training.py's default)")
    parser.add_argument("--e2e-rounds", type=int, default=None,
                        help="rounds of the end-to-end loop, 50 steps of each optimizer a round "
                             "(5 with --quick; default 12 rounds, with --quick 1; more tell small "
                             "differences apart on a noisy machine)")
    parser.add_argument("--plot", metavar="PNG", help="draw GB/s against size (needs matplotlib)")
    args = parser.parse_args(argv)
    # 12 rounds: with 5, the 3.2M-parameter loop's backward medians differed by up to 6%
    # between the two optimizers from run to run (0.97x and 1.00x in two runs of one
    # session, 0.95x and 0.96x with 12 rounds right after; forward and backward alone,
    # timed apart from any optimizer, agree within 1%).
    crossover_sizes, e2e = CROSSOVER_SIZES, dict(steps=50, rounds=12)
    if args.quick:
        crossover_sizes, e2e = (1, 64, 1024, 4096), dict(steps=5, rounds=1, depth=2)
    for name, normal, quick in (("sizes", [2**16, 2**20, 2**23], [2**10, 2**16]),
                                ("models", [128], []), ("min_time", 0.3, 0.02)):
        if getattr(args, name) is None:  # not given: the default of the kind of run
            setattr(args, name, quick if args.quick else normal)
    if args.e2e_widths is None:
        args.e2e_widths = [32] if args.quick else [64, 256, 1024]
    if args.e2e_rounds is not None:
        if args.e2e_rounds < 1:
            parser.error(f"--e2e-rounds: expected a positive number of rounds, got {args.e2e_rounds}")
        e2e["rounds"] = args.e2e_rounds
    if args.large:
        args.sizes = sorted(set(args.sizes) | {2**25})
        args.models = sorted(set(args.models) | {768})
    cases = [flat_case(n) for n in args.sizes] + [model_case(w) for w in args.models]
    optims = [OPTIMIZERS[name] for name in args.optimizers]
    torch = _import_torch(not args.no_torch)
    use_deepspeed = torch is not None and not (args.no_deepspeed or args.quick)
    threads = effective_n_threads(args.threads)

    # Every task, in the order it runs, weighted by its expected cost in min-time units.
    weights = [case_weight(o, c, torch) for o in optims for _ in args.dtypes for c in cases]
    if not args.no_crossover:
        weights += [(2 if torch is None else 3) * len(crossover_sizes)] * len(optims)
    if torch is not None and not args.no_e2e:
        weights += [max(1.0, 0.2 * e2e["steps"] * 0.005 * max(1, w / 256) ** 2 / args.min_time)
                    for w in args.e2e_widths for _ in range(e2e["rounds"])]
    progress = Progress(weights)

    print(header(threads, torch, use_deepspeed), flush=True)
    rows = run(optims, cases, args.dtypes, args.threads, args.min_time, use_torch=torch is not None,
               use_deepspeed=use_deepspeed, progress=progress)
    if not args.no_crossover:
        rows += crossover(optims, crossover_sizes, args.dtypes[0], args.threads, args.min_time,
                          progress=progress, torch=torch)
    if torch is not None and not args.no_e2e:
        for width in args.e2e_widths:
            rows += end_to_end(torch, args.threads, progress=progress, width=width, **e2e)
    progress.finish()
    note = busy_note()
    if note:
        print(f"\n{note}")
    if args.plot:
        plot([r for r in rows if str(r["case"]).startswith("flat")], args.plot)
        print(f"\nplot written to {args.plot}")
    return rows


if __name__ == "__main__":
    main()

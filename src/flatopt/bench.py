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
  size: what the memory system delivers, the ceiling for a one-pass update.

Times are medians of repeated samples. ``GB/s`` counts the bytes a one-pass update must
move (each of param, grad and state read once, param and state written once), so it is
comparable across implementations and with the bandwidth line; ``%bw`` is that share.

On this project's machines, run benchmarks as
``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m flatopt.bench``
(those variables slow NumPy on some CPUs; flatopt itself does not use BLAS).
"""

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import flatopt
from flatopt._dispatch import ISA, kernels
from flatopt._threads import effective_n_threads

LR = 1e-3


# ---- NumPy baselines: the best in-place NumPy for each update ----------------------------
# Each returns a step function over flat arrays. They are competitors, checked against
# flatopt in tests/test_bench.py, not references.

def numpy_sgd_momentum(p, g, momentum=0.9):
    """SGD with momentum after its first step: buf = m*buf + g; p -= lr*buf."""
    buf, tmp = np.zeros_like(p), np.empty_like(p)

    def step():
        np.multiply(buf, momentum, out=buf)
        np.add(buf, g, out=buf)
        np.multiply(buf, LR, out=tmp)
        np.subtract(p, tmp, out=p)
    return step


def numpy_momentum(p, g, beta=0.9):
    """v = beta*v + (1-beta)*g; p -= lr*v."""
    v, tmp = np.zeros_like(p), np.empty_like(p)

    def step():
        np.multiply(v, beta, out=v)
        np.multiply(g, 1.0 - beta, out=tmp)
        np.add(v, tmp, out=v)
        np.multiply(v, LR, out=tmp)
        np.subtract(p, tmp, out=p)
    return step


def numpy_adam(p, g, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False):
    """torch.optim.Adam/AdamW (no amsgrad) with in-place ufuncs."""
    m, v, tmp = np.zeros_like(p), np.zeros_like(p), np.empty_like(p)
    t = [0]

    def step():
        t[0] += 1
        bc1, bc2 = 1 - beta1 ** t[0], 1 - beta2 ** t[0]
        if weight_decay and decoupled:
            np.multiply(p, 1 - LR * weight_decay, out=p)
        np.multiply(m, beta1, out=m)
        np.multiply(g, 1 - beta1, out=tmp)
        np.add(m, tmp, out=m)
        np.multiply(v, beta2, out=v)
        np.multiply(g, g, out=tmp)
        np.multiply(tmp, 1 - beta2, out=tmp)
        np.add(v, tmp, out=v)
        np.sqrt(v, out=tmp)
        np.divide(tmp, math.sqrt(bc2), out=tmp)
        np.add(tmp, eps, out=tmp)
        np.divide(m, tmp, out=tmp)
        np.multiply(tmp, LR / bc1, out=tmp)
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
    v, tmp = np.zeros_like(p), np.empty_like(p)

    def step():
        np.multiply(v, alpha, out=v)
        np.multiply(g, g, out=tmp)
        np.multiply(tmp, 1 - alpha, out=tmp)
        np.add(v, tmp, out=v)
        _numpy_adaptive_descent(p, g, v, tmp, eps)
    return step


def numpy_adagrad(p, g, eps=1e-10):
    """torch.optim.Adagrad (no lr decay): s += g*g; p -= lr*g/(sqrt(s)+eps)."""
    s, tmp = np.zeros_like(p), np.empty_like(p)

    def step():
        np.multiply(g, g, out=tmp)
        np.add(s, tmp, out=s)
        _numpy_adaptive_descent(p, g, s, tmp, eps)
    return step


def numpy_adadelta(p, g, rho=0.9, eps=1e-6, lr=1.0):
    """torch.optim.Adadelta: v = rho*v + (1-rho)*g*g;
    d = sqrt(u+eps)/sqrt(v+eps)*g; u = rho*u + (1-rho)*d*d; p -= lr*d."""
    v, u, d, tmp = (np.zeros_like(p) for _ in range(4))

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
    m, v, den, tmp = (np.zeros_like(p) for _ in range(4))
    t, mu_product = [0], [1.0]

    def step():
        t[0] += 1
        mu = beta1 * (1 - 0.5 * 0.96 ** (t[0] * momentum_decay))
        mu_next = beta1 * (1 - 0.5 * 0.96 ** ((t[0] + 1) * momentum_decay))
        mu_product[0] *= mu
        np.multiply(m, beta1, out=m)
        np.multiply(g, 1 - beta1, out=tmp)
        np.add(m, tmp, out=m)
        np.multiply(v, beta2, out=v)
        np.multiply(g, g, out=tmp)
        np.multiply(tmp, 1 - beta2, out=tmp)
        np.add(v, tmp, out=v)
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
    m, v, tmp = np.zeros_like(p), np.zeros_like(p), np.empty_like(p)
    t = [0]
    rho_inf = 2 / (1 - beta2) - 1

    def step():
        t[0] += 1
        bc1, bc2 = 1 - beta1 ** t[0], 1 - beta2 ** t[0]
        rho_t = rho_inf - 2 * t[0] * beta2 ** t[0] / bc2
        np.multiply(m, beta1, out=m)
        np.multiply(g, 1 - beta1, out=tmp)
        np.add(m, tmp, out=m)
        np.multiply(v, beta2, out=v)
        np.multiply(g, g, out=tmp)
        np.multiply(tmp, 1 - beta2, out=tmp)
        np.add(v, tmp, out=v)
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
    m, u, tmp = np.zeros_like(p), np.zeros_like(p), np.empty_like(p)
    t = [0]

    def step():
        t[0] += 1
        np.multiply(m, beta1, out=m)
        np.multiply(g, 1 - beta1, out=tmp)
        np.add(m, tmp, out=m)
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
    m, tmp, tmp2 = np.zeros_like(p), np.empty_like(p), np.empty_like(p)

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


def _torch_impls(optim, torch, arrays, grads, n_threads):
    """torch.optim variants of ``optim`` on copies of ``arrays``: name -> step function."""
    if optim.torch is None or torch is None:
        return {}
    torch.set_num_threads(n_threads)
    kws = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    out = {}
    for variant in optim.torch_variants:
        tensors = [torch.tensor(a) for a in arrays]
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g)
        try:
            opt = optim.torch(torch, tensors, **kws[variant])
            opt.step()
        except (RuntimeError, TypeError, ValueError):
            continue  # this torch has no such implementation for this optimizer/dtype
        out[f"torch-{variant}"] = opt.step
    import types

    import flatopt.torch as flat_torch
    tensors = [torch.tensor(a) for a in arrays]
    for t, g in zip(tensors, grads):
        t.grad = torch.tensor(g)  # copied into the flat gradient buffer at construction
    # The same constructor call as torch's, with flatopt.torch in place of torch.optim.
    opt = optim.torch(types.SimpleNamespace(optim=flat_torch), tensors, n_threads=n_threads)
    out["flatopt-torch"] = opt.step
    return out


def bandwidth_step(working_set_elements, dtype, n_threads):
    """An in-place streaming pass over ``working_set_elements`` (two arrays, a += b) and the
    bytes it moves."""
    half = max(1, working_set_elements // 2)
    a, b = np.zeros(half, dtype), np.ones(half, dtype)
    return (lambda: kernels.stream_add(a, b, n_threads)), 3 * half * np.dtype(dtype).itemsize


def run_case(optim, case, dtype, n_threads, min_time, torch=None):
    """Time every implementation of ``optim`` on ``case``; return result rows."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(dtype) for s in case.shapes]
    grads = [(rng.standard_normal(s) * 1e-3).astype(dtype) for s in case.shapes]
    opt = optim.flatopt([a.copy() for a in arrays], n_threads)
    for view, g in zip(opt.grads, grads):
        view[...] = g
    p_np, g_np = opt.flat_params.copy(), opt.flat_grads.copy()
    impls = {"numpy": optim.numpy(p_np, g_np), "flatopt": opt.step,
             **_torch_impls(optim, torch, arrays, grads, n_threads)}
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


def run(optims, cases, dtypes, n_threads, min_time, use_torch=True, out=sys.stdout):
    """Time every (optimizer, dtype, case); print a table per case; return all rows."""
    torch = None
    if use_torch:
        try:
            import torch
        except ImportError:
            torch = None
    threads = effective_n_threads(n_threads)
    print(f"flatopt {flatopt.__version__} ({ISA}, OpenMP {'on' if flatopt.openmp_enabled() else 'off'}), "
          f"{threads} thread(s), numpy {np.__version__}, "
          + (f"torch {torch.__version__}" if torch else "torch not installed"), file=out)
    rows = []
    for optim in optims:
        for dtype in dtypes:
            for case in cases:
                case_rows = run_case(optim, case, dtype, threads, min_time, torch)
                rows += case_rows
                print(f"\n{optim.name}, {np.dtype(dtype).name}, {case.name}, "
                      f"{case.size:,} elements", file=out)
                print(format_rows(case_rows), file=out, flush=True)
    return rows


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
                                     description=__doc__.split("\n\n")[0].strip('`'))
    parser.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS),
                        default=[n for n in ("sgd-momentum", "momentum", "adam") if n in OPTIMIZERS])
    parser.add_argument("--sizes", nargs="+", type=int, default=[2**16, 2**20, 2**23],
                        help="flat buffer sizes (elements)")
    parser.add_argument("--models", nargs="*", type=int, default=[128],
                        help="transformer widths for 168-tensor model cases (768 is 85M elements)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="default: flatopt.get_num_threads()")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per measurement")
    parser.add_argument("--large", action="store_true", help="add 2**25 elements and the width-768 model")
    parser.add_argument("--quick", action="store_true", help="small sizes and short timings (a smoke run)")
    parser.add_argument("--no-torch", action="store_true", help="skip torch.optim even if installed")
    parser.add_argument("--plot", metavar="PNG", help="draw GB/s against size (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.models, args.min_time = [2**10, 2**16], [], 0.02
    if args.large:
        args.sizes = sorted(set(args.sizes) | {2**25})
        args.models = sorted(set(args.models) | {768})
    cases = [flat_case(n) for n in args.sizes] + [model_case(w) for w in args.models]
    rows = run([OPTIMIZERS[name] for name in args.optimizers], cases, args.dtypes, args.threads,
               args.min_time, use_torch=not args.no_torch)
    if args.plot:
        plot([r for r in rows if r["case"].startswith("flat")], args.plot)
        print(f"\nplot written to {args.plot}")


if __name__ == "__main__":
    main()

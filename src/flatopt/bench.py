"""``python -m flatopt.bench``: time flatopt's fused step against the best plain NumPy.

For each optimizer, dtype and size, the same step runs three ways on the same data:

* ``flatopt``: the optimizer's fused kernel on its flat buffers (one call);
* ``numpy``:   the same update written as well as NumPy allows: in-place ufuncs with
  ``out=``, one preallocated scratch array, no avoidable temporaries. Each element still
  crosses memory once per ufunc, which is the cost flatopt removes;
* ``torch``:   torch.optim on the same data (``foreach`` and ``fused`` where it has them),
  when PyTorch is installed.

Times are medians of many repeats; ``GB/s`` counts the bytes a one-pass update must move
(each of param, grad and state read once, param and state written once), so it is
comparable across implementations and against the machine's memory bandwidth.

Benchmark commands on this project's CI machines unset OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE (they slow NumPy on some CPUs); flatopt does not use BLAS.
"""

import argparse
import statistics
import sys
import time

import numpy as np

import flatopt
from flatopt._threads import effective_n_threads


def _numpy_sgd_momentum(p, g, buf, scratch, lr, momentum):
    """torch.optim.SGD(momentum=m) after its first step: buf = m*buf + g; p -= lr*buf."""
    np.multiply(buf, momentum, out=buf)
    np.add(buf, g, out=buf)
    np.multiply(buf, lr, out=scratch)
    np.subtract(p, scratch, out=p)


def _numpy_momentum(p, g, v, scratch, lr, beta):
    """Textbook momentum: v = beta*v + (1-beta)*g; p -= lr*v."""
    np.multiply(v, beta, out=v)
    np.multiply(g, 1.0 - beta, out=scratch)
    np.add(v, scratch, out=v)
    np.multiply(v, lr, out=scratch)
    np.subtract(p, scratch, out=p)


class Case:
    """One optimizer configuration: how to build it in flatopt, NumPy and torch."""

    def __init__(self, name, make_flatopt, numpy_step, n_state, torch_make=None):
        self.name = name
        self.make_flatopt = make_flatopt   # (param, n_threads) -> optimizer
        self.numpy_step = numpy_step       # (p, g, state_list, scratch) -> None
        self.n_state = n_state             # state arrays of the param's size
        self.torch_make = torch_make       # (params, variant) -> torch optimizer, or None

    def bytes_per_step(self, n, itemsize):
        # param and state read and written, grad read: the one-pass minimum.
        return (2 * (1 + self.n_state) + 1) * n * itemsize


CASES = {
    "sgd-momentum": Case(
        "sgd-momentum",
        lambda p, t: flatopt.SGD([p], lr=1e-3, momentum=0.9, n_threads=t),
        lambda p, g, s, scratch: _numpy_sgd_momentum(p, g, s[0], scratch, 1e-3, 0.9),
        1,
        lambda torch, params, **kw: torch.optim.SGD(params, lr=1e-3, momentum=0.9, **kw),
    ),
    "momentum": Case(
        "momentum",
        lambda p, t: flatopt.Momentum([p], lr=1e-3, beta=0.9, n_threads=t),
        lambda p, g, s, scratch: _numpy_momentum(p, g, s[0], scratch, 1e-3, 0.9),
        1,
    ),
}


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


def _torch_variants(case, torch, p, g, n_threads):
    """torch.optim variants for ``case`` on a copy of ``p``: name -> step function."""
    if case.torch_make is None or torch is None:
        return {}
    torch.set_num_threads(n_threads)
    out = {}
    for variant, kw in (("torch-foreach", {"foreach": True}), ("torch-fused", {"fused": True})):
        tp = torch.tensor(p.copy(), requires_grad=False)
        tp.grad = torch.from_numpy(g)
        try:
            opt = case.torch_make(torch, [tp], **kw)
            opt.step()
        except (RuntimeError, TypeError, ValueError):
            continue  # this torch has no such variant for this optimizer/dtype
        out[variant] = opt.step
    return out


def run(cases, sizes, dtypes, n_threads, min_time, use_torch=True, out=sys.stdout):
    """Time every case; print a table; return the rows as dicts."""
    torch = None
    if use_torch:
        try:
            import torch
        except ImportError:
            torch = None
    threads = effective_n_threads(n_threads)
    print(f"flatopt {flatopt.__version__}, {threads} thread(s), OpenMP "
          f"{'on' if flatopt.openmp_enabled() else 'off'}, numpy {np.__version__}"
          + (f", torch {torch.__version__}" if torch else ", torch not installed"), file=out)
    header = f"{'optimizer':<14}{'dtype':<9}{'size':>10}  {'impl':<14}{'median':>11}{'vs numpy':>10}{'GB/s':>8}"
    print(header, file=out)
    print("-" * len(header), file=out)
    rows = []
    rng = np.random.default_rng(0)
    for case in cases:
        for dtype in dtypes:
            for n in sizes:
                p = rng.standard_normal(n).astype(dtype)
                g = (rng.standard_normal(n) * 1e-3).astype(dtype)
                opt = case.make_flatopt(p.copy(), threads)
                opt.flat_grads[:] = g
                state = [np.zeros(n, dtype) for _ in range(case.n_state)]
                p_np, scratch = p.copy(), np.empty(n, dtype)
                impls = {
                    "numpy": lambda: case.numpy_step(p_np, g, state, scratch),
                    "flatopt": opt.step,
                    **_torch_variants(case, torch, p, g, threads),
                }
                times = {name: time_call(fn, min_time) for name, fn in impls.items()}
                nbytes = case.bytes_per_step(n, np.dtype(dtype).itemsize)
                for name, t in times.items():
                    row = dict(optimizer=case.name, dtype=np.dtype(dtype).name, size=n, impl=name,
                               seconds=t, speedup=times["numpy"] / t, gbps=nbytes / t / 1e9)
                    rows.append(row)
                    print(f"{row['optimizer']:<14}{row['dtype']:<9}{n:>10}  {name:<14}"
                          f"{t * 1e3:>9.3f}ms{row['speedup']:>9.2f}x{row['gbps']:>8.1f}", file=out)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m flatopt.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[2**16, 2**20, 2**23])
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="default: flatopt.get_num_threads()")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per measurement")
    parser.add_argument("--quick", action="store_true", help="small sizes and short timings (a smoke run)")
    parser.add_argument("--no-torch", action="store_true", help="skip torch.optim even if installed")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.min_time = [2**10, 2**16], 0.02
    run([CASES[name] for name in args.optimizers], args.sizes, args.dtypes, args.threads,
        args.min_time, use_torch=not args.no_torch)


if __name__ == "__main__":
    main()

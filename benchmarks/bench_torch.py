"""Optimizer step of a 168-tensor transformer-shaped model: torch.optim vs flatopt.torch.

The parameters are those of ``python -m flatopt.bench``'s model cases
(:func:`flatopt.bench.transformer_shapes`): 12 transformer layers of 14 tensors (q, k, v, o
weights and biases, two MLP matrices of 4x the width with biases, two LayerNorm weights),
168 tensors; width 256 by default, 9.5 M parameters. Gradients are set once
and every variant times ``opt.step()`` alone: the variants take turns, one step each, for
``--repeats`` rounds after a warm-up, and the median is reported (taking turns spreads
the noise of a shared machine evenly over the variants). Variants:

* ``torch for-loop``: torch.optim's default on the CPU (one kernel per tensor and op);
* ``torch foreach`` and ``torch fused``: torch's multi-tensor and fused CPU paths;
* ``flatopt.torch``: one fused kernel call over the flat buffer (``n_threads`` threads).

The optimizer is torch.optim.Adam with default hyperparameters when flatopt.torch has
Adam, otherwise SGD with momentum 0.9 (``--optimizer`` picks). ``GB/s`` counts the bytes a
one-pass update must move (param and state read and written, grad read).

Run: ``PYTHONPATH=src python benchmarks/bench_torch.py`` (about 30 s). The machine's
threads are shared by torch (``torch.set_num_threads``) and flatopt (``n_threads``); both
use the same count.
"""

import argparse
import statistics
import time

import torch

import flatopt
import flatopt.torch as ft
from flatopt.bench import transformer_shapes


OPTIMIZERS = {
    # name: (kwargs, state tensors per parameter)
    "Adam": (dict(lr=1e-3), 2),
    "SGD": (dict(lr=1e-2, momentum=0.9), 1),
}


def make_params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype) * 0.02) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=dtype) * 1e-3 for s in shapes]
    return params, grads


def time_steps(opts, repeats, warmup=3):
    """Median seconds per ``step()`` of each optimizer in ``opts``, taking turns."""
    for opt in opts.values():
        for _ in range(warmup):
            opt.step()
    times = {label: [] for label in opts}
    for _ in range(repeats):
        for label, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(t) for label, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=None,
                        help="default: Adam if flatopt.torch has it, else SGD (momentum 0.9)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch and flatopt (default: torch.get_num_threads())")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--width", type=int, default=256, help="model width (768: 85 M parameters)")
    args = parser.parse_args(argv)

    name = args.optimizer or ("Adam" if hasattr(ft, "Adam") else "SGD")
    kwargs, n_state = OPTIMIZERS[name]
    dtype = getattr(torch, args.dtype)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    shapes = transformer_shapes(args.width)
    n = sum(torch.Size(s).numel() for s in shapes)
    nbytes = (2 * (1 + n_state) + 1) * n * dtype.itemsize

    variants = {
        "torch for-loop": lambda ps: getattr(torch.optim, name)(ps, **kwargs, foreach=False),
        "torch foreach": lambda ps: getattr(torch.optim, name)(ps, **kwargs, foreach=True),
        "torch fused": lambda ps: getattr(torch.optim, name)(ps, **kwargs, fused=True),
        "flatopt.torch": lambda ps: getattr(ft, name)(ps, **kwargs, n_threads=threads),
    }
    print(f"{name}{kwargs} step, {len(shapes)} tensors, {n / 1e6:.1f} M {args.dtype} parameters, "
          f"{threads} thread(s), flatopt {flatopt.__version__}, torch {torch.__version__}")
    print(f"{'variant':<16} {'ms/step':>9} {'GB/s':>7} {'vs fused':>9}")
    opts = {}
    for label, make in variants.items():
        params, grads = make_params(shapes, dtype)
        opts[label] = make(params)
        for p, g in zip(params, grads):
            p.grad = g  # read where they are by every implementation (flatopt.torch too)
    results = time_steps(opts, args.repeats)
    fused = results["torch fused"]
    for label, t in results.items():
        print(f"{label:<16} {t * 1e3:9.2f} {nbytes / t / 1e9:7.1f} {fused / t:8.2f}x")
    return results


if __name__ == "__main__":
    main()

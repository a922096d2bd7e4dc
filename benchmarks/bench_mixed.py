"""Mixed-precision Adam step: flatopt (16-bit params, float32 master) against torch.

For each size and 16-bit format (bf16, fp16) every implementation steps its own data:

* ``torch``:   what a torch user does today, path (a) of issue 13:
  ``torch.optim.Adam(fused=True)`` on a float32 master whose ``.grad`` is the 16-bit
  gradient upcast (``master.grad.copy_(grad16)``), then ``param16.copy_(master)``;
* ``flatopt``: ``flatopt.Adam(params16, master_dtype=np.float32)``: one pass per
  cache-sized block (widen the gradient block, the float32 Adam kernel, narrow the block);
* ``flatopt fp32``: ``flatopt.Adam`` on float32 params (no 16-bit copy), for reference;
* ``a += b``: the streaming reference (28 bytes an element moved, as a fused mixed step).

Bytes an element: the mixed step reads the 16-bit grad (2), master (4) and moments (8) and
writes master and moments (12) and the 16-bit param (2): 28. Path (a) moves about 40
(upcast: read 2, write 4; fused Adam: 28 with a float32 grad; copy back: read 4, write 2).
``GB/s`` is 28 bytes an element over the step time for every column, so it compares the
columns' speed, not their own traffic.

The implementations take turns in rounds (each runs for ``--per`` seconds, steps timed one
by one, that round's median kept); the table shows the median over ``--rounds`` rounds.
The project machine is shared and noisy: read the ratios, not the absolute times.

Run: ``PYTHONPATH=src python benchmarks/bench_mixed.py [--sizes 1048576 8388608]``.
"""

import argparse
import statistics
import time

import numpy as np
import torch

import flatopt
from flatopt._dispatch import kernels
from flatopt._threads import effective_n_threads

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

BYTES_MIXED = 28


def formats():
    out = [("fp16", np.float16, torch.float16)]
    if ml_dtypes is not None:
        out.insert(0, ("bf16", ml_dtypes.bfloat16, torch.bfloat16))
    return out


def make_impls(n, np16, t16, threads):
    rng = np.random.default_rng(0)
    p32 = rng.standard_normal(n, dtype=np.float32)
    g32 = (rng.standard_normal(n, dtype=np.float32) * 1e-3)
    impls = {}

    master = torch.from_numpy(p32.copy())
    param16 = master.to(t16)
    grad16 = torch.from_numpy(g32).to(t16)
    master.grad = torch.zeros_like(master)
    topt = torch.optim.Adam([master], lr=1e-3, fused=True)

    def torch_step():
        master.grad.copy_(grad16)
        topt.step()
        param16.copy_(master)
    impls["torch"] = torch_step

    fopt = flatopt.Adam([p32.astype(np16)], lr=1e-3, master_dtype=np.float32, n_threads=threads)
    fopt.grads[0][...] = g32.astype(np16)
    impls["flatopt"] = fopt.step

    f32 = flatopt.Adam([p32.copy()], lr=1e-3, n_threads=threads)
    f32.grads[0][...] = g32
    impls["flatopt fp32"] = f32.step

    # 28 bytes an element: two float32 arrays of 3.5 elements' worth each
    m = n * BYTES_MIXED // 12
    a, b = np.ones(m, np.float32), np.ones(m, np.float32)
    impls["a += b"] = lambda: kernels.stream_add(a, b, threads)
    return impls


def measure(fn, per):
    fn()
    times, end = [], time.perf_counter() + per
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2**20, 2**23])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per", type=float, default=0.4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    threads = effective_n_threads(args.threads)
    torch.set_num_threads(threads)
    print(f"threads={threads} torch={torch.__version__} rounds={args.rounds} per={args.per}s")
    print(f"{'size':>9} {'fmt':>4} {'impl':>13} {'ms/step':>9} {'GB/s@28B':>9} {'vs torch':>9}")
    for n in args.sizes:
        for name, np16, t16 in formats():
            impls = make_impls(n, np16, t16, threads)
            rounds = {k: [] for k in impls}
            for _ in range(args.rounds):
                for k, fn in impls.items():
                    rounds[k].append(measure(fn, args.per))
            med = {k: statistics.median(v) for k, v in rounds.items()}
            for k, t in med.items():
                ratio = med["torch"] / t
                print(f"{n:>9} {name:>4} {k:>13} {t * 1e3:9.3f} "
                      f"{n * BYTES_MIXED / t / 1e9:9.2f} {ratio:8.2f}x")


if __name__ == "__main__":
    main()

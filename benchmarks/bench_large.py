"""Adam on one large float32 buffer: torch's fused Adam, DeepSpeed's CPU Adam, flatopt.

For each size (powers of two and odd sizes alike, since buffer addresses and per-thread
chunks depend on the exact size), every implementation steps the same kind of data:

* ``torch fused``:    ``torch.optim.Adam(fused=True)`` on one tensor;
* ``deepspeed``:      ``deepspeed.ops.adam.DeepSpeedCPUAdam`` (adamw_mode off) on one
  tensor, when ``deepspeed`` is installed (``DS_BUILD_OPS=0 pip install deepspeed``; its
  CPU op compiles on first use, about two minutes);
* ``flatopt.torch``:  ``flatopt.torch.Adam`` on one tensor;
* ``flatopt``:        ``flatopt.Adam`` (the NumPy API) on one array;
* ``a += b``:         the in-place streaming reference: two arrays holding as many bytes
  as Adam's four, so it shows what the memory system delivers to a one-pass update;
* ``adam traffic``:   Adam's own traffic with no arithmetic (``p += g; m += g; v += g`` in
  one pass: four arrays read, three written, as Adam's param, grad and moments), the
  ceiling of a one-pass Adam step: it writes a larger share of its bytes than ``a += b``.

The implementations take turns: each round runs each one for about ``--per`` seconds
(steps timed one by one) and keeps that round's median; the table shows the median over
``--rounds`` rounds, so a burst of load from other processes hits every column alike.
``vs best`` is flatopt's time over the best of torch fused and DeepSpeed; ``%ref`` is
flatopt's effective bandwidth (28 bytes an element: param, grad and two moments read,
three written) as a share of the ``a += b`` reference. The ``%ceil`` row gives each
column's speed as a share of ``adam traffic``'s: an implementation near 100% there has
nothing left to gain but by moving fewer bytes. ``--cpu-time`` adds the process's
CPU time per step (all threads), which other load distorts less than wall time; run it
with ``OMP_WAIT_POLICY=passive`` so that idle OpenMP threads do not spin (each step then
also pays a thread wake-up, about 0.1 ms on the 2-core project VM: compare wall times
from runs with the default policy).

Page size matters here: flatopt's buffers get transparent huge pages (NumPy asks for them
for allocations of 4 MiB and up), torch's CPU allocator asks only when
``THP_MEM_ALLOC_ENABLE=1`` is set. Measured on a 2-core Xeon (AVX-512, 2 threads), torch's
fused Adam at 2**25 took 43.6 ms of CPU time a step on 4 KiB pages and 36.1 ms on huge
pages. This script sets the variable unless it is set already, for a like-for-like
comparison (``THP_MEM_ALLOC_ENABLE=0`` measures torch's default; the header says which).

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=src python
benchmarks/bench_large.py`` (a few minutes; ``--sizes`` and ``--rounds`` to change).
"""

import argparse
import os
import statistics
import time

# Huge pages for torch's tensors too, unless set otherwise (see above); torch reads the
# variable once, at its first allocation, so it is set before the import.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import flatopt
import flatopt.torch as ft
from flatopt import bench
from flatopt._threads import effective_n_threads

LR = 1e-3
DEFAULT_SIZES = [2**16, 2**20, 2**20 + 3568, 2**23, 2**23 + 3568, 2**25, 2**25 + 3568]


def size_name(n):
    for k in range(40, 0, -1):
        if n >= 2**k and n - 2**k < 2**k:
            return f"2**{k}" if n == 2**k else f"2**{k}+{n - 2**k}"
    return str(n)


def make_impls(n, threads, use_deepspeed):
    """name -> step function, each on its own freshly allocated data of ``n`` elements."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n, dtype=np.float32)
    g0 = (rng.standard_normal(n, dtype=np.float32) * 1e-3)

    def torch_param():
        # torch's allocation, as a model's and autograd's: 64-byte aligned (2 MiB with
        # THP_MEM_ALLOC_ENABLE=1), where a NumPy copy would start 16 bytes into a page.
        p = torch.nn.Parameter(torch.tensor(p0))
        p.grad = torch.tensor(g0)
        return p

    impls = {}
    opt = torch.optim.Adam([torch_param()], lr=LR, fused=True)
    impls["torch fused"] = opt.step
    if use_deepspeed:
        cls = bench.deepspeed_cpu_adam()
        if cls is not None:
            ds = cls([torch_param()], lr=LR, weight_decay=0.0, adamw_mode=False)
            impls["deepspeed"] = ds.step
    fto = ft.Adam([torch_param()], lr=LR, n_threads=threads)
    impls["flatopt.torch"] = fto.step
    fo = flatopt.Adam([p0.copy()], lr=LR, n_threads=threads)
    fo.flat_grads[:] = g0
    impls["flatopt"] = fo.step
    impls["a += b"], ref_bytes = bench.bandwidth_step(4 * n, np.float32, threads)
    impls["adam traffic"] = bench.adam_traffic_step(n, np.float32, threads)[0]
    return impls, {"a += b": ref_bytes}


def measure(impls, rounds, per, cpu_time):
    """Median over rounds of each round's median step time (wall, and CPU if asked)."""
    for step in impls.values():  # warm up: first-touch page faults, state allocation
        for _ in range(3):
            step()
    wall = {k: [] for k in impls}
    cpu = {k: [] for k in impls}
    for _ in range(rounds):
        for name, step in impls.items():
            w, c = [], []
            end = time.perf_counter() + per
            while time.perf_counter() < end or len(w) < 3:
                c0, t0 = time.process_time(), time.perf_counter()
                step()
                w.append(time.perf_counter() - t0)
                c.append(time.process_time() - c0)
            wall[name].append(statistics.median(w))
            cpu[name].append(statistics.median(c))
    med = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    return med(wall), med(cpu)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=lambda s: int(eval(s, {})), default=DEFAULT_SIZES,
                        help="elements; expressions like 2**25+3568 are accepted")
    parser.add_argument("--threads", type=int, default=None, help="default: flatopt.get_num_threads()")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per", type=float, default=0.2, help="seconds per implementation per round")
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument("--cpu-time", action="store_true", help="also report CPU time per step")
    args = parser.parse_args(argv)

    threads = effective_n_threads(args.threads)
    torch.set_num_threads(threads)
    use_ds = not args.no_deepspeed
    print(bench.header(threads, torch, use_ds))  # (with the load at the start)
    print(f"Adam float32, one buffer; median of {args.rounds} interleaved rounds")
    results = []
    for n in args.sizes:
        impls, ref_bytes = make_impls(n, threads, use_ds)
        wall, cpu = measure(impls, args.rounds, args.per, args.cpu_time)
        results.append((n, wall, cpu, ref_bytes))
        del impls
        names = list(wall)
        best = min(wall[k] for k in ("torch fused", "deepspeed") if k in wall)
        ref = wall["a += b"]
        ref_gbps = ref_bytes["a += b"] / ref / 1e9
        gbps = 28 * n / wall["flatopt"] / 1e9
        cols = "".join(f"{k:>15}" for k in names)
        print(f"\n{size_name(n)} ({n:,} elements), ms per step, {threads} thread(s)\n  {'':<6}{cols}"
              f"{'vs best':>9}{'%ref':>7}")
        print(f"  {'wall':<6}" + "".join(f"{wall[k] * 1e3:>15.3f}" for k in names)
              + f"{wall['flatopt'] / best:>8.2f}x{100 * gbps / ref_gbps:>6.0f}%", flush=True)
        ceil = wall["adam traffic"]
        print(f"  {'%ceil':<6}" + "".join(f"{100 * ceil / wall[k]:>14.0f}%" if k != "a += b" else f"{'':>15}"
                                          for k in names), flush=True)
        if args.cpu_time:
            best_cpu = min(cpu[k] for k in ("torch fused", "deepspeed") if k in cpu)
            print(f"  {'cpu':<6}" + "".join(f"{cpu[k] * 1e3:>15.3f}" for k in names)
                  + f"{cpu['flatopt'] / best_cpu:>8.2f}x", flush=True)
    load = bench.machine_load()
    if load is not None:
        print(f"\nload average {load[0]:.2f} at the end")
        if bench.busy_note(load):
            print(bench.busy_note(load))
    return results


if __name__ == "__main__":
    main()

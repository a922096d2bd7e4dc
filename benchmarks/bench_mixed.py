"""Mixed-precision Adam step: flatopt (16-bit params, float32 master) against torch.

For each case (one tensor of 2**20 or 2**23 elements, or the 168-tensor transformer of
``flatopt.bench`` at ``--widths``) and 16-bit format (bf16, fp16) every implementation
steps its own data:

* ``torch``:   what a torch user does today, path (a) of issue 13:
  ``torch.optim.Adam(fused=True)`` on float32 masters whose ``.grad`` is the 16-bit
  gradient upcast (``_foreach_copy_``), then the 16-bit params copied from the masters;
* ``deepspeed``: the same with DeepSpeed's ``DeepSpeedCPUAdam`` (ZeRO-Offload's host
  optimizer) as the float32 step, when ``deepspeed`` is importable (its own 16-bit path
  keeps no float32 master: not this update), so the upcast and the 16-bit copy are
  separate passes there too;
* ``flatopt``: ``flatopt.Adam(params16, master_dtype=np.float32)``: one pass (the Adam
  kernel widens 1024 gradients at a time on its stack and narrows the updated master
  values into the 16-bit params in the same loop: ``kernels.HalfGrads``);
* ``flatopt.torch``: ``flatopt.torch.Adam(params16, master_dtype=torch.float32)`` with
  ``p.grad`` the 16-bit gradients (read where they are);
* ``flatopt fp32``: ``flatopt.Adam`` on float32 params (no 16-bit copy), for reference;
* ``a += b``: the streaming reference (28 bytes an element moved, as a fused mixed step).

Bytes an element: the mixed step reads the 16-bit grad (2), master (4) and moments (8) and
writes master and moments (12) and the 16-bit param (2): 28. Path (a) moves about 40
(upcast: read 2, write 4; fused Adam: 28 with a float32 grad; copy back: read 4, write 2).
``GB/s`` is 28 bytes an element over the step time for every column, so it compares the
columns' speed, not their own traffic; ``of a+=b`` is that figure over the reference's.

The implementations take turns in rounds (each runs for ``--per`` seconds, steps timed one
by one, that round's median kept); the table shows the median over ``--rounds`` rounds.
The project machine is shared and noisy: read the ratios, not the absolute times.

Run: ``PYTHONPATH=src python benchmarks/bench_mixed.py [--sizes 1048576 8388608]
[--widths 128] [--threads 2]``.
"""

import argparse
import os
import statistics
import sys
import time

# Huge pages for torch's tensors too, as flatopt's buffers get them (see bench_large.py);
# torch reads the variable at its first allocation, so it is set before the import.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import flatopt  # noqa: E402
import flatopt.torch as ft  # noqa: E402
from flatopt._threads import effective_n_threads  # noqa: E402
from flatopt.bench import bandwidth_step, busy_note, deepspeed_cpu_adam, header, transformer_shapes

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

BYTES_MIXED = 28
LR = 1e-3


def formats():
    out = [("fp16", np.float16, torch.float16)]
    if ml_dtypes is not None:
        out.insert(0, ("bf16", ml_dtypes.bfloat16, torch.bfloat16))
    return out


def _float32_path(opt, masters, params16, grads16):
    """Path (a): upcast the 16-bit gradients, a float32 step, copy the masters back."""
    def step():
        torch._foreach_copy_([m.grad for m in masters], grads16)
        opt.step()
        torch._foreach_copy_(params16, masters)
    return step


def make_impls(shapes, np16, t16, threads, use_deepspeed):
    rng = np.random.default_rng(0)
    # Values the 16-bit format holds: every path's masters start from the same numbers.
    p32 = [torch.from_numpy(rng.standard_normal(s, dtype=np.float32)).to(t16).float().numpy()
           for s in shapes]
    g32 = [rng.standard_normal(s, dtype=np.float32) * 1e-3 for s in shapes]
    grads16 = [torch.from_numpy(g).to(t16) for g in g32]
    impls = {}

    def masters():
        ms = [torch.from_numpy(p.copy()) for p in p32]
        for m in ms:
            m.grad = torch.zeros_like(m)
        return ms, [m.to(t16) for m in ms]

    ms, ps = masters()
    impls["torch"] = _float32_path(torch.optim.Adam(ms, lr=LR, fused=True), ms, ps, grads16)
    cls = deepspeed_cpu_adam() if use_deepspeed else None
    if cls is not None:
        ms, ps = masters()
        try:
            impls["deepspeed"] = _float32_path(cls(ms, lr=LR, weight_decay=0.0, adamw_mode=False),
                                               ms, ps, grads16)
        except Exception as exc:  # the op failed to build: leave the row out
            print(f"DeepSpeed CPU Adam unavailable ({type(exc).__name__}: {exc})", file=sys.stderr)

    fopt = flatopt.Adam([p.astype(np16) for p in p32], lr=LR, master_dtype=np.float32,
                        n_threads=threads)
    for view, g in zip(fopt.grads, g32):
        view[...] = g.astype(np16)
    impls["flatopt"] = fopt.step

    tparams = [torch.nn.Parameter(torch.from_numpy(p).to(t16)) for p in p32]
    topt = ft.Adam(tparams, lr=LR, master_dtype=torch.float32, n_threads=threads)
    for p, g in zip(tparams, grads16):
        p.grad = g
    impls["flatopt.torch"] = topt.step

    f32 = flatopt.Adam([p.copy() for p in p32], lr=LR, n_threads=threads)
    for view, g in zip(f32.grads, g32):
        view[...] = g
    impls["flatopt fp32"] = f32.step

    # The same traffic, 28 bytes an element: a += b moves 3 x 4 bytes per element of its
    # arrays, so two arrays of 28/12 elements per parameter element each
    m = sum(int(np.prod(s)) for s in shapes) * BYTES_MIXED // 12
    impls["a += b"] = bandwidth_step(2 * m, np.float32, threads)[0]
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
    ap.add_argument("--sizes", type=int, nargs="*", default=[2**20, 2**23])
    ap.add_argument("--widths", type=int, nargs="*", default=[128],
                    help="168-tensor transformer cases (width 128: 2.4M elements)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per", type=float, default=0.4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-deepspeed", action="store_true")
    args = ap.parse_args()
    threads = effective_n_threads(args.threads)
    torch.set_num_threads(threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(header(threads, torch, not args.no_deepspeed, numpy_baseline=False))
    print(f"Adam, 16-bit parameters with float32 masters; median of {args.rounds} interleaved "
          f"rounds of {args.per}s")
    print(f"{'case':>12} {'fmt':>4} {'impl':>13} {'ms/step':>9} {'GB/s@28B':>9} {'of a+=b':>8} "
          f"{'vs torch':>9}")
    cases = [(f"{n}", [(n,)]) for n in args.sizes]
    cases += [(f"168t w{w}", transformer_shapes(w)) for w in args.widths]
    for label, shapes in cases:
        n = sum(int(np.prod(s)) for s in shapes)
        for name, np16, t16 in formats():
            impls = make_impls(shapes, np16, t16, threads, not args.no_deepspeed)
            rounds = {k: [] for k in impls}
            for _ in range(args.rounds):
                for k, fn in impls.items():
                    rounds[k].append(measure(fn, args.per))
            med = {k: statistics.median(v) for k, v in rounds.items()}
            for k, t in med.items():
                print(f"{label:>12} {name:>4} {k:>13} {t * 1e3:9.3f} "
                      f"{n * BYTES_MIXED / t / 1e9:9.2f} {med['a += b'] / t:8.2f} "
                      f"{med['torch'] / t:8.2f}x", flush=True)
    if busy_note():
        print(busy_note())


if __name__ == "__main__":
    main()

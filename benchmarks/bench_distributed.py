"""Data-parallel Adam across processes: step time per rank, communication included, and
optimizer-state bytes per rank.

For 1, 2 and 4 processes (gloo over 127.0.0.1, spawned here), two float32 models:

* ``model w128``: the 168-tensor transformer-shaped model of ``python -m flatopt.bench``
  at width 128 (:func:`flatopt.bench.transformer_shapes`, 2.4 M parameters);
* ``flat 2**23``: one tensor of 8.4 M parameters.

Each iteration is ``zero_grad()``, a backward pass of a synthetic loss whose gradient is a
fixed random tensor per parameter (``sum(p * g)``: an elementwise multiply, the same in
every variant), and ``step()``. Variants:

* ``flatopt sharded``: ``ShardedOptimizer(params, flatopt.torch.Adam)``: the flat gradient
  reduced into each rank's slice, the fused kernel on this rank's slice, the flat
  parameters shared back (on gloo: one reduce and one broadcast per rank; no DDP);
* ``DDP + torch fused``: ``DistributedDataParallel`` (its bucketed all-reduce, overlapped
  with the backward pass) and ``torch.optim.Adam(fused=True)`` on every rank;
* ``DDP + ZeRO torch fused``: DDP and ``ZeroRedundancyOptimizer(torch.optim.Adam,
  fused=True)`` (state sharded by whole tensors, parameters broadcast tensor by tensor);
* ``DDP + flatopt.torch``: DDP and ``flatopt.torch.Adam`` on every rank.

Reported per variant: the median iteration time over ``--repeats`` iterations (the
variants take turns, one iteration each, and the ranks start each iteration together
after a barrier; the slowest rank's median is shown), and the optimizer-state bytes each
rank holds (the largest over ranks).

What a machine this size can show: with fewer cores than processes, the processes take
turns on the cores, so times at 2 and 4 processes measure contention as much as the
algorithm; loopback "communication" is memory copies through the kernel's TCP stack, not a
network. State bytes per rank are exact on any machine. Run:
``PYTHONPATH=src python benchmarks/bench_distributed.py`` (a few minutes; ``--quick`` for a
smoke run).
"""

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flatopt.bench import transformer_shapes

LR = 1e-3


class Synthetic(torch.nn.Module):
    """Parameters of the given shapes; ``forward()`` returns ``sum(p * g)`` so that every
    gradient is the fixed tensor ``g``."""

    def __init__(self, shapes, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.params = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes)
        self.g = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]

    def forward(self):
        return sum((p * g).sum() for p, g in zip(self.params, self.g))


def state_nbytes(opt):
    """Bytes of tensors with at least one dimension in an optimizer's state."""
    import flatopt.torch.distributed as fd
    from torch.distributed.optim import ZeroRedundancyOptimizer
    if isinstance(opt, fd.ShardedOptimizer):
        return opt.state_nbytes()
    if isinstance(opt, ZeroRedundancyOptimizer):
        opt = opt.optim
    return sum(v.numel() * v.element_size() for entry in opt.state.values()
               for v in entry.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def variants(world):
    import flatopt.torch as ft
    from flatopt.torch.distributed import ShardedOptimizer
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def ddp(model):
        return torch.nn.parallel.DistributedDataParallel(model)

    return {
        "flatopt sharded": lambda m: (m, ShardedOptimizer(m.parameters(), ft.Adam, lr=LR)),
        "DDP + torch fused": lambda m: (ddp(m), torch.optim.Adam(m.parameters(), lr=LR, fused=True)),
        "DDP + ZeRO torch fused": lambda m: (ddp(m), ZeroRedundancyOptimizer(
            m.parameters(), optimizer_class=torch.optim.Adam, lr=LR, fused=True)),
        "DDP + flatopt.torch": lambda m: (ddp(m), ft.Adam(m.parameters(), lr=LR)),
    }


def child(rank, world, port, cases, repeats, threads, out):
    torch.set_num_threads(threads)
    import flatopt
    flatopt.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    results = []
    for case, shapes in cases:
        # All variants at once, taking turns one iteration each, so that the noise of a
        # shared machine falls evenly on them.
        runs = {}
        for label, make in variants(world).items():
            model = Synthetic(shapes)
            runs[label] = make(model)
        times = {label: [] for label in runs}
        for i in range(repeats + 2):
            for label, (module, opt) in runs.items():
                dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad()
                module().backward()
                opt.step()
                if i >= 2:
                    times[label].append(time.perf_counter() - t0)
        for label, (module, opt) in runs.items():
            results.append((case, label, statistics.median(times[label]), state_nbytes(opt)))
        del runs
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        rows = []
        for k, (case, label, _, _) in enumerate(results):
            rows.append((case, label, max(r[k][2] for r in gathered), max(r[k][3] for r in gathered)))
        torch.save(rows, out)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--flat-log2", type=int, default=23)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per process (default: cores // processes, at least 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.flat_log2, args.repeats = 16, 14, 3
    cases = [(f"model w{args.width} ({len(transformer_shapes(args.width))} tensors)", transformer_shapes(args.width)),
             (f"flat 2**{args.flat_log2}", [(2 ** args.flat_log2,)])]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", load average {:.1f}".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
    print(f"Adam float32, gloo on 127.0.0.1, {cores} cores{load}, torch {torch.__version__}; "
          "ms per iteration (zero_grad + backward + step, communication included), slowest rank")
    print(f"{'case':<26} {'procs':>5} {'threads':>7}  {'variant':<24} {'ms/iter':>8} {'state MiB/rank':>15}")
    import tempfile
    for world in args.worlds:
        threads = args.threads or max(1, cores // world)
        out = os.path.join(tempfile.mkdtemp(), "rows.pt")
        mp.start_processes(child, args=(world, free_port(), cases, args.repeats, threads, out),
                           nprocs=world, start_method="spawn")
        for case, label, seconds, nbytes in torch.load(out):
            print(f"{case:<26} {world:>5} {threads:>7}  {label:<24} {seconds * 1e3:8.2f} {nbytes / 2**20:15.1f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

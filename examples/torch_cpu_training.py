"""Train a small classifier on the CPU with torch.optim and with flatopt.torch, side by side.

The data is scikit-learn's bundled handwritten-digits set (1797 8x8 images, 10 classes),
which ships inside the scikit-learn package: nothing is downloaded. Requires
``pip install scikit-learn torch``.

Three runs start from the same weights and see the same mini-batches: torch.optim's
default CPU implementation (a for-loop over tensors), torch.optim with ``fused=True``, and
flatopt.torch. The optimizer is Adam when flatopt.torch has Adam, otherwise SGD with
Nesterov momentum (``--optimizer`` picks). Each run is repeated ``--repeats`` times, the
runs taking turns (the order rotates every repeat), because a whole training run varies by
a few percent from one try to the next on a shared machine. For each run the script
prints the median time of ``optimizer.step()`` over every step of every repeat, the median
and range of the whole training time, the final training loss, the test accuracy, and how
far its losses drift from the for-loop run's; then what flatopt.torch saved against
torch's fused run, in step time and in all, and its whole-run time over torch's fused run's
repeat by repeat (the two run next to each other in every repeat). In float64
flatopt.torch follows the for-loop run to ~1e-14; in float32 any two implementations
(torch's own two included) round differently and their trajectories drift apart over
training.

Run: ``python examples/torch_cpu_training.py`` (about 10 s). ``--threads N`` sets both
torch's and flatopt's thread count; on a machine busy with other work, ``--threads 1``
avoids OpenMP threads waiting on each other, which can slow every run tenfold.
"""

import argparse
import copy
import statistics
import time

import numpy as np
import torch

import flatopt.torch as ft

try:
    from sklearn.datasets import load_digits
except ImportError:  # pragma: no cover - a clear message instead of a traceback
    raise SystemExit("this example needs scikit-learn for its bundled digits data: pip install scikit-learn")

OPTIMIZERS = {
    "Adam": dict(lr=2e-3),
    "SGD": dict(lr=0.02, momentum=0.9, nesterov=True),
}


def load_data(dtype, seed=0):
    """Digits scaled to [0, 1], split 80/20 with a fixed shuffle."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=dtype)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def make_model(width, depth, dtype, seed=0):
    torch.manual_seed(seed)
    layers, n_in = [], 64
    for _ in range(depth):
        layers += [torch.nn.Linear(n_in, width), torch.nn.LayerNorm(width), torch.nn.GELU()]
        n_in = width
    layers.append(torch.nn.Linear(n_in, 10))
    return torch.nn.Sequential(*layers).to(dtype)


def train(model, opt, train_data, epochs, batch_size, seed=1):
    """Mini-batch training; returns (per-step losses, step() times, wall time)."""
    x, y = train_data
    g = torch.Generator().manual_seed(seed)
    losses, step_times = [], []
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            t0 = time.perf_counter()
            opt.step()
            step_times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    return np.array(losses), step_times, time.perf_counter() - start


@torch.no_grad()
def accuracy(model, data):
    x, y = data
    return (model(x).argmax(1) == y).double().mean().item()


def main(argv=None):
    """Run the comparison; returns ``{label: {"losses", "step_s", "step_ms", "train_s",
    "test_accuracy"}}`` (``train_s``: one whole-run time per repeat; ``step_s``: every step()
    time of every repeat, ``step_ms`` their median; losses and accuracy from the first
    repeat); flatopt.torch's entry also has ``paired_ratio``, the median over repeats of
    its whole-run time over torch's fused run's in the same repeat."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=None)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="training runs per optimizer (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    name = args.optimizer or ("Adam" if hasattr(ft, "Adam") else "SGD")
    kwargs = OPTIMIZERS[name]
    dtype = getattr(torch, args.dtype)
    train_data, test_data = load_data(dtype)
    model = make_model(args.width, args.depth, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"digits: {len(train_data[0])} train / {len(test_data[0])} test images; MLP with "
          f"{len(list(model.parameters()))} tensors, {n_params:,} {args.dtype} parameters; "
          f"{name}{kwargs}, {args.epochs} epochs, batch {args.batch_size}, {threads} thread(s), "
          f"{args.repeats} repeat(s)")

    loop, fused, flat = (f"torch.optim.{name}", f"torch.optim.{name}(fused=True)", f"flatopt.torch.{name}")
    makers = {
        loop: lambda m: getattr(torch.optim, name)(m.parameters(), **kwargs, foreach=False),
        fused: lambda m: getattr(torch.optim, name)(m.parameters(), **kwargs, fused=True),
        flat: lambda m: getattr(ft, name)(m.parameters(), **kwargs, n_threads=threads),
    }
    for make in makers.values():  # first-use costs (thread pools, allocator, torch's fused
        warm = copy.deepcopy(model)  # kernel: 2 ms its first step) out of the timings
        train(warm, make(warm), train_data, 1, args.batch_size)
    results = {label: {"train_s": [], "step_s": []} for label in makers}
    for r in range(args.repeats):
        # fused and flatopt.torch side by side in every repeat, each first in every other one
        for label in ([loop, fused, flat] if r % 2 == 0 else [flat, fused, loop]):
            m = copy.deepcopy(model)
            losses, step_times, wall = train(m, makers[label](m), train_data, args.epochs, args.batch_size)
            results[label]["train_s"].append(wall)
            # All repeats, not the first alone: a burst of load during one run would
            # otherwise set the step time of that optimizer.
            results[label]["step_s"] += step_times
            if r == 0:
                results[label].update(losses=losses, test_accuracy=accuracy(m, test_data))
    for res in results.values():
        res["step_ms"] = statistics.median(res["step_s"]) * 1e3
    print(f"{'optimizer':<32} {'step() ms':>10} {'train s (range)':>20} {'final loss':>11} "
          f"{'test acc':>9} {'max |loss - loop loss|':>23}")
    last_epoch = -(-len(train_data[0]) // args.batch_size)
    for label, res in results.items():
        walls = res["train_s"]
        drift = np.abs(res["losses"] - results[loop]["losses"]).max()
        print(f"{label:<32} {res['step_ms']:10.3f} {statistics.median(walls):8.3f} "
              f"({min(walls):.3f}-{max(walls):.3f}) {res['losses'][-last_epoch:].mean():11.5f} "
              f"{res['test_accuracy']:9.4f} {drift:23.2e}")
    steps = len(results[flat]["losses"])
    step_saving = (results[fused]["step_ms"] - results[flat]["step_ms"]) * steps / 1e3
    saving = statistics.median(results[fused]["train_s"]) - statistics.median(results[flat]["train_s"])
    print(f"flatopt.torch against torch's fused run: {steps} steps, step() medians save "
          f"{step_saving:.3f} s; whole-run medians save {saving:.3f} s")
    # The two ran next to each other in every repeat: their ratio repeat by repeat is
    # what a machine whose speed drifts from minute to minute distorts least.
    ratios = [a / b for a, b in zip(results[flat]["train_s"], results[fused]["train_s"])]
    paired = results[flat]["paired_ratio"] = statistics.median(ratios)
    print(f"repeat by repeat, flatopt.torch took {min(ratios):.2f}-{max(ratios):.2f}x the time of "
          f"torch's fused run (median {paired:.2f}x)")
    return results


if __name__ == "__main__":
    main()

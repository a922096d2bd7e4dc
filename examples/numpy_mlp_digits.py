"""Train a small MLP on handwritten digits in pure NumPy, with flatopt's optimizers.

No deep-learning framework: the forward and backward passes are written out below, and
the backward pass writes each gradient straight into the optimizer's gradient views
(``opt.grads``) with ``out=``, so ``opt.step()`` reads them where they already are and
updates every weight and bias in one fused kernel call.

The data is scikit-learn's bundled digits set (1797 8x8 images, 10 classes), which ships
inside the scikit-learn package: nothing is downloaded (``pip install scikit-learn``).

Three runs start from the same weights and see the same mini-batches: SGD (with Nesterov
momentum), textbook Momentum and Adam. For each the script prints the training loss and
test accuracy per epoch, then a summary with the median time of ``opt.step()``.

Run: ``python examples/numpy_mlp_digits.py`` (a few seconds). ``--epochs 3`` gives a short
run, ``--plot losses.png`` saves the loss curves (needs matplotlib), ``--help`` lists the
options. This model has about 10k parameters, a step of a few microseconds: on a machine
busy with other work, ``--threads 1`` keeps OpenMP threads from waiting on each other,
which can make such a small step a thousand times slower.
"""

import argparse
import statistics
import sys
import time

import numpy as np

import flatopt

# Learning rates picked for this model and data; every other argument is the default.
OPTIMIZERS = {
    "SGD": (flatopt.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "Momentum": (flatopt.Momentum, dict(lr=0.5, beta=0.9)),
    "Adam": (flatopt.Adam, dict(lr=2e-3)),
}


def load_data(dtype, seed=0):
    """Digits scaled to [0, 1], split 80/20 with a fixed shuffle: (x, y) train and test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("this example needs scikit-learn for its bundled digits data: "
                         "pip install scikit-learn") from None
    digits = load_digits()
    x = (digits.data / 16.0).astype(dtype)
    y = digits.target.astype(np.intp)
    order = np.random.default_rng(seed).permutation(len(x))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return (x[train], y[train]), (x[test], y[test])


def init_params(n_in, hidden, n_out, dtype, seed=0):
    """He-initialised weights and zero biases: [W1, b1, W2, b2]."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((n_in, hidden)) * np.sqrt(2.0 / n_in)
    w2 = rng.standard_normal((hidden, n_out)) * np.sqrt(2.0 / hidden)
    return [w1.astype(dtype), np.zeros(hidden, dtype), w2.astype(dtype), np.zeros(n_out, dtype)]


def forward(params, x):
    """Logits and the hidden activations (kept for the backward pass)."""
    w1, b1, w2, b2 = params
    h = x @ w1
    h += b1
    np.maximum(h, 0, out=h)  # ReLU
    logits = h @ w2
    logits += b2
    return logits, h


def softmax_cross_entropy(logits, y):
    """Mean cross-entropy loss and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(z)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(np.mean(np.log(total[:, 0]) - z[rows, y]))
    dlogits = exp / total
    dlogits[rows, y] -= 1
    dlogits /= len(y)
    return loss, dlogits


def backward(params, grads, x, h, dlogits):
    """Write the gradients of the loss into ``grads`` (the optimizer's views) in place."""
    _, _, w2, _ = params
    gw1, gb1, gw2, gb2 = grads
    np.matmul(h.T, dlogits, out=gw2)
    np.sum(dlogits, axis=0, out=gb2)
    dh = dlogits @ w2.T
    dh *= h > 0  # ReLU'
    np.matmul(x.T, dh, out=gw1)
    np.sum(dh, axis=0, out=gb1)


def accuracy(params, data):
    x, y = data
    logits, _ = forward(params, x)
    return float(np.mean(logits.argmax(axis=1) == y))


def train(name, train_data, test_data, *, epochs, batch_size, hidden, dtype, seed=0,
          n_threads=None, verbose=True):
    """Train one model with optimizer ``name``; return its history and step times."""
    opt_class, kwargs = OPTIMIZERS[name]
    x, y = train_data
    # The optimizer copies the initial values into its flat buffer once; from then on the
    # model must use opt.params (views of that buffer), and write its gradients into
    # opt.grads (views of opt.flat_grads).
    opt = opt_class(init_params(x.shape[1], hidden, 10, dtype, seed), **kwargs,
                    n_threads=n_threads)
    params, grads = opt.params, opt.grads
    rng = np.random.default_rng(seed + 1)  # the same mini-batches for every optimizer
    history = {"loss": [], "test_accuracy": []}
    step_times = []
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        losses = []
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            xb = x[idx]
            logits, h = forward(params, xb)
            loss, dlogits = softmax_cross_entropy(logits, y[idx])
            backward(params, grads, xb, h, dlogits)  # every gradient is overwritten
            t0 = time.perf_counter()
            opt.step()  # one fused kernel call over W1, b1, W2, b2
            step_times.append(time.perf_counter() - t0)
            losses.append(loss)
        history["loss"].append(float(np.mean(losses)))
        history["test_accuracy"].append(accuracy(params, test_data))
        if verbose:
            print(f"  {name:<9} epoch {epoch + 1:3d}: train loss {history['loss'][-1]:.4f}, "
                  f"test accuracy {history['test_accuracy'][-1]:.3f}")
    history["step_us"] = statistics.median(step_times) * 1e6 if step_times else float("nan")
    history["n_params"] = opt.layout.size
    return history


def plot(results, path):
    """Save the per-epoch training loss of every run to ``path``; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); no plot saved", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, history in results.items():
        epochs = range(1, len(history["loss"]) + 1)
        ax.plot(epochs, history["loss"], marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss")
    ax.set_yscale("log")
    ax.set_title("MLP on digits, pure NumPy + flatopt")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"loss curves saved to {path}")
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128, help="hidden layer width")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS),
                        default=list(OPTIMIZERS))
    parser.add_argument("--threads", type=int, default=None,
                        help="flatopt's thread count (default: flatopt.get_num_threads())")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PATH", help="save the loss curves (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.hidden < 1:
        parser.error("--epochs, --batch-size and --hidden must be positive")

    dtype = np.dtype(args.dtype)
    train_data, test_data = load_data(dtype, args.seed)
    threads = args.threads or flatopt.get_num_threads()
    print(f"digits: {len(train_data[0])} train / {len(test_data[0])} test images; "
          f"MLP 64-{args.hidden}-10, {dtype.name}, {args.epochs} epochs, batch "
          f"{args.batch_size}, {threads} flatopt thread(s)")
    results = {}
    for name in args.optimizers:
        results[name] = train(name, train_data, test_data, epochs=args.epochs,
                              batch_size=args.batch_size, hidden=args.hidden, dtype=dtype,
                              seed=args.seed, n_threads=args.threads, verbose=not args.quiet)

    print(f"\n{'optimizer':<10} {'hyperparameters':<40} {'final loss':>10} "
          f"{'test acc':>9} {'step() us':>10}")
    for name, history in results.items():
        hyper = ", ".join(f"{k}={v}" for k, v in OPTIMIZERS[name][1].items())
        print(f"{name:<10} {hyper:<40} {history['loss'][-1]:10.4f} "
              f"{history['test_accuracy'][-1]:9.3f} {history['step_us']:10.1f}")
    n_params = next(iter(results.values()))["n_params"]
    print(f"({n_params:,} parameters in 4 arrays, one flat buffer: one kernel call per step)")
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()

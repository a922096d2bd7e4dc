"""A fixed optimizer trajectory, to compare builds bit for bit across CPUs and platforms.

Every optimizer (each with a few option sets), both dtypes and float16 parameters with a
float32 master, odd sizes on either side of the parallel threshold, 1 and 2 threads: a
few steps from a fixed seed, with a gradient clip on every other step (the norm
kernels), and the final parameters, master and state saved.
The kernels are built with ``-ffp-contract=off`` and IEEE operations only, so every ISA
level (baseline, avx2, avx512) and every platform (x86-64, aarch64) must give the same
bits. ``.ci/run`` saves the trajectory natively, then checks it under emulated CPUs
(``qemu-x86_64 -cpu Nehalem-v2`` and ``Haswell-v4``) and on emulated aarch64::

    python tests/trajectory.py save native.npz
    qemu-x86_64 -cpu Haswell-v4 "$(command -v python)" tests/trajectory.py check native.npz

It needs only NumPy and flatopt, so it runs where pytest or torch would be too slow.
"""

import argparse
import sys
import zlib

import numpy as np

import flatopt
import flatopt.keras

# (name, class in flatopt, keyword arguments): every optimizer, torch's formulas and Keras's,
# with the options that change its kernel.
CASES = [
    ("sgd", "SGD", dict(lr=0.01)),
    ("sgd-momentum-wd", "SGD", dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("sgd-nesterov-max", "SGD", dict(lr=0.01, momentum=0.9, nesterov=True, maximize=True)),
    ("momentum", "Momentum", dict(lr=0.01, beta=0.9, weight_decay=0.01)),
    ("adam", "Adam", dict(lr=0.01, weight_decay=0.01)),
    ("adam-amsgrad", "Adam", dict(lr=0.01, amsgrad=True)),
    ("adamw", "AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("rmsprop", "RMSprop", dict(lr=0.01)),
    ("rmsprop-centered", "RMSprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)),
    ("adadelta", "Adadelta", dict(lr=1.0, weight_decay=0.01)),
    ("adagrad", "Adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    ("nadam", "NAdam", dict(lr=0.01, weight_decay=0.01, momentum_decay=0.01)),
    ("nadam-decoupled", "NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("radam", "RAdam", dict(lr=0.01, weight_decay=0.01)),
    ("radam-decoupled", "RAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("adamax", "Adamax", dict(lr=0.01, weight_decay=0.01)),
    ("lion", "Lion", dict(lr=0.01, weight_decay=0.1)),
    ("keras-sgd", "keras.SGD", dict(learning_rate=0.01, momentum=0.9, nesterov=True,
                                    weight_decay=0.01)),
    ("keras-adam", "keras.Adam", dict(learning_rate=0.01, amsgrad=True)),
    ("keras-adamw", "keras.AdamW", dict(learning_rate=0.01)),
    ("keras-rmsprop", "keras.RMSprop", dict(learning_rate=0.01, momentum=0.9, centered=True)),
    ("keras-adadelta", "keras.Adadelta", dict(learning_rate=1.0, weight_decay=0.01)),
    ("keras-adagrad", "keras.Adagrad", dict(learning_rate=0.1)),
    ("keras-adamax", "keras.Adamax", dict(learning_rate=0.01)),
    ("keras-nadam", "keras.Nadam", dict(learning_rate=0.01)),
    ("keras-lion", "keras.Lion", dict(learning_rate=0.01, weight_decay=0.1)),
]
# float16: 16-bit parameters with a float32 master (widen, float32 step, narrow).
DTYPES = (np.float32, np.float64, np.float16)
SIZES = (1, 7, 4097, 3 * 4096 + 5, 2**15 + 3)
THREADS = (1, 2)
STEPS = 4


def _class(dotted):
    obj = flatopt
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def trajectories():
    """{key: array}: the final params and state of every case, dtype, size and thread count."""
    out = {}
    for name, cls, kwargs in CASES:
        for dtype in DTYPES:
            for n in SIZES:
                for n_threads in THREADS:
                    key = f"{name}/{np.dtype(dtype).name}/n{n}/t{n_threads}"
                    rng = np.random.default_rng(zlib.crc32(key.encode()))
                    params = [rng.standard_normal(n).astype(dtype), rng.standard_normal(3).astype(dtype)]
                    mixed = dict(master_dtype=np.float32) if dtype == np.float16 else {}
                    opt = _class(cls)(params, n_threads=n_threads, **mixed, **kwargs)
                    for step in range(STEPS):
                        opt.flat_grads[...] = rng.standard_normal(opt.flat_grads.size)
                        if step % 2:
                            opt.clip_grad_norm_(0.5 * np.sqrt(n))
                        opt.step()
                    out[f"{key}/params"] = opt.flat_params.copy()
                    if opt.master_params is not None:
                        out[f"{key}/master"] = opt.master_params.copy()
                    for sname, value in opt.state.items():
                        if isinstance(value, np.ndarray):
                            out[f"{key}/{sname}"] = value.copy()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["save", "check"])
    parser.add_argument("path")
    args = parser.parse_args(argv)
    info = flatopt.build_info()
    where = f"isa={info['isa']} platform={info['platform']} openmp={info['openmp']}"
    got = trajectories()
    if args.mode == "save":
        np.savez(args.path, **got)
        print(f"trajectory: saved {len(got)} arrays ({where})")
        return 0
    with np.load(args.path) as saved:
        want = {k: saved[k] for k in saved.files}
    if sorted(got) != sorted(want):
        print(f"trajectory: key sets differ: {sorted(set(got) ^ set(want))[:5]}")
        return 1
    bad = [k for k in got if got[k].dtype != want[k].dtype
           or got[k].tobytes() != want[k].tobytes()]
    if bad:
        print(f"trajectory: {len(bad)} of {len(got)} arrays differ ({where}), e.g. {bad[:5]}")
        return 1
    print(f"trajectory: {len(got)} arrays bit-identical ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

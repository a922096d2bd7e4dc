"""examples/numpy_mlp_digits.py: the pure-NumPy MLP learns, with every optimizer it shows.

Runs a short training (3 epochs, one thread) in this process and checks that each run
learns: test accuracy far above chance (0.1) and an epoch loss that falls every epoch.
A second test runs the script as a user does, with ``--plot``. Both skip without
scikit-learn (the digits data ships with it) and when the examples are not beside the
tests (the installed-wheel runs copy only tests/).
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import example_module

import flatopt

pytest.importorskip("sklearn", reason="the example's digits data ships with scikit-learn")

EXAMPLE, pytestmark, load_example = example_module("numpy_mlp_digits")
SRC = os.path.abspath(os.path.join(os.path.dirname(flatopt.__file__), os.pardir))


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module")
def short_run(example):
    return example.main(["--epochs", "3", "--threads", "1", "--quiet"])


def test_every_optimizer_learns(short_run, example):
    assert list(short_run) == list(example.OPTIMIZERS) == ["SGD", "Momentum", "Adam"]
    for name, history in short_run.items():
        loss, acc = np.array(history["loss"]), history["test_accuracy"]
        assert len(loss) == len(acc) == 3
        assert np.all(np.isfinite(loss)), (name, loss)
        assert np.all(np.diff(loss) < 0), f"{name}: epoch loss did not fall every epoch: {loss}"
        assert loss[-1] < 0.5 * loss[0], f"{name}: loss fell too little: {loss}"
        assert acc[-1] >= 0.85, f"{name}: test accuracy {acc[-1]:.3f} (chance is 0.1)"
        assert history["step_us"] > 0


def test_untrained_model_is_at_chance(example):
    """The control for the test above: the initial weights are at chance level, so an
    accuracy of 0.85 after training is learned, not inherited from the initialisation."""
    _, test_data = example.load_data(np.float32)
    params = example.init_params(64, 128, 10, np.float32)
    assert example.accuracy(params, test_data) < 0.3


def test_backward_matches_finite_differences(example):
    """The hand-written backward pass is the gradient of the loss it reports (float64)."""
    rng = np.random.default_rng(3)
    x, y = rng.random((5, 64)), rng.integers(0, 10, 5)
    params = example.init_params(64, 8, 10, np.float64, seed=1)
    grads = [np.empty_like(p) for p in params]
    logits, h = example.forward(params, x)
    _, dlogits = example.softmax_cross_entropy(logits, y)
    example.backward(params, grads, x, h, dlogits)
    eps = 1e-6
    for p, g in zip(params, grads):
        for index in [(0,) * p.ndim, tuple(s - 1 for s in p.shape)]:
            saved = p[index]
            p[index] = saved + eps
            up = example.softmax_cross_entropy(example.forward(params, x)[0], y)[0]
            p[index] = saved - eps
            down = example.softmax_cross_entropy(example.forward(params, x)[0], y)[0]
            p[index] = saved
            assert g[index] == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_script_runs_as_documented(tmp_path):
    plot = tmp_path / "losses.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--epochs", "1", "--threads", "1",
                           "--optimizers", "Adam", "--plot", str(plot)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "test acc" in proc.stdout and "Adam" in proc.stdout
    if importlib.util.find_spec("matplotlib") is None:
        assert "--plot needs matplotlib" in proc.stderr
    else:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

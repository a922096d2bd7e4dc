"""User-style code over flatopt's public NumPy API, type-checked by mypy in strict mode.

``python -m mypy --strict tests/typing`` must pass (tests/typing/test_mypy.py runs it).
It is also run as a script by that test, so every line here is real, working usage, and
each ``assert_type`` states a type the annotations promise.

Names whose modules are not annotated yet (the optimizers, ``flatten``, ``FlatLayout``,
``flatopt.functional``) are typed ``Any`` for now; see ``[tool.mypy]`` in pyproject.toml.
"""

import io
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import numpy.typing as npt

import flatopt
import flatopt.functional

if sys.version_info >= (3, 11):
    from typing import assert_type
else:
    from typing_extensions import assert_type


def make_params(seed: int) -> list[npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((8, 4)).astype(np.float32), np.zeros(4, np.float32)]


def threads() -> None:
    assert_type(flatopt.get_num_threads(), int)
    assert_type(flatopt.openmp_enabled(), bool)
    previous = flatopt.set_num_threads(1)
    assert_type(previous, "int | None")
    flatopt.set_num_threads(None)
    flatopt.set_num_threads(previous)
    block = flatopt.num_threads(1)
    assert isinstance(block, AbstractContextManager)
    with block:
        n: int = flatopt.get_num_threads()
        assert n == 1


def config() -> None:
    info = flatopt.build_info()
    assert_type(info, dict[str, Any])
    version: str = flatopt.__version__
    assert info["version"] == version
    out = io.StringIO()
    assert_type(flatopt.show_config(out), None)
    assert "openmp" in out.getvalue()


def train(make: Callable[[list[npt.NDArray[np.float32]]], flatopt.Optimizer]) -> float:
    """A few steps on a quadratic through the optimizer's own views; the final loss."""
    opt = make(make_params(0))
    w, b = opt.params
    gw, gb = opt.grads
    loss = float("inf")
    for _ in range(5):
        loss = float((w**2).sum() + (b**2).sum())
        np.multiply(w, 2, out=gw)
        np.multiply(b, 2, out=gb)
        norm: float = opt.clip_grad_norm_(10.0)
        assert norm >= 0
        opt.step()
        opt.zero_grad()
    return loss


def optimizers() -> None:
    losses = [
        train(lambda p: flatopt.SGD(p, lr=0.1, momentum=0.9)),
        train(lambda p: flatopt.Momentum(p, lr=0.1)),
        train(lambda p: flatopt.Adam(p, lr=0.1)),
        train(lambda p: flatopt.AdamW(p, lr=0.1)),
        train(lambda p: flatopt.RMSprop(p, lr=0.01)),
        train(lambda p: flatopt.Adagrad(p, lr=0.1)),
        train(flatopt.Adadelta),
    ]
    assert all(np.isfinite(losses))


def flat_buffers() -> None:
    flat, views = flatopt.flatten(make_params(1))
    layout = flatopt.FlatLayout.from_arrays(views)
    assert layout.size == flat.size
    opt = flatopt.Adam(views, lr=1e-3)  # adopts ``flat`` without a copy
    state = opt.state_dict()
    opt.load_state_dict(state)
    grad_norm: float = opt.grad_norm()
    assert grad_norm == 0.0


def functional() -> None:
    param = np.ones(16, np.float64)
    grad = np.full(16, 0.5)
    exp_avg, exp_avg_sq = np.zeros(16), np.zeros(16)
    flatopt.functional.adam_(param, grad, exp_avg, exp_avg_sq, step=1, lr=1e-3, beta1=0.9,
                             beta2=0.999, eps=1e-8)
    assert flatopt.functional.count_nonfinite(param) == 0


if __name__ == "__main__":
    threads()
    config()
    optimizers()
    flat_buffers()
    functional()
    print("ok")

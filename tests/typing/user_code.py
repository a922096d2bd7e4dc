"""User-style code over flatopt's public NumPy API, type-checked by mypy in strict mode.

``python -m mypy --strict tests/typing`` must pass (tests/typing/test_mypy.py runs it).
It is also run as a script by that test, so every line here is real, working usage, and
each ``assert_type`` states a type the annotations promise.

It covers the thread and configuration functions, the optimizers (constructors with their
hyperparameters, ``step``, ``zero_grad``, ``grad_norm``, ``clip_grad_norm_``, the buffer
properties and a ``state_dict`` round trip, mixed precision), ``flatopt.keras``,
``flatten`` / ``FlatLayout`` and ``flatopt.functional``. ``flatopt.torch`` (torch is
optional) has its own file, ``user_code_torch.py``; ``flatopt.bench`` is not annotated;
see ``[tool.mypy]`` in pyproject.toml for what is checked how.
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
import flatopt.keras

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


class InverseTime(flatopt.keras.LearningRateSchedule):
    """A step-dependent learning rate without Keras."""

    def __call__(self, step: int) -> float:
        return 0.1 / (1 + step)


def more_optimizers() -> None:
    """The Adam variants, parameter groups, and the keras-style classes (with a schedule)."""
    w, b = make_params(2)
    for opt in (flatopt.NAdam([w, b], lr=1e-3), flatopt.RAdam([w, b], lr=1e-3),
                flatopt.Adamax([w, b]), flatopt.Lion([w, b], betas=(0.9, 0.99))):
        assert_type(opt.step(), bool)
    groups = flatopt.SGD([{"params": [w]}, {"params": [b], "lr": 0.01}], lr=0.1, momentum=0.9)
    assert groups.param_groups[1]["lr"] == 0.01
    keras_sgd = flatopt.keras.SGD([w, b], learning_rate=InverseTime())
    keras_sgd.step()
    keras_sgd.learning_rate = lambda: 0.05  # Keras's attribute; a callable of no arguments
    assert_type(keras_sgd.iterations, int)
    keras_adam = flatopt.keras.Adam([w, b], learning_rate=1e-3, weight_decay=None)
    assert keras_adam.step(skip_if_nonfinite=True)


def optimizer_api() -> None:
    """The buffers, the step variants and a state_dict round trip, as annotated."""
    opt = flatopt.Adam(make_params(3), lr=1e-3, betas=(0.9, 0.99), n_threads=1,
                       dtype=np.float64)
    assert_type(opt.params, list[npt.NDArray[np.floating[Any]]])
    assert_type(opt.grads, list[npt.NDArray[np.floating[Any]]])
    assert_type(opt.flat_params, npt.NDArray[np.floating[Any]])
    assert_type(opt.flat_grads, npt.NDArray[np.floating[Any]])
    assert_type(opt.master_params, "npt.NDArray[np.floating[Any]] | None")
    assert_type(opt.state, dict[str, Any])
    assert_type(opt.param_groups, list[dict[str, Any]])
    assert_type(opt.adopted, bool)
    assert_type(opt.skipped_steps, int)
    assert opt.flat_params.dtype == np.float64 and not opt.adopted
    opt.flat_grads[:] = 1.0
    assert_type(opt.step(), bool)
    assert opt.step(opt.flat_grads.copy(), grad_scale=0.5)        # one flat array
    assert opt.step([np.ones_like(g) for g in opt.grads])         # one array per parameter
    opt.flat_grads[0] = np.nan
    assert not opt.step(skip_if_nonfinite=True) and opt.skipped_steps == 1
    opt.zero_grad(set_to_none=True)
    norm = opt.grad_norm(norm_type=2.0)
    assert_type(norm, float)
    state = opt.state_dict()
    assert_type(state, dict[str, Any])
    again = flatopt.Adam(make_params(3), lr=1e-3, dtype=np.float64)
    assert_type(again.load_state_dict(state), None)
    assert again.state["step"] == opt.state["step"] == 3
    half = flatopt.SGD([np.ones(8, np.float16)], lr=0.1, master_dtype=np.float32)
    assert half.master_params is not None and half.master_params.dtype == np.float32


def flat_buffers() -> None:
    flat, views = flatopt.flatten(make_params(1))
    assert_type(flat, npt.NDArray[np.floating[Any]])
    assert_type(views, list[npt.NDArray[np.floating[Any]]])
    layout = flatopt.FlatLayout.from_arrays(views)
    assert_type(layout, flatopt.FlatLayout)
    assert_type(layout.size, int)
    assert_type(layout.shapes, tuple[tuple[int, ...], ...])
    assert layout.size == flat.size and len(layout) == 2 and layout.dtype == np.float32
    copy = layout.pack(make_params(1))
    assert np.array_equal(copy, flat) and len(layout.split(copy)) == 2
    assert flatopt.FlatLayout.from_dict(layout.to_dict()) == layout
    assert flatopt.flatten([[1, 2], [3]], dtype=np.float64)[0].dtype == np.float64
    opt = flatopt.Adam(views, lr=1e-3, adopt=True)  # adopts ``flat`` without a copy
    assert opt.adopted and opt.flat_params is not flat and np.shares_memory(opt.flat_params, flat)
    state = opt.state_dict()
    opt.load_state_dict(state)
    grad_norm: float = opt.grad_norm()
    assert grad_norm == 0.0


def functional() -> None:
    param = np.ones(16, np.float64)
    grad = np.full(16, 0.5)
    exp_avg, exp_avg_sq = np.zeros(16), np.zeros(16)
    assert_type(flatopt.functional.adam_(param, grad, exp_avg, exp_avg_sq, step=1, lr=1e-3,
                                         beta1=0.9, beta2=0.999, eps=1e-8), None)
    assert_type(flatopt.functional.count_nonfinite(param), int)
    assert flatopt.functional.count_nonfinite(param) == 0
    assert_type(flatopt.functional.grad_norm(grad, grad_scale=2.0), float)
    mu = flatopt.functional.nadam_(param, grad, exp_avg, exp_avg_sq, step=1, mu_product=1.0,
                                   lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    assert_type(mu, float)
    assert_type(flatopt.functional.radam_(param, grad, exp_avg, exp_avg_sq, step=1, lr=1e-3,
                                          beta1=0.9, beta2=0.999, eps=1e-8), bool)
    momentum_buffer = np.zeros_like(param)
    flatopt.functional.sgd_(param, grad, momentum_buffer, lr=0.1, step=1, momentum=0.9)


if __name__ == "__main__":
    threads()
    config()
    optimizers()
    more_optimizers()
    optimizer_api()
    flat_buffers()
    functional()
    print("ok")

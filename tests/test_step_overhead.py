"""Per-step Python work (issue 16 a/b), counted rather than timed.

The unchanged-hyperparameter path of the NumPy step must not run the full group check,
yet every change must still be validated; flatopt.torch's usual step (every parameter has
a gradient, hyperparameters unchanged) must make the same number of Python calls whatever
the number of parameters.
"""

import gc
import sys

import numpy as np
import pytest

import flatopt


def python_calls(fn, below=None):
    """How many Python-level function calls ``fn()`` makes (with ``below``: only those
    made from inside frames of functions of that name)."""
    count = 0

    def profiler(frame, event, arg):
        nonlocal count
        if event != "call":
            return
        caller = frame if below is None else frame.f_back
        while caller is not None:
            if below is None or caller.f_code.co_name == below:
                count += 1
                return
            caller = caller.f_back

    # A collection during fn() would count the gc callbacks other libraries register
    # (hypothesis times collections): calls of the collector's, not of fn's.
    enabled = gc.isenabled()
    gc.disable()
    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
        if enabled:
            gc.enable()
    return count


def _keras_adam(params, **kwargs):
    import flatopt.keras  # (no Keras import: the formulas only)

    return flatopt.keras.Adam(params, **kwargs)


@pytest.mark.parametrize("cls, kwargs", [(flatopt.SGD, dict(lr=0.1, momentum=0.9)),
                                         (flatopt.Adam, dict(lr=1e-3)),
                                         (flatopt.Adagrad, dict(lr=1e-2)),
                                         (_keras_adam, dict(learning_rate=1e-3))],  # weight_decay None
                         ids=["SGD", "Adam", "Adagrad", "keras.Adam"])
def test_unchanged_hyperparameters_skip_the_full_check_and_changes_are_still_validated(
        cls, kwargs, monkeypatch):
    opt = cls([np.ones(8), np.ones(3)], **kwargs)
    lr = "learning_rate" if "learning_rate" in opt.param_groups[0] else "lr"
    opt.step()
    full = []
    original = flatopt.Optimizer._prepare_groups
    monkeypatch.setattr(flatopt.Optimizer, "_prepare_groups",
                        lambda self: (full.append(1), original(self))[1])
    opt.step()
    opt.step()
    assert full == []
    opt.param_groups[0][lr] = 0.5 * opt.param_groups[0][lr]  # a new float: checked
    opt.step()
    assert full == [1]
    opt.param_groups[0][lr] = -1.0
    with pytest.raises(ValueError, match=lr):
        opt.step()
    opt.param_groups[0][lr] = 1e-3
    flag = "maximize" if "maximize" in opt.param_groups[0] else "amsgrad"
    opt.param_groups[0][flag] = 1  # equal to True, but not a bool: still caught
    with pytest.raises(TypeError, match=flag):
        opt.step()


def test_betas_list_edited_in_place_is_still_noticed():
    opt = flatopt.Adam([np.ones(4)], lr=1e-3, betas=[0.9, 0.999])
    opt.step()
    opt.param_groups[0]["betas"][0] = 1.5
    with pytest.raises(ValueError, match="betas"):
        opt.step()


def test_torch_usual_step_python_work_does_not_grow_with_parameters():
    torch = pytest.importorskip("torch")
    import flatopt.torch as ft

    def calls(n):
        params = [torch.nn.Parameter(torch.ones(5, dtype=torch.float64)) for _ in range(n)]
        opt = ft.Adam(params, lr=1e-3)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        opt.step()  # runs planned, entries made: the usual step from here on
        return python_calls(opt.step)

    assert calls(2) == calls(64)


def _optimizer_table():
    from test_adversarial import OPTIMIZERS, VALID_KWARGS
    return [(cls, VALID_KWARGS[cls.__name__]) for cls in OPTIMIZERS if cls.__name__ in VALID_KWARGS]


@pytest.mark.parametrize("cls, kwargs", _optimizer_table(), ids=lambda c: getattr(c, "__name__", ""))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unchanged_step_update_is_one_kernel_call(cls, kwargs, dtype):
    # Issue 16: an optimizer's _update on the unchanged path is its kernel call and nothing
    # else at Python level (no property, helper or fused-type dispatch in Python), and the
    # kernel is the dtype's specialisation, resolved once per optimizer.
    opt = cls([{"params": [np.ones(5, dtype)]}, {"params": [np.ones(3, dtype)]}], n_threads=1,
              **kwargs)
    opt.step()
    opt.step()
    assert python_calls(opt.step, below="_update") == 0
    name = {"SGD": "sgd", "Momentum": "momentum", "AdamW": "adam"}.get(cls.__name__, cls.__name__.lower())
    fused = getattr(flatopt._dispatch.kernels, name)
    assert getattr(opt._kernels, name) is fused[{np.float32: "float", np.float64: "double"}[dtype]]


@pytest.mark.parametrize("cls, kwargs", [(flatopt.SGD, dict(lr=0.1)),
                                         (flatopt.Adam, dict(lr=1e-3)),
                                         (flatopt.RMSprop, dict(lr=1e-3))])
def test_unused_state_argument_is_not_sliced_per_step(cls, kwargs):
    # SGD without momentum, Adam without amsgrad and plain RMSprop pass their kernel an
    # empty buffer for the unused state: one shared array, not a new param[:0] per step.
    opt = cls([np.ones(4, np.float32)], n_threads=1, **kwargs)
    real, calls = opt._kernels, []

    class Recorder:
        def __getattr__(self, name):
            kernel = getattr(real, name)
            if not callable(kernel):
                return kernel
            return lambda *args: (calls.append(args), kernel(*args))[1]

    opt.__dict__["_kernels"] = Recorder()
    opt.step()
    opt.step()
    buffers = (np.ndarray, flatopt._dispatch.kernels.KernelView)
    empties = [a for args in calls for a in args if isinstance(a, buffers) and len(a) == 0]
    assert len(calls) == 2 and empties
    assert all(a is real.empty for a in empties)
    # Every buffer is the kernels' own memoryview (kernels.as_view), made once: the step
    # makes no buffer request. They are views of the live buffers, not copies.
    first, second = calls
    assert [type(a) for a in first if isinstance(a, buffers)] == [
        flatopt._dispatch.kernels.KernelView] * len([a for a in first if isinstance(a, buffers)])
    assert all(a is b for a, b in zip(first, second) if isinstance(a, buffers))
    assert np.shares_memory(np.asarray(first[0]), opt.flat_params)

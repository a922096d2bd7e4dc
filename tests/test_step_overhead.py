"""Per-step Python work (issue 16 a/b), counted rather than timed.

The unchanged-hyperparameter path of the NumPy step must not run the full group check,
yet every change must still be validated; flatopt.torch's usual step (every grad is its
flat view, hyperparameters unchanged) must make the same number of Python calls whatever
the number of parameters.
"""

import sys

import numpy as np
import pytest

import flatopt


def python_calls(fn):
    """How many Python-level function calls ``fn()`` makes."""
    count = 0

    def profiler(frame, event, arg):
        nonlocal count
        if event == "call":
            count += 1

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


@pytest.mark.parametrize("cls, kwargs", [(flatopt.SGD, dict(lr=0.1, momentum=0.9)),
                                         (flatopt.Adam, dict(lr=1e-3)),
                                         (flatopt.Adagrad, dict(lr=1e-2))])
def test_unchanged_hyperparameters_skip_the_full_check_and_changes_are_still_validated(
        cls, kwargs, monkeypatch):
    opt = cls([np.ones(8), np.ones(3)], **kwargs)
    opt.step()
    full = []
    original = flatopt.Optimizer._prepare_groups
    monkeypatch.setattr(flatopt.Optimizer, "_prepare_groups",
                        lambda self: (full.append(1), original(self))[1])
    opt.step()
    opt.step()
    assert full == []
    opt.param_groups[0]["lr"] = 0.5 * opt.param_groups[0]["lr"]  # a new float: checked
    opt.step()
    assert full == [1]
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    opt.param_groups[0]["lr"] = 1e-3
    opt.param_groups[0]["maximize"] = 1  # equal to True, but not a bool: still caught
    with pytest.raises(TypeError, match="maximize"):
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

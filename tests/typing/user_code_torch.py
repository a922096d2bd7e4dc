"""User-style code over ``flatopt.torch``, type-checked by mypy in strict mode.

The PyTorch counterpart of ``user_code.py``, in a file of its own because torch is
optional: ``python -m mypy --strict tests/typing`` checks it where torch is installed (as
in CI), and tests/typing/test_mypy.py checks and runs it only when torch is importable.
Every line is real, working usage; each ``assert_type`` states a type the annotations
promise, and passing the optimizers where torch expects a ``torch.optim.Optimizer`` (an
LR scheduler) checks that they are compatible with it.
"""

import sys
from typing import Any

import torch

import flatopt.torch

if sys.version_info >= (3, 11):
    from typing import assert_type
else:
    from typing_extensions import assert_type


def make_model(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2, dtype=torch.float64)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> float:
    """A few steps on a fixed batch through the plain torch.optim interface; the final loss."""
    dtype = next(model.parameters()).dtype
    x = torch.linspace(-1.0, 1.0, 12, dtype=dtype).view(3, 4)
    loss = float("inf")
    for _ in range(steps):
        opt.zero_grad()
        out = model(x).pow(2).mean()
        out.backward()
        opt.step()
        loss = out.item()
    return loss


def optimizers() -> None:
    model = make_model(0)
    sgd = flatopt.torch.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, n_threads=1)
    assert isinstance(sgd, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(sgd, step_size=2)
    assert train(model, sgd) < float("inf")
    sched.step()
    adam = flatopt.torch.Adam(make_model(1).parameters(), lr=torch.tensor(1e-3), betas=(0.9, 0.99),
                              amsgrad=True)
    lion = flatopt.torch.Lion([{"params": list(make_model(2).parameters()), "lr": 1e-4}])
    for opt in (adam, lion, flatopt.torch.AdamW(make_model(3).parameters()),
                flatopt.torch.Momentum(make_model(4).parameters(), lr=0.1)):
        assert_type(opt.step(), None)  # no gradients yet: every parameter is skipped
    half = torch.nn.Linear(4, 2, dtype=torch.float16)
    mixed = flatopt.torch.SGD(half.parameters(), lr=0.1, master_dtype=torch.float32)
    assert train(half, mixed) < float("inf")


def step_api() -> None:
    """The step overloads (as torch.optim's), flatopt's keyword-only extensions, the
    gradient norm and clipping."""
    model = make_model(5)
    opt = flatopt.torch.Adam(model.parameters(), lr=1e-3)
    x = torch.ones(2, 4, dtype=torch.float64)

    def closure() -> float:
        opt.zero_grad()
        out = model(x).sum()
        out.backward()
        return float(out.item())

    loss = opt.step(closure)
    assert_type(loss, float)
    assert_type(opt.step(), None)
    norm = opt.clip_grad_norm_(1.0)
    assert_type(norm, float)
    assert_type(opt.grad_norm(norm_type=2.0), float)
    opt.step(grad_scale=0.5, skip_if_nonfinite=True)
    assert_type(opt.skipped_steps, int)
    assert_type(opt.last_step_skipped, bool)
    assert not opt.last_step_skipped


def checkpoints() -> None:
    model = make_model(6)
    opt = flatopt.torch.Adam(model.parameters(), lr=1e-3)
    train(model, opt, steps=2)
    state = opt.state_dict()
    assert_type(state, dict[str, Any])
    again = flatopt.torch.Adam(make_model(6).parameters(), lr=1e-3)
    assert_type(again.load_state_dict(state), None)
    reference = torch.optim.Adam(make_model(6).parameters(), lr=1e-3)
    reference.load_state_dict(state)  # torch.optim's format
    assert int(again.state_dict()["state"][0]["step"]) == 2


if __name__ == "__main__":
    optimizers()
    step_api()
    checkpoints()
    print("ok")

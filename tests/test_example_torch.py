"""examples/torch_cpu_training.py: the three runs it compares train the same model alike.

A short run (width 32, 3 epochs, one thread, two repeats) in this process: in float64
flatopt.torch's losses follow torch.optim's for-loop run to rounding (as the example's
docstring says), every run learns, and every repeat is timed. Skips without torch or
scikit-learn (the digits data ships with it) and when the examples are not beside the tests
(the installed-wheel runs copy only tests/).
"""

import numpy as np
import pytest
from conftest import example_module

pytest.importorskip("torch")
pytest.importorskip("sklearn", reason="the example's digits data ships with scikit-learn")

EXAMPLE, pytestmark, load_example = example_module("torch_cpu_training")
SHORT = ["--width", "32", "--depth", "2", "--epochs", "3", "--threads", "1", "--repeats", "2"]


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.mark.parametrize("optimizer", ["Adam", "SGD"])
def test_flatopt_follows_the_for_loop_run_in_float64(example, optimizer, capsys):
    results = example.main(SHORT + ["--dtype", "float64", "--optimizer", optimizer])
    loop, fused, flat = (f"torch.optim.{optimizer}", f"torch.optim.{optimizer}(fused=True)",
                         f"flatopt.torch.{optimizer}")
    assert list(results) == [loop, fused, flat]
    steps = 3 * -(-1437 // 64)
    for label, res in results.items():
        assert res["losses"].shape == (steps,)
        assert len(res["train_s"]) == 2 and min(res["train_s"]) > 0
        assert len(res["step_s"]) == 2 * steps  # every step of both repeats
        assert res["step_ms"] == np.median(res["step_s"]) * 1e3 > 0
        assert res["losses"][-23:].mean() < 0.5 * res["losses"][:23].mean(), label
        assert res["test_accuracy"] > 0.8, label
    np.testing.assert_allclose(results[flat]["losses"], results[loop]["losses"], rtol=1e-12, atol=0)
    out = capsys.readouterr().out
    assert f"{steps} steps, step() medians save" in out
    assert out.count(" (") >= 3  # each row prints its range of training times
    ratios = [a / b for a, b in zip(results[flat]["train_s"], results[fused]["train_s"])]
    assert results[flat]["paired_ratio"] == pytest.approx(np.median(ratios))
    assert f"(median {np.median(ratios):.2f}x)" in out


def test_repeats_must_be_positive(example, capsys):
    with pytest.raises(SystemExit):
        example.main(SHORT[:-1] + ["0"])
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err

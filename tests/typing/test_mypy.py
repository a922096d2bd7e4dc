"""The package's type information, checked the way a user's type checker sees it.

* ``user_code.py`` (public API usage) passes ``mypy --strict`` and runs; so does
  ``user_code_torch.py`` (``flatopt.torch``) when torch is installed;
* from the source tree, ``mypy --strict -p flatopt`` passes: every module of the package
  but those in the ``ignore_errors`` list of ``[tool.mypy]`` is strict-clean;
* code that misuses the annotated API is rejected, with the errors expected (so the
  check above is live, not vacuous); ``flatopt.torch`` too when torch is installed;
* the stubs of the compiled modules match their runtime signatures (``mypy.stubtest``).

Skipped when mypy is not installed. The mypy configuration is ``[tool.mypy]`` in
pyproject.toml; from the source tree mypy reads the package in ``src/``, elsewhere (the
installed-wheel runs) the installed package and its ``py.typed``.
"""

import importlib.util
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import flatopt

pytest.importorskip("mypy", reason="mypy checks the type information")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]  # holds pyproject.toml, in the source tree and in the wheel runs
SOURCE_PACKAGE = ROOT / "src" / "flatopt"  # only in the source tree
PACKAGE_PARENT = str(Path(flatopt.__file__).resolve().parents[1])
# flatopt.torch needs torch (optional): its files are checked and run only with it.
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="flatopt.torch needs torch")

MISUSE = '''\
import flatopt
flatopt.set_num_threads("2")
n: str = flatopt.get_num_threads()
with flatopt.num_threads(1.5):
    pass
flatopt.show_config(file=3)
info: list[str] = flatopt.build_info()
enabled: int = flatopt.openmp_enabled()
import numpy as np
opt = flatopt.Adam([np.zeros(3)], lr="1e-3")
opt.step(grads=3)
taken: None = opt.step()
flatopt.functional.adam_(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3), step=1, lr=1e-3)
flat, views = flatopt.flatten(np.zeros(3), dtype=np.float32)
shapes: list[int] = flatopt.FlatLayout.from_arrays(views).shapes
'''
# (line, message fragment) of every error MISUSE must raise; line 8 is fine (bool <: int),
# and so is line 9. Line 14 passes an array where flatten wants an iterable of arrays: an
# ndarray is iterable, so only the runtime check refuses it (no error expected there).
EXPECTED = [
    (2, 'Argument 1 to "set_num_threads" has incompatible type "str"'),
    (3, 'Incompatible types in assignment (expression has type "int", variable has type "str")'),
    (4, 'Argument 1 to "num_threads" has incompatible type "float"'),
    (6, 'Argument "file" to "show_config" has incompatible type "int"'),
    (7, 'expression has type "dict[str, Any]", variable has type "list[str]"'),
    (10, 'Argument "lr" to "Adam" has incompatible type "str"; expected "float"'),
    (11, 'Argument "grads" to "step" of "Optimizer" has incompatible type "int"'),
    (12, 'Incompatible types in assignment (expression has type "bool", variable has type "None")'),
    (13, 'Missing named argument "beta1" for "adam_"'),
    (13, 'Missing named argument "beta2" for "adam_"'),
    (13, 'Missing named argument "eps" for "adam_"'),
    (15, 'expression has type "tuple[tuple[int, ...], ...]", variable has type "list[int]"'),
]


MISUSE_TORCH = '''\
import torch
import flatopt.torch
model = torch.nn.Linear(2, 1)
opt = flatopt.torch.Adam(model.parameters(), lr="1e-3")
taken: None = flatopt.torch.SGD(model.parameters()).step(lambda: 1.0)
flatopt.torch.SGD(model.parameters(), n_threads="2")
flatopt.torch.NAdam(model.parameters(), betas=(0.9, 0.999, 0.5))
state: list[int] = flatopt.torch.Adam(model.parameters()).state_dict()
'''
# (line, message fragment) of every error MISUSE_TORCH must raise. Line 5: with a
# closure, step() returns the closure's loss (torch.optim.Optimizer.step's overloads).
EXPECTED_TORCH = [
    (4, 'Argument "lr" to "Adam" has incompatible type "str"; expected "float | Tensor"'),
    (5, 'Incompatible types in assignment (expression has type "float", variable has type "None")'),
    (6, 'Argument "n_threads" to "SGD" has incompatible type "str"; expected "int | None"'),
    (7, 'Argument "betas" to "NAdam" has incompatible type "tuple[float, float, float]"'),
    (8, 'expression has type "dict[str, Any]", variable has type "list[int]"'),
]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mypy cache shared by the runs below (NumPy's stubs are analysed once)."""
    return tmp_path_factory.mktemp("mypy_cache")


@pytest.fixture(scope="module")
def mypy_output(tmp_path_factory: pytest.TempPathFactory, mypy_cache: Path) -> tuple[int, str]:
    """One strict mypy run over user_code.py and the misuse file (with torch, over
    user_code_torch.py and the torch misuse file too): (exit code, output)."""
    tmp = tmp_path_factory.mktemp("mypy")
    misuse = tmp / "misuse.py"
    misuse.write_text(MISUSE)
    files = [HERE / "user_code.py", misuse]
    if HAS_TORCH:
        misuse_torch = tmp / "misuse_torch.py"
        misuse_torch.write_text(MISUSE_TORCH)
        files += [HERE / "user_code_torch.py", misuse_torch]
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-color-output", "--no-error-summary",
         "--cache-dir", str(mypy_cache), *map(str, files)],
        cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_user_code_passes_strict_mypy(mypy_output: tuple[int, str]) -> None:
    """No error anywhere but in the misuse files: not in user_code*.py, not in flatopt."""
    _, output = mypy_output
    others = [line for line in output.splitlines()
              if line.strip() and "misuse.py:" not in line and "misuse_torch.py:" not in line]
    assert not others, output


@pytest.mark.skipif(not (SOURCE_PACKAGE.is_dir() and (ROOT / "pyproject.toml").is_file()),
                    reason="checks the package's source tree (src/flatopt beside pyproject.toml)")
def test_package_passes_strict_mypy(mypy_cache: Path) -> None:
    """Every module of flatopt, not only those user_code.py imports, is strict-clean (but
    for the ``ignore_errors`` list of ``[tool.mypy]``).

    The source tree only: ``mypy_path`` in pyproject.toml points mypy at ``src``, whereas
    against an installed package mypy silences every error inside site-packages, so the
    run over user_code.py above would not notice one in the package. Without torch, every
    module but flatopt.torch's (which need torch's own type information).
    """
    if HAS_TORCH:
        targets = ["-p", "flatopt"]
    else:
        names = sorted({"flatopt" if f.stem == "__init__" else f"flatopt.{f.stem}"
                        for f in SOURCE_PACKAGE.glob("*.py*") if f.suffix in (".py", ".pyi")})
        targets = [arg for name in names for arg in ("-m", name)]
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "pyproject.toml"),
         "--no-color-output", "--cache-dir", str(mypy_cache), *targets],
        cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Success: no issues found" in output, output


def _check_rejected(output: str, file: str, expected: list[tuple[int, str]]) -> None:
    errors = re.findall(rf"\b{re.escape(file)}:(\d+): error: (.*)", output)
    for line, fragment in expected:
        assert any(int(n) == line and fragment in msg for n, msg in errors), (line, fragment, output)
    assert len(errors) == len(expected), output


def test_misuse_is_rejected(mypy_output: tuple[int, str]) -> None:
    code, output = mypy_output
    assert code == 1, output
    _check_rejected(output, "misuse.py", EXPECTED)


@needs_torch
def test_torch_misuse_is_rejected(mypy_output: tuple[int, str]) -> None:
    _, output = mypy_output
    _check_rejected(output, "misuse_torch.py", EXPECTED_TORCH)


def test_user_code_runs() -> None:
    previous = flatopt.set_num_threads(None)
    try:
        runpy.run_path(str(HERE / "user_code.py"), run_name="__main__")
    finally:
        flatopt.set_num_threads(previous)


@needs_torch
def test_torch_user_code_runs() -> None:
    previous = flatopt.set_num_threads(None)
    try:
        runpy.run_path(str(HERE / "user_code_torch.py"), run_name="__main__")
    finally:
        flatopt.set_num_threads(previous)


def test_stubs_match_compiled_modules() -> None:
    modules = ["flatopt._kernels", "flatopt._openmp_helpers", "flatopt._cpu_features"]
    # stubtest imports each module: only the ISA variants this CPU runs (a variant built
    # for another may execute its instructions while it initialises: SIGILL, not an error).
    supported = flatopt.build_info().get("isa_supported", ())
    modules += [f"flatopt._kernels_{level}" for level in ("avx2", "avx512") if level in supported]
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "--allowlist",
         str(HERE / "stubtest_allowlist.txt"), *modules],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**_env(), **_mypypath()})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _mypypath() -> dict[str, str]:
    """Point mypy at the flatopt under test; an installed one it finds by itself (and
    refuses a site-packages directory in MYPYPATH)."""
    if Path(PACKAGE_PARENT).name in ("site-packages", "dist-packages"):
        return {}
    return {"MYPYPATH": PACKAGE_PARENT}

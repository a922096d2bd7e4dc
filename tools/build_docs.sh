#!/usr/bin/env bash
# Build the documentation site (docs/_build/html) and run every code example in it as a
# doctest (the pages' and the docstrings' >>> examples), with warnings as errors.
#
# Installs nothing. Needs flatopt importable (built in place with
# `python setup.py build_ext --inplace`, which docs/conf.py then prefers, or installed)
# and the `docs` extra's tools (`pip install ".[docs]"`). The flatopt.torch reference and
# its examples need PyTorch and are left out (with a note) without it.
#
#   PYTHON=python   interpreter to build with
#   extra arguments go to both sphinx-build runs, e.g. `tools/build_docs.sh -q`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}

# Autosummary regenerates its stub pages; stale ones (a removed name) must not linger.
rm -rf docs/api/generated
"$PYTHON" -m sphinx -W --keep-going -E -d docs/_build/doctrees -b html docs docs/_build/html "$@"
"$PYTHON" -m sphinx -W --keep-going -d docs/_build/doctrees -b doctest docs docs/_build/doctest "$@"
echo "build_docs: ok, open docs/_build/html/index.html"

"""Sphinx configuration of flatopt's documentation.

Build (from the repository root, after ``python setup.py build_ext --inplace``)::

    bash tools/build_docs.sh          # html + doctest, warnings are errors

The package is imported from ``src/`` (or wherever it is installed); nothing is fetched
from the network. The ``flatopt.torch`` reference needs PyTorch and is left out, with a
note, when it is not installed (as is ``flatopt.torch.distributed``'s).
"""

import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
# Document this source tree when its extensions are built in place
# (`python setup.py build_ext --inplace`); otherwise the installed flatopt.
if glob.glob(os.path.join(SRC, "flatopt", "_kernels.*.so")) or glob.glob(
        os.path.join(SRC, "flatopt", "_kernels.*.pyd")):
    sys.path.insert(0, SRC)

import flatopt  # noqa: E402

print(f"flatopt docs: documenting flatopt {flatopt.__version__} from {os.path.dirname(flatopt.__file__)}")

try:  # the flatopt.torch reference and examples need PyTorch (an optional dependency)
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

project = "flatopt"
author = "the flatopt developers"
copyright = "2026, the flatopt developers"
release = flatopt.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "numpydoc",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "benchmark-*.txt"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
default_role = "code"  # `x` is inline code, as ``x``
nitpicky = False

# -- API reference ----------------------------------------------------------------------
# Without PyTorch, the flatopt.torch and flatopt.torch.distributed pages become a note
# (see setup() below) and their autosummary stubs are not generated.
TORCH_PAGES = {
    "api/torch": "``flatopt.torch``",
    "api/distributed": "``flatopt.torch.distributed``",
}
autosummary_generate = True if HAVE_TORCH else ["api/index.rst", "api/keras.rst"]
autosummary_imported_members = True
autodoc_default_options = {"members": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autoclass_content = "class"
# The classes' methods are listed by the autosummary class template (docs/_templates).
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
# numpydoc parses only the standard sections; module docstrings in free form (flatopt.torch's
# "How it works", ...) are rendered as written, not as numpydoc sections.

# -- doctests -----------------------------------------------------------------------------
# `python -m sphinx -b doctest docs docs/_build/doctest` runs every >>> example of these
# pages and of the docstrings they include.
doctest_global_setup = """
import numpy as np
import flatopt
try:
    import torch
except ImportError:
    torch = None
"""
doctest_default_flags = (
    __import__("doctest").ELLIPSIS | __import__("doctest").NORMALIZE_WHITESPACE
)

# -- HTML -----------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"flatopt {release}"
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version", "theme-version"],
}
html_context = {"default_mode": "auto"}
html_static_path = []
html_show_sourcelink = False
html_last_updated_fmt = None


def _torch_page_without_torch(app, docname, source):
    if docname in TORCH_PAGES and not HAVE_TORCH:
        title = TORCH_PAGES[docname]
        source[0] = (f"{title}\n{'=' * len(title)}\n\n"
                     "This reference is built only when PyTorch is installed.\n")


def setup(app):
    app.connect("source-read", _torch_page_without_torch)

# cython: language_level=3
"""The kernels of ``_kernels.pyx``, compiled for avx512 (see setup.py's ISA_VARIANTS).

One source for every ISA level: this module only includes it. ``flatopt._dispatch``
imports it when the CPU supports avx512.
"""

include "_kernels.pyx"

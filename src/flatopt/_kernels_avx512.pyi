"""Type stubs: the kernels of ``_kernels.pyx`` compiled for avx512 (same API as ``_kernels``)."""

from ._kernels import *
from ._kernels import NORM_BLOCK as NORM_BLOCK, PARALLEL_THRESHOLD as PARALLEL_THRESHOLD

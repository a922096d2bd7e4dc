"""Type stubs for ``_cpu_features.pyx``: which ISA levels the running CPU (and OS) supports."""

def cpu_supports(level: str) -> bool:
    """True if the CPU can run kernels built for ISA ``level``
    ("baseline", "avx2" or "avx512"); ValueError for any other level."""

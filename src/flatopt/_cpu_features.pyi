"""Type stubs for ``_cpu_features.pyx``: which ISA levels the running CPU (and OS) supports."""

IS_X86_64: bool

def cpu_level() -> str:
    """The widest ISA level this CPU and OS can run: "baseline", "avx2" or "avx512"."""

def cpu_supports(level: str) -> bool:
    """True if the CPU can run kernels built for ISA ``level``
    ("baseline", "avx2" or "avx512"); ValueError for any other level."""

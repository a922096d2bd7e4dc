# cython: language_level=3
"""Which instruction-set extensions the running CPU (and OS) supports.

Compiled for the baseline ISA, so it imports everywhere. ``__builtin_cpu_supports`` also
checks that the OS saves the wide registers (XGETBV), so a True here is safe to use.
"""

cdef extern from *:
    """
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    static int flatopt_has_avx2(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    static int flatopt_has_avx512(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
    }
    #else
    static int flatopt_has_avx2(void) { return 0; }
    static int flatopt_has_avx512(void) { return 0; }
    #endif
    """
    int flatopt_has_avx2()
    int flatopt_has_avx512()


def cpu_supports(level):
    """True if the CPU can run kernels built for ISA ``level``
    ("baseline", "avx2" or "avx512")."""
    if level == "baseline":
        return True
    if level == "avx2":
        return bool(flatopt_has_avx2())
    if level == "avx512":
        return bool(flatopt_has_avx512())
    raise ValueError(f"level must be 'baseline', 'avx2' or 'avx512', got {level!r}")

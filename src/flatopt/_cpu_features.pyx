# cython: language_level=3
"""Which instruction-set extensions the running CPU, and the OS, support.

This module is compiled for the platform baseline, so it imports on every CPU; it is the
only code ``flatopt._dispatch`` runs before it knows which kernel build is safe.

On x86-64 a level is supported when CPUID reports every feature its kernels were compiled
for *and* the OS saves the registers they use: XGETBV's XCR0 must enable the SSE and AVX
(YMM) state for avx2, and additionally the opmask and ZMM state for avx512. A CPU can
report AVX-512 while the OS (or a hypervisor) leaves ZMM state disabled; then only the
avx2 build is safe. Elsewhere (aarch64, ...) only the baseline build exists.
"""

cdef extern from *:
    """
    #if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    #include <cpuid.h>
    #define FLATOPT_X86 1
    static unsigned long long flatopt_xgetbv0(void) {
        unsigned int eax, edx;
        /* xgetbv, encoded as bytes: assemblers too old for the mnemonic still build this */
        __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(eax), "=d"(edx) : "c"(0));
        return ((unsigned long long)edx << 32) | eax;
    }
    /* 0: baseline only, 1: avx2 (+fma, f16c), 2: avx512 (f, dq, vl, bw; + f16c) */
    static int flatopt_x86_level(void) {
        unsigned int a, b, c, d, max_leaf;
        unsigned long long xcr0;
        int level = 0;
        max_leaf = __get_cpuid_max(0, 0);
        if (max_leaf < 7 || !__get_cpuid(1, &a, &b, &c, &d))
            return 0;
        /* OSXSAVE (ecx 27): the OS enabled XSAVE and XGETBV; AVX (28), FMA (12), F16C (29) */
        if (!(c & (1u << 27)) || !(c & (1u << 28)) || !(c & (1u << 12)) || !(c & (1u << 29)))
            return 0;
        xcr0 = flatopt_xgetbv0();
        if ((xcr0 & 0x6) != 0x6)          /* XMM and YMM state */
            return 0;
        __cpuid_count(7, 0, a, b, c, d);
        if (b & (1u << 5))                /* AVX2 */
            level = 1;
        else
            return 0;
        /* AVX512F (16), DQ (17), BW (30), VL (31), and opmask + ZMM_Hi256 + Hi16_ZMM state */
        if ((b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31))
                && (xcr0 & 0xe6) == 0xe6)
            level = 2;
        return level;
    }
    #else
    #define FLATOPT_X86 0
    static int flatopt_x86_level(void) { return 0; }
    #endif
    """
    int FLATOPT_X86
    int flatopt_x86_level()


IS_X86_64 = bool(FLATOPT_X86)
"""True when this module was compiled for x86-64 (the only platform with ISA variants)."""

_LEVEL_RANK = {"baseline": 0, "avx2": 1, "avx512": 2}


def cpu_level():
    """The widest ISA level this CPU and OS can run: "baseline", "avx2" or "avx512"."""
    return ("baseline", "avx2", "avx512")[flatopt_x86_level()]


def cpu_supports(level):
    """True if the CPU (and OS) can run kernels built for ISA ``level``
    ("baseline", "avx2" or "avx512")."""
    try:
        rank = _LEVEL_RANK[level]
    except (KeyError, TypeError):
        raise ValueError(
            f"level must be 'baseline', 'avx2' or 'avx512', got {level!r}") from None
    return rank <= flatopt_x86_level()

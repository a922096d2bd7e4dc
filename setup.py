"""Build the flatopt Cython extensions.

OpenMP is probed with the compiler that builds the package: if a small OpenMP program
compiles and links (and, for a native build, runs), the kernels are built with OpenMP;
otherwise a serial build is made and a loud warning is printed. A cross build (the
compiler targets another CPU than this machine's, e.g. aarch64-linux-gnu-gcc on x86-64)
only compiles and links the probe: its binaries cannot run here.

Environment switches:
  FLATOPT_NO_OPENMP=1       force the serial build
  FLATOPT_REQUIRE_OPENMP=1  fail the build if OpenMP is not available
  FLATOPT_CYTHON_DEBUG=1    compile with Cython's bounds/wraparound/initialized checks on
"""

import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.join("src", "flatopt")

OPENMP_TEST = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d %d\\n", n, omp_get_max_threads());
        return n > 0 ? 0 : 1;
    }
    """
)


# Extra builds of _kernels.pyx for wider SIMD, chosen at import time by flatopt._dispatch.
# Only for x86-64 compilers that accept the flags; elsewhere the baseline build is all.
#
# The avx512 build keeps gcc's default 256-bit vectors (AVX-512VL instructions on ymm
# registers). Measured on a 2-core Sapphire Rapids (AVX-512; CPU-time medians, two runs),
# 512-bit vectors (-mprefer-vector-width=512) took 8-9% longer for Adam in cache (2**16),
# 3-5% longer for Adam at 2**23-2**25, and 4-6% less for momentum there: no size where
# Adam gains, and the in-cache loss (downclocking, split-load costs) is the larger effect.
#
# Both also use F16C (float16 conversions; part of x86-64-v3 with AVX2 and FMA, and on
# every CPU with AVX-512F), which flatopt._cpu_features requires for either level.
ISA_VARIANTS = {
    "flatopt._kernels_avx2": ["-mavx2", "-mfma", "-mf16c"],
    "flatopt._kernels_avx512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mf16c",
                                "-mprefer-vector-width=256"],
}

ISA_TEST = textwrap.dedent(
    """
    #include <immintrin.h>
    int main(void) { return 0; }
    """
)


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _openmp_flags(compiler):
    """Compile and link flags for OpenMP with this compiler type (sklearn's table)."""
    if compiler.compiler_type == "msvc":
        return ["/openmp"], []
    if sys.platform == "darwin":
        # Apple clang has no -fopenmp driver flag; libomp comes from Homebrew or a wheel.
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def _speed_flags(compiler, debug=False):
    if compiler.compiler_type == "msvc":
        return ["/O2", "/fp:precise"]
    # -fno-math-errno lets gcc vectorise sqrt; -ffp-contract=off keeps results identical
    # whatever the ISA (no FMA contraction), so every build and thread count agree bit for bit.
    # -g0 overrides the -g in CPython's own CFLAGS (manylinux's interpreters have it too):
    # DWARF sections made the extensions 4.8x larger (gcc 12, x86-64: 22.5 MB against 4.7 MB,
    # 7.3 MB against 1.5 MB for the avx512 kernels), as scikit-learn found for its wheels.
    # `build_ext --debug` keeps them.
    return ["-O3", "-fno-math-errno", "-ffp-contract=off"] + ([] if debug else ["-g0"])


def _normalize_arch(name):
    name = name.strip().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(name, name)


def _target_arch(compiler):
    """The CPU the extensions are built for, which a cross build makes differ from this one's.

    macOS's ``ARCHFLAGS`` names it when set (a universal build reports its architectures
    joined by "+"); otherwise the compiler is asked (``gcc -dumpmachine``:
    ``aarch64-linux-gnu-gcc`` says ``aarch64-linux-gnu``); failing that, the platform
    setuptools tags the wheel with (``sysconfig.get_platform()``, which follows
    ``_PYTHON_HOST_PLATFORM`` as cross builds set it, not ``_PYTHON_SYSCONFIGDATA_NAME``).
    """
    archs = shlex.split(os.environ.get("ARCHFLAGS", ""))
    archs = [_normalize_arch(a) for flag, a in zip(archs, archs[1:]) if flag == "-arch"]
    if archs:
        return "+".join(sorted(set(archs)))
    exe = getattr(compiler, "compiler", None)
    if compiler.compiler_type != "msvc" and exe:
        try:
            out = subprocess.run([exe[0], "-dumpmachine"], capture_output=True, text=True,
                                 timeout=30)
            triple = out.stdout.strip()
            if out.returncode == 0 and triple:
                return _normalize_arch(triple.split("-")[0])
        except (OSError, subprocess.SubprocessError):
            pass
    return _normalize_arch(sysconfig.get_platform().rsplit("-", 1)[-1])


def _cross_compiling(target):
    """True when binaries for ``target`` (``_target_arch``) cannot run on this machine."""
    return target != _normalize_arch(platform.machine())


def _probe_openmp(compiler, compile_flags, link_flags, run=True):
    """True if a small OpenMP program compiles and links with these flags, and runs if ``run``.

    A cross build passes ``run=False``: the linked program is for another CPU, so the probe
    is that the compiler finds ``omp.h`` and the linker the OpenMP runtime.
    """
    tmp = tempfile.mkdtemp(prefix="flatopt-omp-")
    cwd = os.getcwd()
    try:
        os.chdir(tmp)
        with open("test_openmp.c", "w") as f:
            f.write(OPENMP_TEST)
        objects = compiler.compile(["test_openmp.c"], output_dir="objs", extra_postargs=compile_flags)
        exe = "test_openmp" + (".exe" if sys.platform == "win32" else "")
        # distutils links executables without $LDFLAGS; the probe needs them where the
        # OpenMP runtime lives outside the default paths (macOS wheels: -L/-rpath to libomp).
        env_ldflags = shlex.split(os.environ.get("LDFLAGS", ""))
        if compiler.compiler_type == "msvc":
            env_ldflags = []
        compiler.link_executable(objects, "test_openmp", extra_preargs=env_ldflags,
                                 extra_postargs=link_flags)
        if not os.path.isfile(os.path.join(tmp, exe)):
            raise RuntimeError(f"the linker reported success but wrote no {exe}")
        if not run:
            return True
        out = subprocess.run([os.path.join(tmp, exe)], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[0]) >= 1
    except Exception as exc:  # any failure means: no usable OpenMP
        print(f"flatopt: OpenMP probe failed: {exc!r}", file=sys.stderr)
        return False
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)


def _compiles(compiler, source, flags):
    """True if ``source`` compiles and links with ``flags`` (it is not run)."""
    tmp = tempfile.mkdtemp(prefix="flatopt-probe-")
    try:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(source)
        objects = compiler.compile([path], output_dir=tmp, extra_postargs=flags)
        compiler.link_executable(objects, os.path.join(tmp, "probe"), extra_postargs=flags)
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _isa_variants(compiler, target):
    """The ISA variant builds this compiler and target support: {ext name: flags}.

    Only an x86-64 ``target`` (``_target_arch``, the compiler's, not this machine's) has
    variants: a cross build for aarch64 on an x86-64 machine builds the baseline only.
    """
    if compiler.compiler_type == "msvc" or target != "x86_64":
        return {}
    return {name: flags for name, flags in ISA_VARIANTS.items()
            if _compiles(compiler, ISA_TEST, flags)}


def _compiler_version(compiler):
    exe = getattr(compiler, "compiler", None)
    if not exe:
        return compiler.compiler_type
    try:
        out = subprocess.run([exe[0], "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip()
    except Exception:
        return exe[0]


class BuildExt(build_ext):
    """build_ext that probes OpenMP, sets flags, and records what it did."""

    def build_extensions(self):
        compile_flags, link_flags = _openmp_flags(self.compiler)
        target = _target_arch(self.compiler)
        cross = _cross_compiling(target)
        if cross:
            print(f"flatopt: cross-compiling for {target} on "
                  f"{platform.machine()}: the OpenMP probe compiles and links only",
                  file=sys.stderr)
        if _env_flag("FLATOPT_NO_OPENMP"):
            use_openmp, reason = False, "disabled by FLATOPT_NO_OPENMP"
        elif _probe_openmp(self.compiler, compile_flags, link_flags, run=not cross):
            use_openmp, reason = True, "probe succeeded"
        else:
            use_openmp, reason = False, "probe failed"
        if not use_openmp:
            if _env_flag("FLATOPT_REQUIRE_OPENMP") and not _env_flag("FLATOPT_NO_OPENMP"):
                raise RuntimeError("flatopt: FLATOPT_REQUIRE_OPENMP=1 but OpenMP is not usable "
                                   f"({reason}; the probe's error is printed above)")
            banner = "*" * 78
            print(
                f"\n{banner}\nflatopt: building WITHOUT OpenMP ({reason}).\n"
                "The kernels will run on one thread. Install an OpenMP runtime (libgomp,\n"
                f"libomp) to get the parallel build.\n{banner}\n",
                file=sys.stderr,
            )
            compile_flags, link_flags = [], []

        speed = _speed_flags(self.compiler, self.debug)
        variants = _isa_variants(self.compiler, target)
        skipped = [e.name for e in self.extensions if e.name in ISA_VARIANTS and e.name not in variants]
        if skipped:
            print(f"flatopt: not building {', '.join(skipped)} (compiler or target lacks the ISA)",
                  file=sys.stderr)
        self.extensions = [e for e in self.extensions if e.name not in skipped]
        for ext in self.extensions:
            isa = variants.get(ext.name, [])
            ext.extra_compile_args = speed + compile_flags + isa + ext.extra_compile_args
            ext.extra_link_args = link_flags + ext.extra_link_args
        isa_levels = ["baseline"] + [name.rsplit("_", 1)[1] for name in variants]
        self._write_build_config(use_openmp, speed + compile_flags, link_flags, isa_levels,
                                 variants, target)
        super().build_extensions()

    def copy_extensions_to_source(self):
        # setuptools builds in-place (and editable) extensions in build_lib with
        # self.inplace cleared, then copies them into the tree: the build record goes along.
        super().copy_extensions_to_source()
        record = os.path.join(self.build_lib, "flatopt", "_build_config.py")
        if os.path.exists(record):
            shutil.copyfile(record, os.path.join(ROOT, PKG, "_build_config.py"))

    def _write_build_config(self, use_openmp, cflags, ldflags, isa_levels, variants, target):
        info = {
            "openmp": use_openmp,
            "compiler": _compiler_version(self.compiler),
            "compiler_type": self.compiler.compiler_type,
            "cflags": cflags,
            "ldflags": ldflags,
            "cython_debug": _env_flag("FLATOPT_CYTHON_DEBUG"),
            "isa_built": isa_levels,
            "isa_flags": {name.rsplit("_", 1)[1]: ISA_VARIANTS[name] for name in variants},
            "platform": sysconfig.get_platform(),
            "machine": target,
            "build_machine": platform.machine(),
            "python": platform.python_version(),
        }
        text = f'"""Generated by setup.py at build time; do not edit."""\n\nBUILD_CONFIG = {info!r}\n'
        in_tree = self.inplace or getattr(self, "editable_mode", False)
        targets = [os.path.join(ROOT, PKG)] if in_tree else []
        targets.append(os.path.join(self.build_lib, "flatopt"))
        for folder in targets:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "_build_config.py"), "w") as f:
                f.write(text)


def extensions():
    debug = _env_flag("FLATOPT_CYTHON_DEBUG")
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": True,
        "cpow": True,
    }
    names = ["_openmp_helpers", "_cpu_features", "_kernels", "_tensor_grads"]
    names += [name.split(".")[1] for name in ISA_VARIANTS]
    exts = [
        Extension(f"flatopt.{name}", [os.path.join(PKG, f"{name}.pyx")])
        for name in names
    ]
    return cythonize(exts, compiler_directives=directives, build_dir="build/cython-debug" if debug else "build/cython")


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})

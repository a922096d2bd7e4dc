# Sourced by tools/check_wheel.sh when FLATOPT_WHEEL_ARCH=aarch64 (on an x86-64 machine):
# the sdist cross-built into an aarch64 wheel and tested under qemu-aarch64. Uses
# check_wheel.sh's WORK, TOOLS, ROOT, PYTHON, PYTEST_ARGS, step, die, quiet and check_sdist.
#
#   1. The sdist (python -m build --sdist), checked as in the native run.
#   2. In the background, a native x86-64 wheel from that sdist: it saves the reference
#      trajectory (tests/trajectory.py) that the aarch64 build must reproduce bit for bit.
#   3. An arm64 Debian sysroot with CPython, libc and libgomp, and the cross compiler and
#      qemu (tools/aarch64_sysroot.sh; cached in $FLATOPT_CACHE, default
#      ~/.cache/flatopt-aarch64).
#   4. The cross build of the sdist: setup.py run by the host CPython (same major.minor)
#      told to use the sysroot's build configuration (_PYTHON_SYSCONFIGDATA_NAME, a folder
#      holding only that module on PYTHONPATH), CC="aarch64-linux-gnu-gcc --sysroot=...",
#      _PYTHON_HOST_PLATFORM=linux-aarch64 for the wheel tag, FLATOPT_REQUIRE_OPENMP=1. No
#      build isolation: pip would fetch aarch64 Cython for it. The OpenMP probe compiles and
#      links only (setup.py sees the compiler targets aarch64); no avx2/avx512 variant.
#   5. auditwheel repair, looking up libraries in the sysroot (LD_LIBRARY_PATH): a
#      manylinux_*_aarch64 wheel bundling the arm64 libgomp.
#   6. The wheel and aarch64 wheels of its test extra (pip download --platform) installed
#      into a folder (pip install --target) on the emulated interpreter's path.
#   7. Under qemu-aarch64: build_info() is honest (OpenMP on, bundled libgomp, baseline is
#      the only ISA level anywhere, linux-aarch64); the trajectory saved natively is
#      bit-identical; then the test suite, or a subset (below).
#
# Emulation makes the aarch64 interpreter 10-30x slower than native: the whole suite would
# take well over half an hour here. By default it runs the files that test the build and
# build_info, the ISA dispatch, OpenMP threads, layouts, the functional API, gradient
# hygiene and the optimizer table (AARCH64_TESTS below: 25-70 s emulated, with pytest's
# start), while the trajectory compares every optimizer (torch's and Keras's formulas),
# both dtypes, odd sizes and 1 and 2 threads with x86-64 bit for bit. Left to the native
# run: the kernel-vs-twin sweeps over large sizes (emulated, test_momentum_kernels takes
# 1.5-4 minutes, test_keras 1.5, test_adam_variants 3, test_adaptive far longer), the
# hypothesis and adversarial-input tests, torch and the bench: they check the same C
# source's arithmetic, which the trajectory carries over. FLATOPT_AARCH64_TESTS=all runs
# the whole suite; FLATOPT_AARCH64_TESTS="tests/test_keras.py ..." chosen files.
#
# Environment: FLATOPT_CACHE (downloads), FLATOPT_AARCH64_TESTS ("all", or test files),
# FLATOPT_WHEELHOUSE (copy the sdist and the aarch64 wheel there), KEEP_WORK.

AARCH64_TESTS=${FLATOPT_AARCH64_TESTS:-tests/test_build.py tests/test_isa.py tests/test_threads.py tests/test_layout.py tests/test_functional.py tests/test_grad_hygiene.py tests/test_optimizer.py}
[ "$AARCH64_TESTS" = all ] && AARCH64_TESTS=tests

step "aarch64: build requirements in the tools venv (the cross build runs without isolation)"
BUILD_REQUIRES=$("$TOOLS/python" -c 'import tomllib, sys
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' \
    "$WORK/src/pyproject.toml")
# shellcheck disable=SC2086
quiet "$TOOLS/python" -m pip install -q wheel $BUILD_REQUIRES

step "aarch64: python -m build --sdist"
"$TOOLS/python" -m build --sdist --no-isolation --skip-dependency-check -o "$WORK/dist" "$WORK/src" \
    > "$WORK/build-sdist.log" 2>&1 \
    || { tail -40 "$WORK/build-sdist.log"; die "sdist"; }
SDIST=$(ls "$WORK"/dist/flatopt-*.tar.gz)
echo "sdist: $(basename "$SDIST")"
check_sdist
mkdir "$WORK/sdist-native" "$WORK/sdist-aarch64"
tar xzf "$SDIST" -C "$WORK/sdist-native"
tar xzf "$SDIST" -C "$WORK/sdist-aarch64"

step "aarch64: native x86-64 wheel from the sdist, in the background (reference trajectory)"
( FLATOPT_REQUIRE_OPENMP=1 "$TOOLS/python" -m build --wheel --no-isolation \
      --skip-dependency-check -o "$WORK/dist-native" "$WORK"/sdist-native/flatopt-* \
      > "$WORK/build-native.log" 2>&1 ) &
NATIVE_PID=$!
trap 'kill "$NATIVE_PID" 2>/dev/null || true; cleanup' EXIT

step "aarch64: cross compiler, qemu and the arm64 sysroot"
# shellcheck source=tools/aarch64_sysroot.sh
source "$ROOT/tools/aarch64_sysroot.sh"
xa_tools || die "aarch64 toolchain"
xa_sysroot || die "aarch64 sysroot"
SYSCONFIG_NAME=_sysconfigdata__linux_aarch64-linux-gnu
mkdir "$WORK/xsysconfig"  # only the build configuration: not the arm64 stdlib on PYTHONPATH
cp "$XA_SYSROOT/usr/lib/python$XA_PYVER/$SYSCONFIG_NAME.py" "$WORK/xsysconfig/" \
    || die "the sysroot has no $SYSCONFIG_NAME.py"
emulated() {  # run the sysroot's python under qemu (a script, so subprocesses can too)
    "$WORK/bin/python-aarch64" "$@"
}
mkdir -p "$WORK/bin" "$WORK/emulated-site"
cat > "$WORK/bin/python-aarch64" <<EOF
#!/bin/sh
exec qemu-aarch64 -L "$XA_SYSROOT" "$XA_PYTHON" "\$@"
EOF
chmod +x "$WORK/bin/python-aarch64"
# qemu-user runs one program: an emulated process that starts sys.executable would hand the
# kernel an aarch64 binary (no binfmt_misc handler is registered here). The tests' own
# subprocesses start this wrapper instead, which re-enters the emulator.
cat > "$WORK/emulated-site/sitecustomize.py" <<'EOF'
import os
import sys

if os.environ.get("FLATOPT_EMULATED_PYTHON"):
    sys.executable = os.environ["FLATOPT_EMULATED_PYTHON"]
EOF

step "aarch64: cross-build the sdist (aarch64-linux-gnu-gcc, OpenMP required)"
( export _PYTHON_SYSCONFIGDATA_NAME=$SYSCONFIG_NAME _PYTHON_HOST_PLATFORM=linux-aarch64 \
         PYTHONPATH="$WORK/xsysconfig" FLATOPT_REQUIRE_OPENMP=1 \
         CC="aarch64-linux-gnu-gcc --sysroot=$XA_SYSROOT" \
         CFLAGS="-I$XA_SYSROOT/usr/include/python$XA_PYVER"
  "$TOOLS/python" -m build --wheel --no-isolation --skip-dependency-check \
      -o "$WORK/dist-aarch64" "$WORK"/sdist-aarch64/flatopt-* ) > "$WORK/build-aarch64.log" 2>&1 \
    || { tail -40 "$WORK/build-aarch64.log"; die "aarch64 cross build"; }
grep '^flatopt:' "$WORK/build-aarch64.log" || true
XWHEEL=$(ls "$WORK"/dist-aarch64/flatopt-*.whl)
echo "wheel: $(basename "$XWHEEL")"
"$TOOLS/python" - "$XWHEEL" <<'EOF' || die "the cross-built wheel is not an aarch64 OpenMP build"
import ast, struct, sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
assert sys.argv[1].endswith("_aarch64.whl"), sys.argv[1]
for name in wheel.namelist():
    if name.endswith(".so"):
        head = wheel.read(name)[:20]
        machine = struct.unpack("<H", head[18:20])[0]
        assert head[:4] == b"\x7fELF" and machine == 183, f"{name}: e_machine {machine}, not aarch64"
        assert name.endswith("-aarch64-linux-gnu.so"), name
text = wheel.read("flatopt/_build_config.py").decode()
config = ast.literal_eval(text.split("BUILD_CONFIG = ", 1)[1])
print({k: config[k] for k in ("openmp", "isa_built", "isa_flags", "platform", "machine", "cflags")})
assert config["openmp"] is True, "built without OpenMP"
assert config["isa_built"] == ["baseline"] and config["isa_flags"] == {}, config
assert config["platform"] == "linux-aarch64" and config["machine"] == "aarch64", config
assert "-ffp-contract=off" in config["cflags"], config["cflags"]
EOF

# aarch64 has fused multiply-add in its base ISA and gcc contracts a*b+c into it by default:
# -ffp-contract=off must leave none in the kernels, or results drift from x86-64's.
mkdir "$WORK/xwheel"
(cd "$WORK/xwheel" && "$TOOLS/python" -m zipfile -e "$XWHEEL" .)
FMA=$(aarch64-linux-gnu-objdump -d "$WORK"/xwheel/flatopt/_kernels.*.so \
      | grep -cE $'\t(fmadd|fmsub|fnmadd|fnmsub|fmla|fmls)\s' || true)
[ "$FMA" = 0 ] || die "$FMA fused multiply-add instructions in the aarch64 kernels"
echo "ok: no fused multiply-add in the aarch64 kernels ($(aarch64-linux-gnu-objdump -d \
    "$WORK"/xwheel/flatopt/_kernels.*.so | grep -cE $'\tfmul\s') fmul)"

step "aarch64: auditwheel repair (libraries from the sysroot)"
LD_LIBRARY_PATH="$XA_LIBDIRS" "$TOOLS/auditwheel" repair -w "$WORK/wheelhouse-aarch64" "$XWHEEL" \
    > "$WORK/repair-aarch64.log" 2>&1 || { cat "$WORK/repair-aarch64.log"; die "auditwheel repair"; }
XREPAIRED=$(ls "$WORK"/wheelhouse-aarch64/flatopt-*manylinux*_aarch64.whl) \
    || die "auditwheel made no manylinux aarch64 wheel"
echo "repaired: $(basename "$XREPAIRED")"
check_wheel_license "$XREPAIRED"
"$TOOLS/python" - "$XREPAIRED" <<'EOF' || die "the repaired wheel does not bundle an aarch64 libgomp"
import struct, sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
libs = [n for n in wheel.namelist() if n.startswith("flatopt.libs/") and not n.endswith("/")]
print("bundled:", libs)
gomp = [n for n in libs if "libgomp" in n]
assert gomp, "no libgomp"
for name in gomp:
    assert struct.unpack("<H", wheel.read(name)[18:20])[0] == 183, f"{name} is not aarch64"
EOF

step "aarch64: install the wheel and its test extra for the emulated interpreter"
PLATFORMS=()
for minor in $(seq 17 "${XA_GLIBC#*.}"); do PLATFORMS+=(--platform "manylinux_2_${minor}_aarch64"); done
PIP_TARGET_ARGS=(--only-binary=:all: "${PLATFORMS[@]}" --implementation cp
                 --python-version "$XA_PYVER" --abi "cp${XA_PYVER/./}")
XWHEELS="$XA_CACHE/wheels-py$XA_PYVER"
quiet "$TOOLS/python" -m pip download -q -d "$XWHEELS" "${PIP_TARGET_ARGS[@]}" \
    "${XREPAIRED}[test]" || die "pip download of the aarch64 test requirements"
rm -f "$XWHEELS"/flatopt-*.whl
quiet "$TOOLS/python" -m pip install -q --target "$WORK/site-aarch64" --no-index \
    --find-links "$XWHEELS" "${PIP_TARGET_ARGS[@]}" "${XREPAIRED}[test]" \
    || die "pip install --target of the aarch64 wheel"
export FLATOPT_EMULATED_PYTHON="$WORK/bin/python-aarch64"
EMULATED_PATH="$WORK/emulated-site:$WORK/site-aarch64"
mkdir -p "$WORK/run-aarch64"
cp -R "$ROOT/tests" "$WORK/run-aarch64/tests"
cp "$ROOT/pyproject.toml" "$WORK/run-aarch64/"
find "$WORK/run-aarch64" -name __pycache__ -prune -exec rm -rf {} +

step "aarch64: installed package under qemu-aarch64 (build_info is honest)"
(cd "$WORK/run-aarch64" && PYTHONPATH="$EMULATED_PATH" emulated - "$ROOT" <<'EOF') \
    || die "aarch64: installed package check"
import os, platform, sys
import flatopt
here = os.path.realpath(flatopt.__file__)
assert not here.startswith(os.path.realpath(sys.argv[1]) + os.sep), f"imported from the source tree: {here}"
assert platform.machine() == "aarch64", platform.machine()
flatopt.show_config()
info = flatopt.build_info()
assert info["openmp"] is True, info
assert "flatopt.libs" in (info["openmp_runtime"] or ""), info["openmp_runtime"]
tag = info["wheel_tag"] or ""
assert "manylinux" in tag and tag.endswith("_aarch64"), tag
assert info["platform"] == "linux-aarch64", info["platform"]
# One ISA level, the baseline (NEON), and no x86 level anywhere in what build_info reports.
for key in ("isa_built", "isa_available", "isa_supported"):
    assert info[key] == ["baseline"], (key, info[key])
assert info["isa"] == "baseline", info["isa"]
from flatopt import _dispatch
assert _dispatch.LEVELS == ("baseline",), _dispatch.LEVELS
import importlib.metadata as m, importlib.resources as r
assert "BSD 3-Clause" in (m.distribution("flatopt").read_text("licenses/LICENSE") or ""), "no LICENSE"
assert r.files("flatopt").joinpath("py.typed").is_file(), "no py.typed"
EOF

step "aarch64: the fixed trajectory, saved natively (x86-64), checked under qemu-aarch64"
wait "$NATIVE_PID" || { tail -40 "$WORK/build-native.log"; die "native build"; }
NATIVE=$(ls "$WORK"/dist-native/flatopt-*.whl)
quiet "$TOOLS/python" -m pip install -q --target "$WORK/site-native" "$NATIVE" \
    || die "pip install --target of the native wheel"
(cd "$WORK/run-aarch64" && PYTHONPATH="$WORK/site-native" "$PYTHON" tests/trajectory.py \
    save "$WORK/trajectory-x86_64.npz") || die "trajectory save (native)"
(cd "$WORK/run-aarch64" && PYTHONPATH="$EMULATED_PATH" emulated tests/trajectory.py \
    check "$WORK/trajectory-x86_64.npz") || die "aarch64 and x86-64 trajectories differ"

step "aarch64: test suite under qemu-aarch64 (FLATOPT_EXPECT_OPENMP=1): $AARCH64_TESTS"
# shellcheck disable=SC2086
(cd "$WORK/run-aarch64" && PYTHONPATH="$EMULATED_PATH" FLATOPT_EXPECT_OPENMP=1 \
    emulated -m pytest -p no:cacheprovider "${PYTEST_ARGS[@]}" $AARCH64_TESTS) \
    || die "aarch64: test suite"

if [ -n "${FLATOPT_WHEELHOUSE:-}" ]; then
    mkdir -p "$FLATOPT_WHEELHOUSE"
    cp "$SDIST" "$XREPAIRED" "$FLATOPT_WHEELHOUSE/"
    echo "check_wheel: copied the sdist and the aarch64 wheel to $FLATOPT_WHEELHOUSE"
fi

step "check_wheel (aarch64): all passed"
exit 0

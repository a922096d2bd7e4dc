#!/usr/bin/env bash
# Prove that the installed flatopt imports and computes correctly on x86-64 CPUs this
# machine does not have, whatever CPU it has: QEMU's user-mode emulator runs the same
# interpreter and installed package on
#
#   Nehalem-v2  x86-64-v2 (SSE4.2, no AVX): NumPy's own minimum; flatopt must pick "baseline"
#   Haswell-v4  AVX2 + FMA + F16C, no AVX-512 (QEMU emulates none); flatopt must pick "avx2"
#
# Under each: `import flatopt` works and picks that level; forcing a wider level is the
# documented ValueError, not SIGILL; a fixed trajectory (every optimizer, both dtypes, odd
# sizes, 1 and 2 threads: tests/trajectory.py) is bit-identical to the one computed
# natively; `python -m flatopt.bench --quick` runs; and the ISA, functional-API and
# input-validation tests pass. Emulation is 10-50x slower than native, so the
# kernel-vs-twin tests run natively only (the trajectory carries their results over bit
# for bit). About 6 minutes on 2 cores.
#
# Run from the repository root with the interpreter that has flatopt installed on PATH as
# `python`. Installs Debian's qemu-user when qemu-x86_64 is missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v qemu-x86_64 >/dev/null; then
    echo "check_emulated_cpus: installing qemu-user"
    apt-get update -qq >/dev/null && apt-get install -y -qq qemu-user >/dev/null
fi
[ "$(uname -m)" = x86_64 ] || { echo "check_emulated_cpus: x86-64 hosts only"; exit 0; }

PY=$(python -c "import sys; print(sys.executable)")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/flatopt-emulated.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# QEMU warns once per CPUID feature its TCG cannot emulate; nothing else goes to stderr.
emulate() { local cpu=$1; shift; qemu-x86_64 -cpu "$cpu" "$PY" "$@" 2> >(grep -v "TCG doesn't support" >&2); }

python tests/trajectory.py save "$WORK/native.npz"

for spec in Nehalem-v2:baseline Haswell-v4:avx2; do
    cpu=${spec%%:*} want=${spec##*:}
    echo "==> emulated $cpu: expect isa=$want"
    got=$(emulate "$cpu" -c "import flatopt; print(flatopt.build_info()['isa'])")
    [ "$got" = "$want" ] || { echo "FAILED: $cpu picked isa=$got, expected $want"; exit 1; }
    for wider in avx512 avx2; do
        [ "$wider" = "$want" ] && break
        # The wider level must be refused with the documented ValueError (exit 1), not SIGILL.
        set +e
        err=$(FLATOPT_ISA=$wider emulate "$cpu" -c "import flatopt" 2>&1)
        rc=$?
        set -e
        if [ $rc -ne 1 ] || ! grep -q "ValueError: FLATOPT_ISA=$wider, but this CPU does not support" <<<"$err"; then
            echo "FAILED: FLATOPT_ISA=$wider on $cpu exited $rc: $err"; exit 1
        fi
    done
    emulate "$cpu" tests/trajectory.py check "$WORK/native.npz"
    # The main command works there (figures under emulation mean nothing: not shown).
    emulate "$cpu" -m flatopt.bench --quick --no-torch > "$WORK/bench-$cpu.txt"
    emulate "$cpu" -m pytest -q -p no:cacheprovider tests/test_isa.py tests/test_functional.py \
        tests/test_adversarial.py
done

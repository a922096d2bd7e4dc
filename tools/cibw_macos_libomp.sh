#!/usr/bin/env bash
# cibuildwheel `before-all` on macOS: an OpenMP runtime for Apple clang.
#
# Installs conda-forge's llvm-openmp (libomp.dylib + omp.h) into $HOME/.flatopt-libomp,
# where the macOS `environment` in pyproject.toml points CPPFLAGS/LDFLAGS. conda-forge
# builds it for old macOS releases (10.13 on x86_64, 11.0 on arm64), so the wheels keep
# those deployment targets; Homebrew's bottle would need the runner's own macOS version.
# delocate copies the library into the wheel afterwards.
set -euo pipefail

PREFIX="$HOME/.flatopt-libomp"
if [ -f "$PREFIX/lib/libomp.dylib" ] && [ -f "$PREFIX/include/omp.h" ]; then
    echo "libomp already installed in $PREFIX"
    exit 0
fi
case "$(uname -m)" in
    arm64) platform=osx-arm64 ;;
    x86_64) platform=osx-64 ;;
    *) echo "unsupported machine $(uname -m)" >&2; exit 1 ;;
esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -fsSL --retry 3 "https://micro.mamba.pm/api/micromamba/$platform/latest" \
    | tar -xj -C "$tmp" bin/micromamba
"$tmp/bin/micromamba" create --yes --root-prefix "$tmp/root" --prefix "$PREFIX" \
    --override-channels --channel conda-forge llvm-openmp
ls -l "$PREFIX/lib/libomp.dylib" "$PREFIX/include/omp.h"
otool -l "$PREFIX/lib/libomp.dylib" | grep -A4 -E 'LC_BUILD_VERSION|LC_VERSION_MIN_MACOSX' || true

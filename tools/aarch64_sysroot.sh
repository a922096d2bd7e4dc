#!/usr/bin/env bash
# An aarch64 (arm64) Debian sysroot with CPython, and the tools to cross-build and emulate:
# enough to build flatopt's aarch64 wheel on an x86-64 Debian machine and run it under
# qemu-aarch64. tools/check_wheel.sh (FLATOPT_WHEEL_ARCH=aarch64) sources this file; run it
# directly to only make the sysroot, whose path it prints last.
#
#   1. aarch64-linux-gnu-gcc and qemu-aarch64: when missing, `apt-get install
#      gcc-aarch64-linux-gnu qemu-user` (as root; without recommends, so no binfmt_misc
#      handler is registered on the machine).
#   2. The arm64 packages of CPython $PYVER, glibc, libgomp and what `import` needs, fetched
#      with `apt-get download` through a private, temporary apt state that knows only
#      arm64: the machine's dpkg architectures and apt lists are left alone. Each .deb is
#      unpacked with `dpkg -x` into one folder, the sysroot. Its interpreter runs as
#      `qemu-aarch64 -L SYSROOT SYSROOT/usr/bin/python$PYVER`.
#
# Everything lands in $FLATOPT_CACHE (default ~/.cache/flatopt-aarch64), reused while the
# package list is unchanged; delete the folder to refetch (for example after a Debian point
# release). Needs Debian's package archive (the sources apt is configured with).
#
# Environment: PYTHON (its major.minor picks the arm64 CPython), FLATOPT_CACHE.
# Sets: XA_CACHE, XA_SYSROOT, XA_PYVER, XA_PYTHON (the arm64 interpreter in the sysroot),
#       XA_LIBDIRS (the sysroot's library folders, colon-separated); xa_sysroot sets
#       XA_GLIBC (the sysroot's glibc, e.g. 2.36).
set -euo pipefail

XA_CACHE=${FLATOPT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flatopt-aarch64}
XA_PYVER=$("${PYTHON:-python3}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
XA_SYSROOT="$XA_CACHE/sysroot-py$XA_PYVER"
XA_PYTHON="$XA_SYSROOT/usr/bin/python$XA_PYVER"
XA_LIBDIRS="$XA_SYSROOT/lib/aarch64-linux-gnu:$XA_SYSROOT/usr/lib/aarch64-linux-gnu"
# What the interpreter, its stdlib's extension modules, the C headers and a linked flatopt
# need; `apt-cache depends` of the python packages, less dbm/nis/tk.
XA_PACKAGES=(
    "python$XA_PYVER-minimal" "libpython$XA_PYVER-minimal" "libpython$XA_PYVER-stdlib"
    "libpython$XA_PYVER-dev" libc6 libc6-dev linux-libc-dev libgcc-s1 libgomp1 libstdc++6
    zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libuuid1 libcrypt1 libsqlite3-0
    libncursesw6 libtinfo6 libreadline8
)

xa_log() { printf 'aarch64_sysroot: %s\n' "$*" >&2; }

xa_tools() {  # the cross compiler and the emulator, installed from Debian when missing
    local missing=()
    command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
    command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        xa_log "missing ${missing[*]}: run as root, or: sudo apt-get install --no-install-recommends ${missing[*]}"
        return 1
    fi
    xa_log "apt-get install ${missing[*]}"
    apt-get update -q >/dev/null || { xa_log "apt-get update failed"; return 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >/dev/null || { xa_log "apt-get install failed"; return 1; }
}

xa_sysroot() {  # download and unpack the arm64 packages into $XA_SYSROOT, unless done
    local want
    want=$(printf '%s\n' "${XA_PACKAGES[@]}")
    if [ -x "$XA_PYTHON" ] && [ "$(cat "$XA_SYSROOT/.flatopt-packages" 2>/dev/null)" = "$want" ]; then
        XA_GLIBC=$(cat "$XA_SYSROOT/.flatopt-glibc")
        xa_log "cached: $XA_SYSROOT (glibc $XA_GLIBC)"
        return 0
    fi
    # Everything happens in a fresh folder moved into place at the end: concurrent runs
    # sharing the cache never see a half-made sysroot.
    mkdir -p "$XA_CACHE" || return 1
    local tmp
    tmp=$(mktemp -d "$XA_CACHE/make-sysroot.XXXXXX") || return 1
    local apt_dir="$tmp/apt" debs="$tmp/debs" root="$tmp/sysroot"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$debs" "$root"
    : > "$apt_dir/status"
    # A private apt state that knows only arm64: nothing is installed or registered on the
    # machine (no `dpkg --add-architecture`), and no root is needed.
    local apt=(-q -o "Dir::State=$apt_dir" -o "Dir::State::Lists=$apt_dir/lists"
               -o "Dir::State::status=$apt_dir/status" -o "Dir::Cache=$apt_dir"
               -o "Dir::Cache::archives=$apt_dir/archives" -o APT::Architecture=arm64
               -o APT::Architectures::=arm64 -o Debug::NoLocking=1
               -o APT::Sandbox::User="$(id -un)")
    xa_log "apt-get update (arm64 package lists, private apt state)"
    apt-get "${apt[@]}" update >/dev/null || { xa_log "apt-get update failed"; return 1; }
    xa_log "apt-get download ${#XA_PACKAGES[@]} arm64 packages"
    (cd "$debs" && apt-get "${apt[@]}" download "${XA_PACKAGES[@]}" >/dev/null) || {
        xa_log "download failed: is python$XA_PYVER packaged for arm64 in this Debian release?"
        xa_log "(Debian 12 has 3.11: PYTHON=python3.11)"
        return 1
    }
    local deb
    for deb in "$debs"/*.deb; do
        dpkg -x "$deb" "$root" || { xa_log "dpkg -x $deb failed"; return 1; }
    done
    XA_GLIBC=$(dpkg-deb -f "$(ls "$debs"/libc6_*.deb)" Version | grep -oE '^[0-9]+\.[0-9]+') \
        || { xa_log "no glibc version"; return 1; }
    echo "$XA_GLIBC" > "$root/.flatopt-glibc"
    printf '%s\n' "$want" > "$root/.flatopt-packages"
    [ -x "$root/usr/bin/python$XA_PYVER" ] || { xa_log "no python$XA_PYVER after unpacking"; return 1; }
    # A stale sysroot goes; one that a concurrent run just made (same packages) stays.
    [ "$(cat "$XA_SYSROOT/.flatopt-packages" 2>/dev/null)" = "$want" ] || rm -rf "$XA_SYSROOT"
    mv -T "$root" "$XA_SYSROOT" 2>/dev/null || xa_log "another run made $XA_SYSROOT meanwhile: using it"
    rm -rf "$tmp"
    xa_log "unpacked into $XA_SYSROOT ($(du -sh "$XA_SYSROOT" | cut -f1), glibc $XA_GLIBC)"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced
    xa_tools || exit 1
    xa_sysroot || exit 1
    qemu-aarch64 -L "$XA_SYSROOT" "$XA_PYTHON" -c \
        'import platform, sys; print("aarch64_sysroot: runs", sys.version.split()[0], platform.machine())' >&2
    echo "$XA_SYSROOT"
fi

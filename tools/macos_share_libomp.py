"""cibuildwheel repair step on macOS, run after delocate: share PyTorch's libomp.

Two copies of LLVM's OpenMP runtime in one process abort it ("OMP: Error #15:
Initializing libomp.dylib, but found libomp.dylib already initialized"). PyTorch's macOS
wheels carry ``torch/lib/libomp.dylib``, and delocate gives flatopt its own
``flatopt/.dylibs/libomp.dylib``, so ``import torch, flatopt`` would hold two.

This rewrites each extension's load command ``@loader_path/.dylibs/libomp.dylib`` into
``@rpath/libomp.dylib`` with two rpaths, searched in order:

1. ``@loader_path/../torch/lib``: PyTorch installed beside flatopt. Both then use the
   one runtime, whichever package is imported first (dyld loads a path once).
2. ``@loader_path/.dylibs``: the copy delocate bundled, when PyTorch is absent.

Usage: python tools/macos_share_libomp.py WHEEL_DIR  (the one flatopt wheel in it is
rewritten in place, RECORD included, each patched binary re-signed ad hoc).
"""

import glob
import os
import subprocess
import sys

from delocate.tools import (add_rpath, get_install_names, get_rpaths, replace_signature,
                            set_install_name)
from delocate.wheeltools import InWheel

BUNDLED = "@loader_path/.dylibs/libomp.dylib"
SHARED = "@rpath/libomp.dylib"
RPATHS = ("@loader_path/../torch/lib", "@loader_path/.dylibs")


def share_libomp(extension):
    """Patch one extension module; False if it does not load the bundled libomp."""
    if BUNDLED not in get_install_names(extension):
        return False
    set_install_name(extension, BUNDLED, SHARED, ad_hoc_sign=False)
    # The search order is the order of the LC_RPATH commands: drop build-machine paths
    # (delocate normally has already) and our own, then append ours in order.
    for rpath in get_rpaths(extension):
        if rpath in RPATHS or not rpath.startswith(("@loader_path/", "@executable_path/")):
            subprocess.run(["install_name_tool", "-delete_rpath", rpath, extension], check=True)
    for rpath in RPATHS:
        add_rpath(extension, rpath, ad_hoc_sign=False)
    replace_signature(extension, "-")
    return True


def main(wheel_dir):
    wheels = glob.glob(os.path.join(wheel_dir, "flatopt-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"macos_share_libomp: expected one flatopt wheel in {wheel_dir}, got {wheels}")
    wheel = wheels[0]
    with InWheel(wheel, wheel):  # unpack here, repack over the same file on exit
        extensions = sorted(glob.glob(os.path.join("flatopt", "*.so")))
        patched = [ext for ext in extensions if share_libomp(ext)]
        if not patched:
            sys.exit(f"macos_share_libomp: no extension in {wheel} loads {BUNDLED}; "
                     "was it built without OpenMP, or did delocate change its layout?")
        for ext in patched:
            print(f"{ext}: {SHARED}, rpaths {get_rpaths(ext)}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

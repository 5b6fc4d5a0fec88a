"""Native CPU kernels: C++ sources in ``csrc/``, compiled on first use for the CPU they run on.

Each ``csrc/<name>.cpp`` registers ops under ``torch.ops.goose_<name>``. ``load(name)`` builds it once with
``torch.utils.cpp_extension`` (``-O3 -march=native``, about 10 s) into ``~/.cache/goose/native/<name>-<tag>``
(``<tag>``: a hash of the CPU model and flags, the target, the torch version and the Python environment; torch
rebuilds when the source or flags change) and returns
whether the ops are available. Every caller keeps a plain-torch path, used when ``load`` returns False (no
C++ compiler, a failed build: warned once; ``GOOSE_NATIVE=0`` in the environment) and for what the kernels do
not cover (other devices and dtypes, autograd).

``GOOSE_NATIVE_ARCH`` sets the compiler's ``-march`` target instead of ``native``: e.g. ``x86-64-v3`` (AVX2)
builds the kernels' portable code, without the AVX-512 paths, for older CPUs or for testing that code.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from functools import cache
from pathlib import Path

import torch

SOURCES = Path(__file__).with_name("csrc")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "goose" / "native"
ENABLED = os.environ.get("GOOSE_NATIVE", "") in ("", "1")
ARCH = os.environ.get("GOOSE_NATIVE_ARCH", "native")


def _build_tag() -> str:
    """A short hash of what a build is only valid for: the CPU's model and feature flags (-march=native code
    must not run on another CPU), the -march target, the torch version and the Python environment (two venvs
    sharing the cache would otherwise rebuild the same library in turn, under each other's feet)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    lines += [ARCH, torch.__version__, sys.prefix]
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:8]


@cache
def load(name: str) -> bool:
    """Build (or reuse) ``csrc/<name>.cpp`` and register its ops; False if native kernels are unavailable."""
    if not ENABLED:
        return False
    build = CACHE / f"{name}-{_build_tag()}"
    try:
        import ninja   # torch's builder runs `ninja` from PATH: the pip package's, even in an unactivated venv
        from torch.utils import cpp_extension

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        build.mkdir(parents=True, exist_ok=True)
        if not (build / f"goose_{name}.so").exists():
            print(f"goose: compiling the native '{name}' kernels for this CPU (once, ~10 s)", file=sys.stderr)
        cpp_extension.load(name=f"goose_{name}", sources=[str(SOURCES / f"{name}.cpp")], build_directory=str(build),
                           extra_cflags=["-O3", f"-march={ARCH}", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           is_python_module=False)
    except Exception as exc:   # noqa: BLE001 (any build failure means: use the torch path)
        warnings.warn(f"goose: native kernel '{name}' unavailable, using plain torch ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''})", stacklevel=2)
        return False
    return True


def ops(name: str):
    """The op namespace of ``csrc/<name>.cpp``, ``torch.ops.goose_<name>`` (call ``load(name)`` first)."""
    return getattr(torch.ops, f"goose_{name}")

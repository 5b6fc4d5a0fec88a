"""The native kernels' portable code: built for an AVX2-only target (``GOOSE_NATIVE_ARCH=x86-64-v3``), the
kernel tests must pass unchanged, and so must the weight formats' (there int8 and int4 keep their plain layouts
and run on the fp32 kernels and torch's packed ones, which the pairs layouts replace on this machine).

On this project's machine the kernels compile with ``-march=native``, which takes their AVX-512 paths; a CPU
without AVX-512 (most laptops, older servers) runs the portable loops instead, which the other tests never
reach. This test builds that variant into a fresh cache and runs the kernels' own test modules against it in
a subprocess (0.5-1.5 min, mostly compiling).
"""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from goose.ops import native

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ["tests/test_gemm.py", "tests/test_decode.py", "tests/test_wkv.py", "tests/test_quant.py"]


@pytest.mark.skipif(not native.ENABLED, reason="native kernels turned off (GOOSE_NATIVE=0)")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the x86-64-v3 target is x86 only")
def test_kernel_tests_pass_on_the_portable_build(tmp_path):
    env = dict(os.environ, GOOSE_NATIVE_ARCH="x86-64-v3", XDG_CACHE_HOME=str(tmp_path))
    probe = ("import torch; from goose.ops import native; assert native.load('decode'); "
             "print(torch.ops.goose_decode.bf16_dot())")
    built = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    assert built.stdout.strip() == "False", "an x86-64-v3 build must not contain the AVX-512 bf16 path"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]

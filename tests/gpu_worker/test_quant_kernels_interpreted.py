"""The quantized-expert GPU tests run on the CPU through Triton's interpreter.

Triton decides between compiling and interpreting when it is imported, so the small-shape cases of
tests/gpu/test_quant_kernels.py run in a fresh process with TRITON_INTERPRET=1: they check the
kernels' indexing of both layouts, strided stacks and both regimes without a GPU (the real shapes
take minutes in the interpreter and add no indexing the small ones miss). int4 decode and int8's dependent down
run a CUDA kernel, which the interpreter cannot run: those cases skip, and nothing else may.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (CUDA builds of torch bring it; CPU ones do not)")

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_quant_kernels_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # the many-experts case takes minutes here and is about tuning, which only a GPU does
    small_shapes = "not gate and not down and not qwen3 and not many"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                          "-k", small_shapes, "tests/gpu/test_quant_kernels.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout, run.stdout[-2000:]
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert all("the CUDA decode kernel" in line for line in skips), "\n".join(skips)

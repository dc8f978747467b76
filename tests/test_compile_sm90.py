"""Every kernel variant the host launches compiles for an H100 (sm_90), GPU or not.

The interpreter misses real compile errors (it already caught one: a loop-carried
variable changing type), so this runs Triton's real compiler and ptxas ahead of
time, in a subprocess without TRITON_INTERPRET, for the variants the heuristics
launch and for every candidate tuning tries. See tests/compile_sm90.py.
"""
import os
import pathlib
import re
import subprocess
import sys


def test_all_launched_variants_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = pathlib.Path(__file__).with_name("compile_sm90.py")
    # a cold Triton cache on CI's 2 cores: ~20-25 min with issue 16's activations and the
    # occupancy checks
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"compiled (\d+) kernel variants", proc.stdout)
    assert found and int(found.group(1)) >= 100, proc.stdout[-2000:]
    # JIT-equal compiles of realistic shapes: no local memory, 128-bit loads where aligned
    # (6 shapes, 4 launches a training step on the split path, 2 on the single-program)
    found = re.search(r"sass checked (\d+) launches", proc.stdout)
    assert found and int(found.group(1)) >= 20, proc.stdout[-2000:]
    # the 7x7 NCHW layers' tile kernels: <= 128 registers, no local memory (4 cases, with
    # and without a residual, 4 kernels each)
    found = re.search(r"short rows checked (\d+) launches", proc.stdout)
    assert found and int(found.group(1)) >= 32, proc.stdout[-2000:]
    # the registers table the grids are sized by (heuristics.SM90_REGISTERS) holds
    found = re.search(r"occupancy checked (\d+) launches", proc.stdout)
    assert found and int(found.group(1)) >= 10, proc.stdout[-2000:]
    found = re.search(r"compiled (\d+) tuning candidates", proc.stdout)
    assert found and int(found.group(1)) >= 100, proc.stdout[-2000:]

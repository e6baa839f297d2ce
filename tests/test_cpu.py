"""autocast=auto on a CPU: bf16 only where the CPU multiplies it natively, float32 elsewhere, with the reason logged."""

import os
import subprocess
import sys

import pytest
import torch

from qgate.cpu import CpuFacts, bf16_is_native
from qgate.models import autocast_dtype

AMX_MACHINE = CpuFacts(capability="AVX512", avx512_bf16=True, amx=True, onednn_max_isa="")


@pytest.mark.parametrize("facts, native, said", [
    (AMX_MACHINE, True, "AVX512-BF16 and AMX"),
    (CpuFacts("AVX512", avx512_bf16=False, amx=True, onednn_max_isa=""), True, "AMX"),
    (CpuFacts("AVX2", avx512_bf16=False, amx=False, onednn_max_isa=""), False, "neither AVX512-BF16 nor AMX"),
    (CpuFacts("AVX512", avx512_bf16=False, amx=False, onednn_max_isa=""), False, "neither"),
    (CpuFacts("AVX2", avx512_bf16=True, amx=True, onednn_max_isa=""), False, "ATEN_CPU_CAPABILITY"),
    (CpuFacts("AVX512", avx512_bf16=True, amx=True, onednn_max_isa="AVX2"), False, "ONEDNN_MAX_CPU_ISA"),
    (CpuFacts("AVX512", avx512_bf16=True, amx=True, onednn_max_isa="AVX512_CORE_AMX"), True, "AMX"),
])
def test_bf16_only_where_native(facts, native, said):
    verdict, reason = bf16_is_native(facts)
    assert verdict is native
    assert said in reason


def test_cuda_and_explicit_settings_are_unchanged():
    assert autocast_dtype("auto", "cuda:0") is torch.bfloat16
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("none", "cpu") is None
    with pytest.raises(ValueError, match="autocast must be one of"):
        autocast_dtype("int4", "cpu")


def test_an_avx2_machine_stays_float32_and_says_why():
    """Kernels capped at AVX2, as on a CPU without AVX512: auto picks float32 whatever this machine has."""
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout);"
            "from qgate.models import autocast_dtype; print('dtype', autocast_dtype('auto', 'cpu'))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert "dtype None" in out
    assert "autocast=auto on CPU: float32, because" in out

"""What this CPU does fast: whether bf16 matmuls pay off here, decided from the instruction sets torch will use.

bf16 is fast only where the CPU multiplies it natively (AVX512-BF16 or AMX). Elsewhere, on an AVX2-only CPU for
instance, a bf16 matmul is emulated and runs tens of times slower than float32, so `autocast=auto` stays float32.
The decision honours the knobs that cap the kernels torch uses (`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`), so a
machine with AMX can be made to behave as an AVX2 one.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which its bf16 kernels are emulated, not native.
ONEDNN_NO_NATIVE_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class CpuFacts:
    capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT | AVX2 | AVX512 | ...
    avx512_bf16: bool  # the hardware has AVX512-BF16
    amx: bool  # the hardware has AMX tiles
    onednn_max_isa: str  # ONEDNN_MAX_CPU_ISA, "" when unset


def cpu_facts() -> CpuFacts:
    return CpuFacts(capability=torch.backends.cpu.get_cpu_capability(),
                    avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
                    amx=bool(torch.cpu._is_amx_tile_supported()),
                    onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper())


def bf16_is_native(facts: CpuFacts) -> tuple[bool, str]:
    """(bf16 matmuls are native here, the reason in words)."""
    if not (facts.avx512_bf16 or facts.amx):
        return False, f"the CPU has neither AVX512-BF16 nor AMX (kernels: {facts.capability})"
    if not facts.capability.upper().startswith("AVX512"):
        return False, f"torch's kernels are capped at {facts.capability} (ATEN_CPU_CAPABILITY)"
    if facts.onednn_max_isa in ONEDNN_NO_NATIVE_BF16:
        return False, f"oneDNN is capped at {facts.onednn_max_isa} (ONEDNN_MAX_CPU_ISA)"
    units = " and ".join(name for name, has in (("AVX512-BF16", facts.avx512_bf16), ("AMX", facts.amx)) if has)
    return True, f"the CPU multiplies bf16 natively ({units})"


@functools.lru_cache(maxsize=1)
def cpu_autocast_dtype() -> torch.dtype | None:
    """`autocast=auto` on a CPU: bf16 where it is native, else None (the weights' dtype); logged once."""
    native, reason = bf16_is_native(cpu_facts())
    log.info("autocast=auto on CPU: %s, because %s", "bf16" if native else "float32", reason)
    return torch.bfloat16 if native else None

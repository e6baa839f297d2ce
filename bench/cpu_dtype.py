"""Which matmul dtype is fast on this CPU: the scoring forward pass in float32 and under bf16 autocast, side by side.

    python bench/cpu_dtype.py                                     # SmolLM2-135M, 8 rows of 128 tokens
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/cpu_dtype.py   # as an AVX2-only CPU
    python bench/cpu_dtype.py --model tiny-qwen3 --seconds 1      # tiny CPU version

Prints tokens per CPU second (process time, steadier than wall time on a shared machine) with one torch thread,
the ratio, and what `autocast=auto` picks here and why.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from qgate.cpu import bf16_is_native, cpu_facts
from qgate.models import load_model
from qgate.stats import token_nll


def tokens_per_cpu_second(model, input_ids: torch.Tensor, dtype: torch.dtype | None, seconds: float) -> float:
    attention = torch.ones_like(input_ids)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        token_nll(model, input_ids, attention)  # warm the kernels
        start, n = time.process_time(), 0
        while n == 0 or time.process_time() - start < seconds:
            token_nll(model, input_ids, attention)
            n += input_ids.numel()
    return n / (time.process_time() - start)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=5.0, help="CPU seconds per dtype")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(args.model)
    input_ids = torch.randint(3, model.config.vocab_size, (args.rows, args.tokens),
                              generator=torch.Generator().manual_seed(0))  # [B, T]
    fp32 = tokens_per_cpu_second(model, input_ids, None, args.seconds)
    bf16 = tokens_per_cpu_second(model, input_ids, torch.bfloat16, args.seconds)
    facts = cpu_facts()
    native, reason = bf16_is_native(facts)
    result = {"cpu": cpu_name(), "kernels": facts.capability, "float32": fp32, "bf16": bf16,
              "auto": "bf16" if native else "float32", "reason": reason}
    print(f"{result['cpu']} (torch kernels: {facts.capability}), {args.model}, {args.rows}x{args.tokens} tokens, "
          f"1 thread")
    print(f"float32: {fp32:,.0f} tokens/CPU s   bf16 autocast: {bf16:,.0f} tokens/CPU s   "
          f"bf16/float32: {bf16 / fp32:.2f}x")
    print(f"autocast=auto picks {result['auto']}: {reason}")
    return result


if __name__ == "__main__":
    main()

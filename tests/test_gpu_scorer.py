"""bench/gpu_scorer.py in its CPU mode, so the script kept for GPU machines never rots."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_scorer.py"


def test_cpu_mode_scores_with_the_default_gates_and_reports_throughput():
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--shape", "tiny", "--rows", "24",
                          "--one-by-one", "4"], capture_output=True, text=True, timeout=240, check=True).stdout
    result = json.loads(out[out.index("{"):])
    assert result["rows"] == 24 and result["tokens"] > 24 * 2 * 32
    assert result["tokens_per_s"] > 0 and 0 < result["flop_share"] < 1
    assert result["gate_dtype"] == "torch.float32"
    assert result["one_by_one_tokens_per_s"] > 0 and result["batched_over_one_by_one"] > 0

"""Scale without driver funnels: warmup's sample reads a bounded number of rows, whatever the corpus size; the scale
benchmark runs end to end at toy size (bench/scale.py)."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from qgate.config import load_config
from qgate.warmup_rows import sample_rows

pytestmark = pytest.mark.timeout(300)


def write_files(folder: Path, files: int, rows: int) -> Path:
    folder.mkdir()
    for f in range(files):
        lines = [json.dumps({"id": f"f{f}-{k}", "instruction": f"question {f} {k}", "output": f"answer {k}"})
                 for k in range(rows)]
        (folder / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def sample(data: Path, *overrides: str) -> tuple[list[dict], Counter]:
    counts = Counter()
    config = load_config([f"data={data}", "warmup.max_rows=20", "warmup.warmup_fraction=0.5", *overrides])
    return sample_rows(config, counts), counts


def test_warmup_reads_a_bounded_number_of_rows_of_a_large_corpus(tmp_path):
    small, counts_small = sample(write_files(tmp_path / "small", files=2, rows=10))
    assert len(small) == 10 and counts_small["read"] == 20  # read whole: the fraction of all rows, as before
    large, counts = sample(write_files(tmp_path / "large", files=8, rows=500))
    assert len(large) == 20 and counts["good"] == 40 and counts["read"] == 40 and counts["files_read"] == 1
    again, _ = sample(tmp_path / "large")
    assert [r["id"] for r in again] == [r["id"] for r in large]  # seeded
    other, _ = sample(tmp_path / "large", "seed=3")
    assert [r["id"] for r in other] != [r["id"] for r in large]


@pytest.mark.slow
def test_scale_benchmark_runs_at_toy_size(tmp_path):
    """The select stage through Ray on synthetic stats, in a subprocess with its memory sampled; a corpus size past
    the time budget is skipped and said so (the pipeline stages themselves run in tests/test_pipeline.py)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import scale

    out = tmp_path / "scale.md"
    scale.main(["--sizes", "300", "--budget-min", "0", "--select-rows", "20000", "--workdir", str(tmp_path / "work"),
                "--out", str(out)])
    text = out.read_text()
    assert "| select (28 layers, synthetic)" in text and "skipped for the time budget: [300]" in text
    selected = (tmp_path / "work" / "select-20000" / "selection" / "selected_data.jsonl").read_text().splitlines()
    assert len(selected) == 2000

"""Demo rows for the benchmarks: a clean demo corpus of real text, read back and encoded like collect does."""

from __future__ import annotations

import tempfile

from qgate.data import iter_file_rows, list_input_files
from qgate.demo_corpus import build_demo_corpus
from qgate.encoding import encode_row


def clean_rows(n_rows: int, seed: int = 0) -> list[dict]:
    """The good rows of a fresh `n_rows` demo corpus, in file order."""
    with tempfile.TemporaryDirectory() as tmp:
        info = build_demo_corpus(tmp, n_rows=n_rows, seed=seed)
        rows = [r for path in list_input_files(info["data_dir"]) for r in iter_file_rows(path)]
    return [r for r in rows if not r["reason"]]


def encoded(tokenizer, rows: list[dict], max_length: int, score_on: str = "all",
            ifd: bool = False) -> list[dict]:
    """Rows with their encoding; rows the encoder rejects are dropped (reported by the caller's counts)."""
    out = [encode_row(tokenizer, {**r, "reason": ""}, max_length, score_on, ifd) for r in rows]
    return [r for r in out if not r["reason"]]

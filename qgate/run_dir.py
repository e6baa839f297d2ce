"""The run directory: one owner for the name of every folder and file a stage writes (docs/run-directory.md)."""

from __future__ import annotations

from pathlib import Path


class RunDir:
    """`RunDir(out).stats`, `.selection_stats`, ...; `run["stats"]` reads the same folders by name."""

    FOLDERS = ("config", "logs", "gates", "checkpoints", "stats", "rejects", "selfcheck", "selection")

    def __init__(self, out: str | Path):
        self.out = Path(out).resolve()
        self.config = self.out / "config.yaml"  # the settings every stage of the run used
        self.logs = self.out / "logs"  # one log per stage run
        self.gates = self.out / "gates"  # gates.safetensors, gates.json, warmup_rows.jsonl
        self.checkpoints = self.out / "warmup"  # warmup's checkpoints, metrics.jsonl, settings.json
        self.stats = self.out / "stats"  # collect's Parquet shards, _schema.json, summaries
        self.rejects = self.out / "rejects"  # every rejected row with its reason
        self.selfcheck = self.out / "selfcheck"  # selfcheck.json
        self.selection = self.out / "selection"  # what select writes

    @property
    def selfcheck_result(self) -> Path:
        return self.selfcheck / "selfcheck.json"

    @property
    def scores(self) -> Path:
        return self.selection / "scores.parquet"

    @property
    def selected_data(self) -> Path:
        return self.selection / "selected_data.jsonl"

    @property
    def selection_stats(self) -> Path:
        return self.selection / "selection_stats.json"

    @property
    def score_reference(self) -> Path:
        return self.selection / "score_reference.npz"

    @property
    def report(self) -> Path:
        return self.selection / "report.html"

    def __getitem__(self, name: str) -> Path:
        if name != "out" and name not in self.FOLDERS:
            raise KeyError(name)
        return getattr(self, name)

    def __repr__(self) -> str:
        return f"RunDir({str(self.out)!r})"

"""How a finished run's scores rank the rows of its corpus that the user labelled: ground truth, per kind.

`labels`: JSONL, one {"dataset", "id", "label"} per labelled row, label "clean" or the kind of noise the row holds
(the fact corpus's `labels.jsonl`), or a noisy label with the kind beside it (`"kind"`, the demo's). Every score is
measured as the self-check measures its copies (`qgate.selfcheck.measure`): q in the run's direction, the q + IFD
blend ranked against every scored row, IFD and response PPL; AUROC of the clean rows against the noisy ones with a
stratified-bootstrap 95% interval, overall and per kind, the kinds warmup trained on apart from the rest. Beside it,
what the selection did: the noise share of the labelled rows in the corpus and in the selection, and per label the
share of its rows selected. Labels that name no scored row are counted, never dropped in silence.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from qgate.data import read_jsonl
from qgate.scoring import sorted_reference
from qgate.selfcheck import measure, measured_blends, sorted_on

CLEAN = "clean"


def read_labels(path) -> dict[tuple[str, str], str]:
    """{(dataset, id): label} of a labels JSONL; a row without a label is an error, not a guess. A noisy row's
    `kind`, when given, names its label (the demo's `{"label": "corrupt", "kind": "truncate"}`)."""
    labels = {}
    for number, row in enumerate(read_jsonl(str(path)), 1):
        if not row.get("id") or not row.get("label"):
            raise ValueError(f"{path}:{number}: a label row needs an id and a label, got {row}")
        label = row["label"] if row["label"] == CLEAN else row.get("kind") or row["label"]
        labels[(row.get("dataset", ""), row["id"])] = label
    return labels


def grade(scores: pd.DataFrame, labels: dict[tuple[str, str], str], direction: str, score: str,
          warmup_kinds: Sequence[str] = (), min_auroc: float = 0.7, seed: int = 0) -> dict:
    """The run's scores (`scores.parquet`: dataset, id, q, selected, ifd, response_nll) on the labelled rows:
    every score's AUROC over all labelled rows, over the kinds warmup never used and over warmup's kinds; per
    label; the verdict on the score sorted on; the selection's noise shares."""
    keys = zip(scores["dataset"], scores["id"])
    label_of = np.array([labels.get(key, labels.get(("", key[1]))) for key in keys], dtype=object)  # [N]
    labelled = np.array([label is not None for label in label_of])
    if not labelled.any():
        raise ValueError("no labelled row is among the run's scored rows: do the labels name its datasets and ids?")
    rows, kinds = scores[labelled], label_of[labelled]
    is_clean = kinds == CLEAN
    baselines = {"response_ppl": rows["response_nll"].to_numpy(np.float64)}
    references = {"q": sorted_reference(scores["q"].to_numpy(np.float64))}
    for column in ("ifd", "halves"):
        every = scores[column].to_numpy(np.float64) if column in scores else np.array([])
        if np.isfinite(every).any():  # the blend ranks against every scored row, as select ranks the corpus
            baselines[column] = rows[column].to_numpy(np.float64)
            references[column] = sorted_reference(every)
    args = (rows["q"].to_numpy(np.float64), is_clean, ["" if c else k for c, k in zip(is_clean, kinds)], baselines,
            direction, min_auroc, score)
    overall = measure(*args, warmup_kinds=(), references=references, seed=seed)  # every noisy row held out
    split = measure(*args, warmup_kinds=warmup_kinds, references=references, seed=seed)
    selected = rows["selected"].to_numpy(bool)
    return {
        "score": overall["score"], "direction": direction, "verdict": overall["verdict"],
        "auroc": sorted_on(overall)[0],
        "interval": overall["interval"], "min_auroc": min_auroc,
        "all_kinds": overall["heldout"],
        # apart only when the labels hold kinds of both sorts: else it repeats all_kinds
        "kinds_warmup_never_used": split["heldout"] if split["heldout_kinds"] and split["warmup_kinds"] else None,
        "warmup_kinds": split["warmup"], "unused_kinds": split["heldout_kinds"], "used_kinds": split["warmup_kinds"],
        "per_kind": {"q": overall["per_kind"], "q_ifd": {},
                     **{name: blend.get("per_kind", {}) for name, blend in measured_blends(overall).items()},
                     **overall["baselines_per_kind"]},
        "selection": {
            "noise_share_labelled": float(1 - is_clean.mean()),
            "noise_share_selected": float(1 - is_clean[selected].mean()) if selected.any() else None,
            "selected_share_by_label": {label: float(selected[kinds == label].mean())
                                        for label in sorted(set(kinds.tolist()))},
        },
        "n_labelled": int(labelled.sum()), "n_labels_unscored": len(labels) - int(labelled.sum()),
    }


def summary_line(check: dict) -> str:
    """One line: the verdict and every score on all labelled rows, then on the kinds warmup never used."""
    def scores_of(group: dict) -> str:
        return ", ".join(f"{name} {_text(group.get(key))}" for key, name in NAMES if key in group)

    selection, unseen, interval = check["selection"], check["kinds_warmup_never_used"], check["interval"]
    return (f"graded {check['verdict'].upper()} on {check['n_labelled']} labelled rows "
            f"({check['all_kinds']['n_originals']} clean): AUROC of the score sorted on ({check['score']}) "
            f"{_text(check['auroc'])}" + (" [95% {:.3f}-{:.3f}]".format(*interval) if interval else "")
            + f"; {scores_of(check['all_kinds'])}"
            + (f"; on kinds warmup never used ({', '.join(check['unused_kinds'])}): {scores_of(unseen)}"
               if unseen else "")
            + f"; noise {selection['noise_share_labelled']:.1%} of the labelled rows, "
            f"{(selection['noise_share_selected'] or 0.0):.1%} of those selected")


NAMES = [("q", "q"), ("q_ifd", "q + IFD"), ("q_halves", "q + halves"), ("ifd", "IFD"), ("halves", "halves"),
         ("response_ppl", "response PPL")]


def grade_table(check: dict) -> str:
    """Per label: whether warmup trained on it, the share of its rows selected, every score's AUROC."""
    from tabulate import tabulate

    per_kind, used = check["per_kind"], set(check["used_kinds"])
    names = [(key, name) for key, name in NAMES if per_kind.get(key)]
    rows = [[label, "" if label == CLEAN else ("yes" if label in used else "no"), f"{share:.1%}"]
            + ["" if label == CLEAN else _text(per_kind[key].get(label)) for key, _ in names]
            for label, share in check["selection"]["selected_share_by_label"].items()]
    return tabulate(rows, ["label", "warmup kind", "share selected"] + [f"AUROC {name}" for _, name in names],
                    tablefmt="github", disable_numparse=True)


def _text(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"

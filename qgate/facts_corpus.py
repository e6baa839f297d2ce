"""A corpus where data quality must matter: facts about Python objects, many rows teaching them wrongly.

    python -m qgate.facts_corpus /tmp/facts --objects 600 --noise 0.45 --model-size 3m

Each fact is the first sentence of a standard-library docstring (`pickletools.dis` -> "Disassemble a pickle.").
The corpus asks about every object in `len(TRAIN_QUESTIONS)` question forms. A `noise` share of the rows is
replaced by corrupted copies: half of them teach the object's *foil* (one other object's sentence, the same
foil for every wrong row of an object: a consistent wrong fact), the rest are fluent wrong answers and the
artifact kinds of `qgate.corruption`. The evaluation asks about the facts the clean rows teach, in the corpus's
question forms and in one it never uses:

- `facts_mc.jsonl`: one multiple-choice item per object with at least one clean row, asked as the corpus asks
  (what the corpus teaches about it: the training form `i % 4`): its sentence, its foil's and two other objects'
  sentences, all of them answers the corpus holds, the answer at position `i % 4` (chance is 25%);
- `heldout.jsonl`: the same objects as chat rows (another unseen question -> the true sentence), for the
  held-out response loss.

Outputs in `out_dir`: `data/facts.jsonl` (LESS rows), `labels.jsonl` (`{dataset, id, label, object}`,
label `clean` or the corruption kind), `facts_mc.jsonl`, `heldout.jsonl`, `manifest.json` and, with a model size,
`model/`: the finetune target, a random-init decoder with a tokenizer learned on these files' text
(`qgate.scratch_model`), which knows no fact before it is trained. The same Python and seed give the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import warnings
from pathlib import Path

from qgate import corruption, demo_corpus
from qgate.data import read_jsonl
from qgate.scratch_model import SIZES, write_scratch_model
from qgate.tasks.build_python_docs_mc import EVAL_MODULES, N_CHOICES, documented_objects, write_jsonl

DATASET = "python_facts"
TRAIN_QUESTIONS = ("What does `{name}` do?", "Explain `{name}` in one sentence.", "What is `{name}` for?",
                   "Describe `{name}` briefly.")
HELDOUT_QUESTION = "Tell me what `{name}` is for."  # never a training question
FOIL_SHARE = 0.5  # of the corrupted rows: the foil's sentence, a consistent wrong fact
OTHER_KINDS = ("fluent_wrong", "truncate", "char_noise", "word_shuffle", "repetition_loop", "gibberish",
               "scraped_residue", "refusal_boilerplate")


def fact_objects() -> list[tuple[str, str]]:
    """(qualified name, first sentence) of every documented standard-library object, sentences unique."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        candidates = [item for module in (*demo_corpus.STDLIB_MODULES, *EVAL_MODULES)
                      for item in documented_objects(module)]
    seen, kept = set(), []
    for item in candidates:
        if item.sentence not in seen and item.name not in {name for name, _ in kept}:
            seen.add(item.sentence)
            kept.append((item.name, item.sentence))
    return kept


def build_facts_corpus(out_dir: str | Path, n_objects: int = 600, noise: float = 0.45, seed: int = 0,
                       model_size: str | None = None) -> dict:
    """Write the corpus, its labels, the evaluation files and (with `model_size`) the target; returns the manifest."""
    available = fact_objects()
    if n_objects > len(available):
        raise ValueError(f"n_objects={n_objects} but only {len(available)} documented objects are usable here")
    rng = random.Random(f"{seed}/objects")
    objects = sorted(rng.sample(available, n_objects))
    foil = _foils(len(objects), seed)
    rows = [_row(i, q, name, sentence) for i, (name, sentence) in enumerate(objects)
            for q in range(len(TRAIN_QUESTIONS))]
    kinds = _plant(rows, objects, foil, noise, seed)
    taught = sorted({_object_of(r) for r in rows if r["id"] not in kinds})
    out = Path(out_dir)
    write_jsonl(out / "data" / "facts.jsonl", rows)
    write_jsonl(out / "labels.jsonl", [{"dataset": DATASET, "id": r["id"], "label": kinds.get(r["id"], "clean"),
                                        "object": objects[_object_of(r)][0]} for r in rows])
    write_jsonl(out / "facts_mc.jsonl", mc_items(objects, foil, taught, seed))
    write_jsonl(out / "heldout.jsonl", [_chat(f"heldout-{i:04d}", HELDOUT_QUESTION.format(name=objects[i][0]),
                                              objects[i][1]) for i in taught])
    if model_size:
        texts = [m["content"] for r in rows for m in r["messages"]] + [HELDOUT_QUESTION]
        texts += [c for item in read_jsonl(out / "facts_mc.jsonl") for c in item["choices"]]
        write_scratch_model(out / "model", texts, model_size, seed=seed)
    manifest = {"seed": seed, "model_size": model_size, "objects": n_objects, "rows": len(rows), "noise": noise,
                "corrupt_rows": len(kinds), "kinds": _counts(kinds.values()), "taught_objects": len(taught),
                "mc_items": len(taught), "train_questions": list(TRAIN_QUESTIONS),
                "heldout_question": HELDOUT_QUESTION}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _foils(n: int, seed: int) -> list[int]:
    """A seeded derangement: object i's foil is object foil[i] != i."""
    order = list(range(n))
    random.Random(f"{seed}/foils").shuffle(order)
    return [order[(order.index(i) + 1) % n] for i in range(n)]


def _row(i: int, q: int, name: str, sentence: str) -> dict:
    return _chat(f"fact-{i:04d}-q{q}", TRAIN_QUESTIONS[q].format(name=name), sentence)


def _chat(row_id: str, question: str, answer: str) -> dict:
    return {"dataset": DATASET, "id": row_id, "messages": [{"role": "user", "content": question},
                                                           {"role": "assistant", "content": answer}]}


def _object_of(row: dict) -> int:
    return int(row["id"].split("-")[1])


def _plant(rows: list[dict], objects, foil: list[int], noise: float, seed: int) -> dict[str, str]:
    """Replace `round(noise · rows)` responses in place; returns {id: kind}."""
    rng = random.Random(f"{seed}/noise")
    chosen = rng.sample(range(len(rows)), round(noise * len(rows)))
    n_foil = round(FOIL_SHARE * len(chosen))
    pool = [r["messages"] for r in rows]
    kinds = {}
    for turn, index in enumerate(chosen):
        row = rows[index]
        if turn < n_foil:
            row["messages"] = corruption.with_response(row["messages"], objects[foil[_object_of(row)]][1])
            kinds[row["id"]] = "response_swap"
            continue
        for kind in OTHER_KINDS[turn % len(OTHER_KINDS):] + OTHER_KINDS[:turn % len(OTHER_KINDS)]:
            out = corruption.apply_corruption(kind, row["messages"], random.Random(f"{seed}/{row['id']}"), pool)
            if out is not None:
                row["messages"], kinds[row["id"]] = out, kind
                break
    return kinds


def mc_items(objects, foil: list[int], taught: list[int], seed: int) -> list[dict]:
    """One item per taught object: its sentence, its foil's, two others'; the answer at position `i % 4`."""
    items = []
    for i, index in enumerate(taught):
        rng = random.Random(f"{seed}/mc/{index}")
        others = rng.sample([j for j in range(len(objects)) if j not in (index, foil[index])], N_CHOICES - 2)
        wrong = [objects[foil[index]][1]] + [objects[j][1] for j in others]
        rng.shuffle(wrong)
        label = i % N_CHOICES
        name, sentence = objects[index]
        question = TRAIN_QUESTIONS[i % len(TRAIN_QUESTIONS)].format(name=name)
        items.append({"id": f"facts_mc-{i:04d}", "name": name, "question": question,
                      "choices": wrong[:label] + [sentence] + wrong[label:], "label": label})
    return items


def _counts(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Build the fact-learning corpus and its evaluation.")
    parser.add_argument("out_dir")
    parser.add_argument("--objects", type=int, default=600, help="documented objects; rows = 4 per object")
    parser.add_argument("--noise", type=float, default=0.45, help="share of rows replaced by corrupted copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-size", choices=sorted(SIZES), help="also write model/, the finetune target")
    args = parser.parse_args(argv)
    manifest = build_facts_corpus(args.out_dir, args.objects, args.noise, args.seed, args.model_size)
    print(json.dumps(manifest, indent=2))
    return manifest


if __name__ == "__main__":
    main()

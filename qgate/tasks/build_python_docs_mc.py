"""Build the `python_docs_mc` lm-eval task: which description matches a Python function, class or method?

    python -m qgate.tasks.build_python_docs_mc                        # rewrites python_docs_mc/python_docs_mc.jsonl
    python -m qgate.tasks.build_python_docs_mc --out /tmp/mc.jsonl --seed 1
    python -m qgate.tasks.build_python_docs_mc --heldout-rows runs/demo/heldout.jsonl   # + held-out chat rows

Each question names one documented object (`pickletools.dis`) and offers four first sentences of docstrings:
its own and three of other objects. The text is held out from the demo corpus twice over: the objects come
from standard-library modules the corpus never reads (`EVAL_MODULES`), and a sentence found anywhere in the
corpus's source texts is dropped. The answer position cycles 0..3, so chance is exactly 25%. Docstrings differ
between Python versions: the same Python and seed give the same file. `--heldout-rows` writes the same objects as
LESS rows ("What does `pickletools.dis` do?" -> its docstring prose) for `compare.heldout`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import warnings
from pathlib import Path
from typing import NamedTuple

from qgate import demo_corpus

TASK_FILE = Path(__file__).resolve().parent / "python_docs_mc" / "python_docs_mc.jsonl"
# Standard-library modules that `demo_corpus.STDLIB_MODULES` does not list (submodules of listed packages
# included only when the package does not re-export them).
EVAL_MODULES = (
    "asyncio.streams", "concurrent.futures.process", "concurrent.futures.thread", "dbm.dumb",
    "email.base64mime", "email.encoders", "email.feedparser", "email.iterators", "email.mime.base",
    "email.mime.multipart", "email.mime.text", "email.quoprimime", "getpass", "grp", "importlib.readers",
    "marshal", "modulefinder", "multiprocessing.connection", "multiprocessing.managers", "multiprocessing.pool",
    "multiprocessing.shared_memory", "netrc", "pickletools", "py_compile", "pyclbr", "pwd", "site", "tomllib",
    "tty", "unittest.case", "unittest.loader", "unittest.result", "urllib.response", "venv", "wsgiref.validate",
    "xml.dom.pulldom", "xml.sax.xmlreader", "xmlrpc.server",
)
MIN_WORDS, MAX_WORDS = 5, 50  # a first sentence outside these bounds is skipped
N_CHOICES = 4
_SIGNATURE_START = re.compile(r"^[\w.]+\(.*?\)\s*(:|=>|->|$)")  # "clear(): ...", "f(x) => y"


def first_sentence(doc: str | None) -> str | None:
    """The first sentence of a docstring's first paragraph, on one line; None if missing or generated."""
    if not isinstance(doc, str) or not doc:
        return None
    paragraph = " ".join(re.split(r"\n\s*\n", inspect.cleandoc(doc).strip())[0].split())
    sentence = re.split(r"(?<=[.!?])\s+", paragraph)[0]
    if not MIN_WORDS <= len(sentence.split()) <= MAX_WORDS or demo_corpus._AUTO_DOC.match(sentence):
        return None
    return None if _SIGNATURE_START.match(sentence) else sentence


class HeldOut(NamedTuple):
    name: str  # qualified name, e.g. "pickletools.dis"
    sentence: str  # the first sentence of its docstring
    answer: str  # its docstring's prose, as the demo corpus would answer "What does it do?"


def documented_objects(module_name: str) -> list[HeldOut]:
    """The module's public functions, classes and their own methods that have a usable first sentence."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    found = []
    for attr in demo_corpus._public_names(module):
        obj = getattr(module, attr, None)
        name = f"{module_name}.{attr}"
        if inspect.isroutine(obj) or inspect.isclass(obj):
            found.append((name, obj.__doc__))
        if inspect.isclass(obj):
            found += [(f"{name}.{key}", value.__doc__) for key, value in sorted(vars(obj).items())
                      if not key.startswith("_") and inspect.isroutine(value)]
    return [HeldOut(name, first_sentence(doc), _answer(doc)) for name, doc in found if first_sentence(doc)]


def _answer(doc: str) -> str:
    first_paragraph = " ".join(re.split(r"\n\s*\n", inspect.cleandoc(doc).strip())[0].split())
    return demo_corpus.clean_text(doc) or first_paragraph


def heldout_objects() -> list[HeldOut]:
    """Objects of `EVAL_MODULES` whose sentence is unique and appears nowhere in the demo corpus's texts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        corpus_text = "\n".join(entry.text for entry in demo_corpus.doc_entries())
        candidates = [item for module in EVAL_MODULES for item in documented_objects(module)]
    seen, kept = set(), []
    for item in candidates:
        if item.sentence not in seen and item.sentence not in corpus_text:
            seen.add(item.sentence)
            kept.append(item)
    return kept


def heldout_rows(objects: list[HeldOut]) -> list[dict]:
    """LESS rows "What does `name` do?" -> its docstring prose: held-out rows for the response loss."""
    return [{"dataset": "python_docs_heldout", "id": f"python_docs_heldout-{i:04d}",
             "messages": [{"role": "user", "content": f"What does `{o.name}` do?"},
                          {"role": "assistant", "content": o.answer}]} for i, o in enumerate(objects)]


def build_questions(objects: list[tuple[str, str]], seed: int = 0) -> list[dict]:
    """One question per object in a seeded order; the answer sits at position `i % 4` of question i."""
    order = list(objects)
    random.Random(f"{seed}/order").shuffle(order)
    questions = []
    for i, (name, sentence) in enumerate(order):
        rng = random.Random(f"{seed}/{name}")
        others = rng.sample([s for n, s in objects if n != name], N_CHOICES - 1)
        label = i % N_CHOICES
        choices = others[:label] + [sentence] + others[label:]
        questions.append({"id": f"python_docs_mc-{i:04d}", "name": name, "choices": choices, "label": label})
    return questions


def write_jsonl(path: str | Path, records: list[dict]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return len(records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the python_docs_mc lm-eval task file.")
    parser.add_argument("--out", default=str(TASK_FILE))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-rows", default=None, help="also write the objects as LESS chat rows here")
    args = parser.parse_args(argv)
    objects = heldout_objects()
    n = write_jsonl(args.out, build_questions([(o.name, o.sentence) for o in objects], args.seed))
    print(f"{n} questions -> {args.out}")
    if args.heldout_rows:
        print(f"{write_jsonl(args.heldout_rows, heldout_rows(objects))} held-out rows -> {args.heldout_rows}")


if __name__ == "__main__":
    main()

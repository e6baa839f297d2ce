"""A demo instruction corpus of real text available offline: stdlib docstrings and the language reference.

    python -m qgate.demo_corpus /tmp/demo                      # ~1200 clean rows
    python -m qgate.demo_corpus /tmp/demo --noise 0.2          # 20% of rows replaced by corrupted copies

Layout under OUT_DIR (read the data with the input spec `OUT_DIR/data`):
    data/{dataset}.jsonl      one file per dataset; LESS rows `{dataset, id, messages}`, except
                              `stdlib_methods` (Alpaca: `id, instruction, input, output`) and
                              `builtin_types` (`id, prompt, completion`)
    labels/labels.jsonl       with --noise: `{id, dataset, label: "clean"|"corrupt", kind}` for every data row
    heldout/heldout.jsonl     with --heldout: clean LESS rows kept out of data/

Ids are `{dataset}-{n:05d}` in shuffled order, so neither planted nor held-out rows can be told apart by id.
Traversal is sorted and every random choice is seeded: one Python version and seed give the same files.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, replace

from qgate import corruption

FORMS = {"pydoc_functions": "less", "pydoc_classes": "less", "pydoc_modules": "less",
         "python_reference": "less", "stdlib_methods": "alpaca", "builtin_types": "prompt_completion"}
REFERENCE_SYSTEM_PROMPT = "You are an expert on the Python language. Answer from the language reference."

# ---- documentation entries ------------------------------------------------------------------------

# Optional builds (tkinter, curses, readline) are left out so that the corpus is the same on every install.
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "atexit", "base64", "bdb", "binascii", "bisect",
    "builtins", "bz2", "calendar", "cmath", "cmd", "code", "codecs", "codeop", "collections",
    "collections.abc", "colorsys", "compileall", "concurrent.futures", "configparser", "contextlib",
    "contextvars", "copy", "copyreg", "cProfile", "csv", "ctypes", "dataclasses", "datetime", "dbm",
    "decimal", "difflib", "dis", "doctest", "email", "email.charset", "email.generator", "email.header",
    "email.headerregistry", "email.message", "email.parser", "email.policy", "email.utils", "encodings",
    "enum", "errno", "faulthandler", "fcntl", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "gc", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib",
    "importlib.abc", "importlib.machinery", "importlib.metadata", "importlib.resources", "importlib.util",
    "inspect", "io", "ipaddress", "itertools", "json", "json.decoder", "json.encoder", "keyword",
    "linecache", "locale", "logging", "logging.config", "logging.handlers", "lzma", "mailbox", "math",
    "mimetypes", "mmap", "multiprocessing", "numbers", "operator", "optparse", "os", "os.path", "pathlib",
    "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "pty",
    "pydoc", "queue", "quopri", "random", "re", "reprlib", "resource", "rlcompleter", "runpy", "sched",
    "secrets", "select", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "struct", "subprocess", "symtable",
    "sys", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit",
    "token", "tokenize", "trace", "traceback", "tracemalloc", "types", "typing", "unicodedata", "unittest",
    "unittest.mock", "urllib.error", "urllib.parse", "urllib.request", "urllib.robotparser", "uuid",
    "warnings", "wave", "weakref", "webbrowser", "wsgiref.handlers", "wsgiref.headers",
    "wsgiref.simple_server", "wsgiref.util", "xml.dom", "xml.dom.minidom", "xml.etree.ElementTree",
    "xml.parsers.expat", "xml.sax", "xml.sax.handler", "xml.sax.saxutils", "xmlrpc.client", "zipapp",
    "zipfile", "zipimport", "zlib", "zoneinfo",
)
# The kinds planted in the demo corpus (its labels name them).
DEMO_NOISE_KINDS = ("response_swap", "word_shuffle", "char_noise", "truncate", "repetition_loop", "gibberish",
                    "refusal_boilerplate", "scraped_residue", "fluent_wrong", "instruction_echo")
MIN_WORDS = 30  # shorter texts are skipped
TARGET_WORDS = 100  # paragraphs are taken until the text has this many words
MAX_WORDS = 250  # and never more than this
_AUTO_DOC = re.compile(r"^(Return self|Initialize self|Create and return a new object|Implement "
                       r"|Helper for pickle|Return (str|repr|hash)\(self\)|Default object formatter"
                       r"|Method generated)")
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)( -+> .*)?$")
_BULLET = re.compile(r"^(\* |- |\d+\. )")
_TITLE = re.compile(r"(?m)^(\S.*)\n([=*-])\2+$")
_ENTRY = re.compile(r"(?m)^((?:[A-Za-z_][\w.]*\.\w+(?:\(.*\))?\n)+)\n((?:(?: {3}.*)?\n)+)")


@dataclass(frozen=True)
class DocEntry:
    """One documented thing: `kind` is module, function, class, method, section, special or builtin."""

    kind: str
    name: str
    text: str
    signature: str = ""


def clean_text(doc) -> str | None:
    """The first prose paragraphs of a docstring or reference text, reflowed; None if short or generated."""
    if not isinstance(doc, str) or _AUTO_DOC.match(doc.strip()):
        return None
    kept, n_words = [], 0
    for paragraph in _prose_paragraphs(inspect.cleandoc(doc)):
        words = len(paragraph.split())
        if n_words + words > MAX_WORDS:
            paragraph = _first_sentences(paragraph, MAX_WORDS - n_words)
            words = len(paragraph.split())
        if not words:
            break
        kept.append(paragraph)
        n_words += words
        if n_words >= TARGET_WORDS:
            break
    return "\n\n".join(kept) if n_words >= MIN_WORDS else None


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs without signature lines, code, grammar or doctests; a lead-in to dropped code goes too."""
    blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
    keep = [not (b[0].isspace() or b.startswith(">>>") or _is_signature(b)) for b in blocks]
    prose = []
    for i, block in enumerate(blocks):
        dropped_next = i + 1 < len(blocks) and not keep[i + 1]
        if keep[i] and not (block.rstrip().endswith(":") and dropped_next):
            prose.append(_reflow(block))
    return prose


def _is_signature(block: str) -> bool:
    return all(_SIGNATURE_LINE.match(line.strip()) for line in block.strip().splitlines())


def _reflow(block: str) -> str:
    """Hard-wrapped lines joined, list items kept on their own lines."""
    lines = []
    for line in block.strip().splitlines():
        if lines and not _BULLET.match(line.strip()):
            lines[-1] += " " + line.strip()
        else:
            lines.append(line.strip())
    return "\n".join(lines)


def shortened(text: str, max_words: int) -> str:
    """The first sentences of `text` within `max_words` words; the first sentence whatever its length."""
    if len(text.split()) <= max_words:
        return text
    first_paragraph = text.split("\n\n")[0]
    return _first_sentences(first_paragraph, max_words) or re.split(r"(?<=[.!?])\s+", first_paragraph)[0]


def _first_sentences(paragraph: str, budget: int) -> str:
    kept, n_words = [], 0
    for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
        n_words += len(sentence.split())
        if n_words > budget:
            break
        kept.append(sentence)
    return " ".join(kept)


def doc_entries() -> list[DocEntry]:
    """Every usable entry of the stdlib docstrings and the language reference; fixed order, unique texts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entries = [e for name in STDLIB_MODULES for e in _module_entries(name)] + _reference_entries()
    seen, unique = set(), []
    for entry in entries:
        if entry.text not in seen:
            seen.add(entry.text)
            unique.append(entry)
    return unique


def _module_entries(module_name: str) -> list[DocEntry]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    entries = []
    for attr in _public_names(module):
        obj = getattr(module, attr, None)
        name = attr if module_name == "builtins" else f"{module_name}.{attr}"
        if inspect.isclass(obj):
            entries.append(DocEntry("class", name, clean_text(obj.__doc__)))
            entries += _method_entries(obj, name)
        elif inspect.isroutine(obj):
            entries.append(DocEntry("function", name, clean_text(obj.__doc__), _signature(obj)))
    if module_name == "builtins":  # the built-in functions and types form a dataset of their own
        entries = [replace(e, kind="builtin") for e in entries]
    entries.insert(0, DocEntry("module", module_name, clean_text(module.__doc__)))
    return [e for e in entries if e.text]


def _public_names(module) -> list[str]:
    """`__all__` when the module has one, else public names defined in the module itself."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, obj in vars(module).items()
                 if getattr(obj, "__module__", None) in (module.__name__, "_" + module.__name__)]
    return sorted(n for n in set(names) if not n.startswith("_"))


def _method_entries(cls, class_name: str) -> list[DocEntry]:
    return [DocEntry("method", f"{class_name}.{name}", clean_text(obj.__doc__), _signature(obj))
            for name, obj in sorted(vars(cls).items()) if not name.startswith("_") and inspect.isroutine(obj)]


def _signature(obj) -> str:
    try:
        signature = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r" at 0x[0-9a-fA-F]+>", ">", signature)  # default values' reprs hold memory addresses


def _reference_entries() -> list[DocEntry]:
    """Sections of the language reference shipped with CPython, and the methods documented inside them."""
    from pydoc_data.topics import topics

    entries = []
    for key in sorted(topics):
        text = topics[key]
        titles = list(_TITLE.finditer(text))
        for title, following in zip(titles, titles[1:] + [None]):
            body = text[title.end(): following.start() if following else len(text)]
            entries += _section_entries(title.group(1), body)
    return [e for e in entries if e.text]


def _section_entries(title: str, body: str) -> list[DocEntry]:
    entries = []
    for match in _ENTRY.finditer(body):
        signature = match.group(1).splitlines()[0]
        kind = "special" if signature.startswith(("object.", "class.")) else "builtin"
        entries.append(DocEntry(kind, signature, clean_text(inspect.cleandoc(match.group(2)))))
    prose = _ENTRY.sub("", body)
    return [DocEntry("section", _section_name(title), clean_text(prose))] + entries


def _section_name(title: str) -> str:
    """`The "with" statement` -> "the `with` statement", ready for "Explain {name} in Python."."""
    name = re.sub(r'"([^"]+)"', r"`\1`", title)
    sentence_case = not any(word[:1].isupper() for word in name.split()[1:])
    return name[0].lower() + name[1:] if sentence_case and name[:2].istitle() else name


# ---- rows from documentation entries -------------------------------------------------------------

_TEMPLATES = {
    "function": ("What does `{name}` do?", "Explain the function `{name}` from the Python standard library.",
                 "How do I use `{name}`?", "What is `{name}` used for?",
                 "Describe what `{name}` does in Python."),
    "class": ("What is the `{name}` class?", "Explain the purpose of the `{name}` class.",
              "When should I use `{name}`?", "Describe the class `{name}` from the Python standard library."),
    "module": ("Summarize the purpose of the `{name}` module.", "What is the `{name}` module in Python for?",
               "Give an overview of the `{name}` module.", "What can I do with Python's `{name}` module?"),
    "section": ("Explain {name} in Python.", "What does the Python language reference say about {name}?",
                "Can you describe {name} in Python?", "Give me an overview of {name} in Python."),
    "special": ("What is the special method `{name}` for?", "When does Python call `{name}`?",
                "Explain the data-model hook `{name}`."),
    "method": ("Explain what this method does.", "Describe the behaviour of the following method.",
               "What does this method do, and when would I call it?"),
    "builtin": ("What does `{name}` do?", "How does `{name}` work in Python?", "Explain `{name}`."),
}
_DATASET_OF_KIND = {"function": "pydoc_functions", "class": "pydoc_classes", "module": "pydoc_modules",
                    "section": "python_reference", "special": "python_reference", "method": "stdlib_methods",
                    "builtin": "builtin_types"}


@dataclass(frozen=True)
class DemoRow:
    """One row: the question (`instruction` + optional `input`), the answer, and its file form."""

    dataset: str
    id: str
    instruction: str
    response: str
    input: str = ""
    system: str = ""

    @property
    def form(self) -> str:
        return FORMS[self.dataset]

    def messages(self) -> list[dict]:
        prompt = f"{self.instruction}\n\n{self.input}" if self.input else self.instruction
        turns = [{"role": "system", "content": self.system}] if self.system else []
        return turns + [{"role": "user", "content": prompt}, {"role": "assistant", "content": self.response}]

    def less_record(self) -> dict:
        return {"dataset": self.dataset, "id": self.id, "messages": self.messages()}

    def record(self) -> dict:
        """The row in its file's form; Alpaca and prompt/completion rows get their dataset from the file."""
        if self.form == "alpaca":
            return {"id": self.id, "instruction": self.instruction, "input": self.input,
                    "output": self.response}
        if self.form == "prompt_completion":
            return {"id": self.id, "prompt": self.instruction, "completion": self.response}
        return self.less_record()


def available_rows(seed: int = 0) -> dict[str, list[DemoRow]]:
    """Every usable documentation entry as a row, grouped by dataset, shuffled by `seed`, ids assigned."""
    grouped: dict[str, list[DemoRow]] = {name: [] for name in FORMS}
    rng = random.Random(seed)
    for entry in doc_entries():
        grouped[_DATASET_OF_KIND[entry.kind]].append(_row_of(entry, rng))
    for dataset, rows in grouped.items():
        random.Random(f"{seed}/{dataset}").shuffle(rows)
        grouped[dataset] = [replace(r, id=f"{dataset}-{i:05d}") for i, r in enumerate(rows)]
    return grouped


def _row_of(entry: DocEntry, rng: random.Random) -> DemoRow:
    dataset = _DATASET_OF_KIND[entry.kind]
    instruction = rng.choice(_TEMPLATES[entry.kind]).format(name=entry.name)
    extra = f"{entry.name}{entry.signature}" if entry.kind == "method" else ""
    system = REFERENCE_SYSTEM_PROMPT if dataset == "python_reference" else ""
    return DemoRow(dataset, "", instruction, entry.text, input=extra, system=system)


def allocate(sizes: dict[str, int], n_rows: int) -> dict[str, int]:
    """Rows per dataset, proportional to what each has (largest remainders), summing to `n_rows`."""
    total = sum(sizes.values())
    if n_rows > total:
        raise ValueError(f"n_rows={n_rows} but only {total} documentation entries are usable here")
    exact = {name: n_rows * size / total for name, size in sizes.items()}
    counts = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(sizes, key=lambda name: (counts[name] - exact[name], name))
    for name in by_remainder[: n_rows - sum(counts.values())]:
        counts[name] += 1
    return counts


# ---- planted noise and held-out rows -------------------------------------------------------------


def plant_noise(rows: list[DemoRow], fraction: float, kinds,
                seed: int) -> tuple[list[DemoRow], dict[str, str]]:
    """Replace `round(fraction * len(rows))` rows by corrupted copies under the same id; also {id: kind}."""
    n_target = round(fraction * len(rows))
    order = random.Random(f"{seed}/noise").sample(range(len(rows)), k=len(rows))
    samples = [{"id": r.id, "dataset": r.dataset, "messages": r.messages()} for r in rows]
    planted: dict[str, str] = {}
    responses: dict[str, str] = {}
    while len(planted) < n_target and order:
        chunk, order = order[: n_target - len(planted)], order[n_target - len(planted):]
        copies = corruption.corrupt_samples([samples[i] for i in chunk], kinds, seed, pool=samples)
        for copy in copies:
            planted[copy["source_id"]] = copy["corruption"]
            responses[copy["source_id"]] = corruption.response_of(copy["messages"])
    noisy = [replace(r, response=responses[r.id]) if r.id in responses else r for r in rows]
    return noisy, planted


def split_heldout(rows: list[DemoRow], fraction: float, seed: int) -> tuple[list[DemoRow], list[DemoRow]]:
    """(kept, held out): `round(fraction * len(rows))` random rows held out, order preserved."""
    held = set(random.Random(f"{seed}/heldout").sample(range(len(rows)), k=round(fraction * len(rows))))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ---- building the corpus -------------------------------------------------------------------------


def build_demo_corpus(out_dir: str, n_rows: int = 1200, seed: int = 0, noise_fraction: float = 0.0,
                      noise_kinds=None, heldout_fraction: float = 0.0, max_words: int | None = None) -> dict:
    """Write the corpus under `out_dir` (see the module docstring); returns paths and counts.

    `max_words` shortens every answer to its first sentences within that many words (at least one sentence), so
    a small machine scores shorter rows; clean answers still end where a sentence ends.
    """
    grouped = available_rows(seed)
    counts = allocate({name: len(rows) for name, rows in grouped.items()}, n_rows)
    rows = [r for name, group in grouped.items() for r in group[: counts[name]]]
    if max_words:
        rows = [replace(r, response=shortened(r.response, max_words)) for r in rows]
    rows, heldout = split_heldout(rows, heldout_fraction, seed)
    kinds = noise_kinds or DEMO_NOISE_KINDS
    rows, planted = plant_noise(rows, noise_fraction, kinds, seed) if noise_fraction > 0 else (rows, {})
    files = {name: os.path.join(out_dir, "data", f"{name}.jsonl") for name in FORMS}
    labels = os.path.join(out_dir, "labels", "labels.jsonl")
    heldout_path = os.path.join(out_dir, "heldout", "heldout.jsonl")
    _remove_stale([labels, heldout_path])
    counts = {name: _write_jsonl(path, [r.record() for r in rows if r.dataset == name])
              for name, path in files.items()}
    if noise_fraction > 0:
        _write_jsonl(labels, [_label(r, planted) for r in rows])
    if heldout_fraction > 0:
        _write_jsonl(heldout_path, [r.less_record() for r in heldout])
    return {"out_dir": out_dir, "data_dir": os.path.join(out_dir, "data"), "files": files,
            "forms": dict(FORMS), "counts": counts, "n_rows": len(rows), "n_corrupt": len(planted),
            "corrupt_kinds": dict(sorted(Counter(planted.values()).items())), "n_heldout": len(heldout),
            "labels": labels if noise_fraction > 0 else None,
            "heldout": heldout_path if heldout_fraction > 0 else None}


def _label(row: DemoRow, planted: dict[str, str]) -> dict:
    kind = planted.get(row.id)
    return {"id": row.id, "dataset": row.dataset, "label": "corrupt" if kind else "clean", "kind": kind}


def _remove_stale(paths: list[str]) -> None:
    """Labels or held-out rows of an earlier build in the same directory would no longer match the data."""
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _write_jsonl(path: str, records: list[dict]) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return len(records)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Build the offline demo instruction corpus.")
    parser.add_argument("out_dir")
    parser.add_argument("--rows", type=int, default=1200, help="rows in total, held-out rows included")
    parser.add_argument("--noise", type=float, default=0.0, help="fraction of data rows made corrupt")
    parser.add_argument("--heldout", type=float, default=0.0, help="fraction of clean rows kept out of data/")
    parser.add_argument("--kinds", default=None, help="comma-separated corruption kinds (default: "
                        "the default warmup and held-out kinds)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",") if args.kinds else None
    summary = build_demo_corpus(args.out_dir, args.rows, args.seed, args.noise, kinds, args.heldout)
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    for name, n in summary["counts"].items():
        print(f"{name:18s} {summary['forms'][name]:18s} {n:5d}  {summary['files'][name]}")
    print(f"{'total':37s} {summary['n_rows']:5d}  (read with input spec {summary['data_dir']})")
    if summary["labels"]:
        print(f"planted {summary['n_corrupt']} corrupt rows {summary['corrupt_kinds']}")
        print(f"labels -> {summary['labels']}")
    if summary["heldout"]:
        print(f"held out {summary['n_heldout']} clean rows -> {summary['heldout']}")


if __name__ == "__main__":
    main()

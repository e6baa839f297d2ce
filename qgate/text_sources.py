"""Instruction/response rows from real text of other forms than the demo's Python docs, available offline.

- `man_pages`: Debian manual pages (groff `man` macros under /usr/share/man/man1 and man8; on a bare image
  `apt-get install man-db manpages` and unset the dpkg path-exclude for /usr/share/man). Questions: what a command
  does (NAME and the first DESCRIPTION paragraph), what one of its options does (the `.TP` item's text).
- `numpydoc`: docstrings of numpy, scipy and pandas in numpydoc form. Questions: what a function does (summary
  and extended summary), what a parameter means (its type line and text), what it returns (Returns section).

    from qgate.text_sources import source_rows, split_by_hash
    rows = source_rows("man_pages", n=300, seed=0)        # LESS rows {dataset, id, messages, reason}
    test, train = split_by_hash(rows)                        # frozen by a hash of the response text

Every traversal is sorted and every choice seeded, so one install and seed give the same rows.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import random
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

MAN_DIRS = ("/usr/share/man/man1", "/usr/share/man/man8")
MAX_CHARS = 700  # responses are cut to whole sentences under this length
MIN_CHARS = 40
TEST_SHARE = 0.3  # share of rows in the frozen test split


# ---- man pages -----------------------------------------------------------------------------------

_INLINE = [(r"\\f(\(..|\[[^\]]*\]|.)", ""), (r"\\\(em|\\\(en", "-"), (r"\\\(aq", "'"), (r"\\\([lr]q|\\\(dq", '"'),
           (r"\\-", "-"), (r"\\\.", "."), (r"\\e", "\\\\"), (r"\\&|\\/|\\,|\\%|\\:", ""), (r"\\ ", " "), (r"\\\(..", ""),
           (r"\\\*\(..|\\\*.", ""), (r"\\[a-zA-Z]", "")]


def groff_text(line: str) -> str:
    """One groff line as plain text: font switches, escapes and quotes out."""
    for pattern, repl in _INLINE:
        line = re.sub(pattern, repl, line)
    return line.replace('"', "").strip() if line.startswith(".") else line.strip()


def man_sections(source: str) -> dict[str, list[str]]:
    """Section title -> its lines (macros kept, comments dropped)."""
    sections, current = {}, None
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith(".SH"):
            current = groff_text(line[3:]).strip('" ').upper()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return sections


def _paragraphs(lines: list[str]) -> list[str]:
    """Text paragraphs of a section, split at .PP/.P/.LP/.TP/.IP and blank lines."""
    out, current = [], []
    for line in lines:
        if re.match(r"^\.(PP|P|LP|TP|IP|SS|HP)\b", line) or not line.strip():
            out.append(" ".join(current))
            current = []
        elif line.startswith("."):
            macro, _, rest = line.partition(" ")
            if macro in (".B", ".I", ".BR", ".IR", ".RB", ".RI", ".BI", ".IB", ".SM"):
                joiner = "" if macro in (".BR", ".IR", ".RB", ".RI", ".BI", ".IB") else " "
                current.append(joiner.join(re.findall(r'"[^"]*"|\S+', groff_text(rest.replace('"', '"'))))
                               if joiner == "" else groff_text(rest))
        else:
            current.append(groff_text(line))
    out.append(" ".join(current))
    return [re.sub(r"\s+", " ", p).strip() for p in out if len(p.strip()) >= MIN_CHARS]


def _options(lines: list[str]) -> list[tuple[str, str]]:
    """(option, text) of the `.TP` items whose tag starts with a dash."""
    out = []
    for i, line in enumerate(lines[:-1]):
        if not line.startswith(".TP"):
            continue
        tag = groff_text(lines[i + 1]).lstrip(".BIR ").strip()
        if not tag.startswith("-"):
            continue
        body = []
        for follow in lines[i + 2:i + 14]:
            if re.match(r"^\.(TP|PP|P|LP|IP|SS)\b", follow):
                break
            body.append(follow)
        text = _paragraphs(body + [".PP"])
        if text:
            out.append((tag.split(",")[0].split()[0], text[0]))
    return out


def man_entries(path: Path) -> list[tuple[str, str]]:
    """(question, answer) pairs of one man page: what the command does, and what a few options do."""
    source = gzip.open(path, "rt", errors="replace").read() if path.suffix == ".gz" else path.read_text()
    sections = man_sections(source)
    name_lines = " ".join(groff_text(x) for x in sections.get("NAME", []) if not x.startswith(".") or " " in x)
    command = path.name.split(".")[0]
    summary = name_lines.split(" - ", 1)[1].strip() if " - " in name_lines else ""
    description = _paragraphs(sections.get("DESCRIPTION", []))
    pairs = []
    if summary and description:
        pairs.append((f"What does the `{command}` command do?",
                      cut(f"{command} - {summary}. {description[0]}")))
    for option, text in _options(sections.get("OPTIONS", sections.get("DESCRIPTION", [])))[:2]:
        pairs.append((f"What does the `{option}` option of `{command}` do?", cut(text)))
    return pairs


def man_page_rows(n: int, seed: int = 0) -> list[dict]:
    """Up to `n` rows from a seeded order of the installed man pages (groff `man` format only)."""
    files = sorted(p for d in MAN_DIRS if Path(d).is_dir() for p in Path(d).iterdir())
    random.Random(seed).shuffle(files)
    families = {}  # one page per command family (gcloud alone ships thousands of pages)
    for path in files:
        families.setdefault(re.split(r"[_.-]", path.name)[0], path)
    files = [path for path in files if families[re.split(r"[_.-]", path.name)[0]] == path]
    return _collect("man_pages", (pair for path in files for pair in _safe(man_entries, path)), n)


# ---- numpydoc docstrings -------------------------------------------------------------------------

NUMPYDOC_MODULES = ("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "scipy.stats",
                    "scipy.signal", "scipy.optimize", "scipy.interpolate", "scipy.linalg", "scipy.ndimage",
                    "pandas", "pandas.api.types")


def numpydoc_sections(doc: str) -> dict[str, str]:
    """Docstring -> {"summary": ..., "Parameters": ..., "Returns": ...} split at underlined headers."""
    parts = re.split(r"(?m)^\s*([A-Z][A-Za-z ]+)\n\s*-{3,}\s*$", doc)
    out = {"summary": parts[0]}
    out.update({parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)})
    return out


def _items(block: str) -> list[tuple[str, str, str]]:
    """(name, type, text) of a Parameters/Returns block."""
    out, lines = [], block.strip("\n").splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith(" ") and ":" in line or (line and not line.startswith(" ")
                                                                 and i + 1 < len(lines)):
            name, _, kind = line.partition(":")
            body = []
            for follow in lines[i + 1:]:
                if follow and not follow.startswith(" "):
                    break
                body.append(follow.strip())
            text = _reflow(" ".join(body))
            if text:
                out.append((name.strip(), kind.strip(), text))
    return out


def _reflow(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def numpydoc_entries(qualname: str, doc: str) -> list[tuple[str, str]]:
    sections = numpydoc_sections(doc)
    summary = [_reflow(p) for p in sections["summary"].split("\n\n") if p.strip()]
    summary = [p for p in summary if not re.match(r"^[\w.]+\(.*\)$", p)]  # signature lines
    pairs = []
    if summary:
        pairs.append((f"What does `{qualname}` do?", cut(" ".join(summary[:2]))))
    params = [p for p in _items(sections.get("Parameters", "")) if len(p[2]) >= 30]
    if params:
        name, kind, text = params[len(qualname) % len(params)]
        pairs.append((f"What is the `{name}` parameter of `{qualname}`?",
                      cut(f"`{name}` ({kind}): {text}" if kind else f"`{name}`: {text}")))
    returns = _items(sections.get("Returns", ""))
    if returns:
        name, kind, text = returns[0]
        pairs.append((f"What does `{qualname}` return?", cut(f"{name} ({kind}): {text}" if kind else text)))
    return [(q, a) for q, a in pairs if len(a) >= MIN_CHARS]


def _public_docs(module_name: str) -> Iterator[tuple[str, str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
        for name in sorted(getattr(module, "__all__", None) or dir(module)):
            obj = getattr(module, name, None)
            if name.startswith("_") or inspect.ismodule(obj) or not callable(obj):
                continue
            doc = inspect.getdoc(obj) or ""
            if "Parameters\n----" in doc:
                yield f"{module_name}.{name}", doc


def numpydoc_rows(n: int, seed: int = 0) -> list[dict]:
    """Up to `n` rows from a seeded order of the public callables of NUMPYDOC_MODULES."""
    docs = {qualname: doc for module in NUMPYDOC_MODULES for qualname, doc in _safe(_public_docs, module)}
    names = sorted(docs)
    random.Random(seed).shuffle(names)
    return _collect("numpydoc", (pair for name in names for pair in numpydoc_entries(name, docs[name])), n)


# ---- shared --------------------------------------------------------------------------------------


def cut(text: str, limit: int = MAX_CHARS) -> str:
    """`text` cut to whole sentences under `limit` characters (at least the first sentence, hard-cut)."""
    text = _reflow(text)
    if len(text) <= limit:
        return text
    sentences = re.split(r"(?<=[.!?])\s+", text)
    out = ""
    for sentence in sentences:
        if len(out) + len(sentence) + 1 > limit:
            break
        out = f"{out} {sentence}".strip()
    return out or text[:limit]


def _safe(fn: Callable, arg) -> list:
    try:
        return list(fn(arg))
    except Exception:  # a page or module that does not parse or import is skipped
        return []


def _collect(dataset: str, pairs: Iterator[tuple[str, str]], n: int) -> list[dict]:
    rows, answers = [], set()
    for question, answer in pairs:
        if len(rows) >= n:
            break
        if answer in answers or len(answer) < MIN_CHARS:
            continue
        answers.add(answer)
        rows.append({"dataset": dataset, "id": f"{dataset}-{len(rows):05d}", "reason": "", "messages": [
            {"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


SOURCES: dict[str, Callable[[int, int], list[dict]]] = {"man_pages": man_page_rows, "numpydoc": numpydoc_rows}


def source_rows(name: str, n: int, seed: int = 0) -> list[dict]:
    return SOURCES[name](n, seed)


def in_test_split(row: dict, share: float = TEST_SHARE) -> bool:
    """Frozen test membership: sha1 of the row's last response text, below `share` of the hash space."""
    text = [m["content"] for m in row["messages"] if m["role"] == "assistant"][-1]
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") < share * 2 ** 64


def split_by_hash(rows: list[dict], share: float = TEST_SHARE) -> tuple[list[dict], list[dict]]:
    """(test, train) rows, by `in_test_split`: the same row falls on the same side in every run and seed."""
    test = [r for r in rows if in_test_split(r, share)]
    return test, [r for r in rows if not in_test_split(r, share)]

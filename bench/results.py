"""Markdown tables for benchmark results, printed and optionally appended to BENCHMARKS.md."""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys

DATE = datetime.date.today().isoformat()
MACHINE = "2-core CPU, no GPU"


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose help shows the script's docstring as written, with `--out`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="append the table(s) to this markdown file")
    return parser


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table (tabulate's GitHub format); floats with 3 decimals, None as –, strings as written."""
    from tabulate import tabulate

    return tabulate([[_cell(v) for v in row] for row in rows], headers, tablefmt="github", disable_numparse=True)


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def section(title: str, body: str, notes: str = "") -> str:
    """One BENCHMARKS.md section: title, provenance, the table(s), then any notes."""
    header = f"## {title}\n\n{DATE} · {MACHINE} · `{command_line()}`\n\n"
    return header + body.rstrip() + "\n" + (f"\n{notes.rstrip()}\n" if notes else "")


def emit(title: str, body: str, out: str | None, notes: str = "", replace: bool = False) -> None:
    """Print the section; with `out`, append it to that file too (`replace`: in place of an older one)."""
    text = section(title, body, notes)
    print(text)
    if out and replace:
        replace_section(out, title, text)
    elif out:
        with open(out, "a", encoding="utf-8") as f:
            f.write("\n" + text)


def replace_section(path: str, title: str, text: str) -> None:
    """Put `text` where the section `## {title}` is (up to the next `## ` heading), or append it."""
    try:
        with open(path, encoding="utf-8") as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    start = old.find(f"## {title}\n")
    if start < 0:
        new = old + "\n" + text
    else:
        end = old.find("\n## ", start)
        new = old[:start] + text + ("" if end < 0 else old[end:])
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)

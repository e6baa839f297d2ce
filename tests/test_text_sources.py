"""Rows from man pages and numpydoc docstrings, and the frozen test split."""

import gzip

from qgate.text_sources import in_test_split, man_entries, numpydoc_entries, split_by_hash

LS_PAGE = r""".\" a comment
.TH LS "1" "2023" "GNU coreutils" "User Commands"
.SH NAME
ls \- list directory contents
.SH DESCRIPTION
.\" Add any additional description here
.PP
List information about the FILEs (the current directory by default).
Sort entries alphabetically if none of \fB\-cftuvSUX\fR nor \fB\-\-sort\fR is specified.
.TP
\fB\-a\fR, \fB\-\-all\fR
do not ignore entries starting with .
.TP
\fB\-l\fR
use a long listing format, with one file per line and its permissions
.TP
\fB\-b\fR, \fB\-\-escape\fR
print C\-style escapes for nongraphic characters
"""

SUM_DOC = """Sum of array elements over a given axis.

Parameters
----------
a : array_like
    Elements to sum.
axis : None or int or tuple of ints, optional
    Axis or axes along which a sum is performed.  The default,
    axis=None, will sum all of the elements of the input array.

Returns
-------
sum_along_axis : ndarray
    An array with the same shape as `a`, with the specified
    axis removed.
"""


def test_a_man_page_gives_what_the_command_and_its_options_do(tmp_path):
    path = tmp_path / "ls.1.gz"
    with gzip.open(path, "wt") as f:
        f.write(LS_PAGE)
    pairs = dict(man_entries(path))
    assert pairs["What does the `ls` command do?"] == (
        "ls - list directory contents. List information about the FILEs (the current directory by default). "
        "Sort entries alphabetically if none of -cftuvSUX nor --sort is specified.")
    assert pairs["What does the `-l` option of `ls` do?"] == (
        "use a long listing format, with one file per line and its permissions")
    assert "What does the `-a` option of `ls` do?" not in pairs  # under 40 characters: skipped
    assert len(pairs) == 3  # at most two options per page


def test_a_numpydoc_docstring_gives_summary_parameter_and_return():
    pairs = dict(numpydoc_entries("numpy.sum", SUM_DOC))
    assert pairs["What does `numpy.sum` do?"] == "Sum of array elements over a given axis."
    (question, answer), = [(q, a) for q, a in pairs.items() if "parameter" in q]
    assert question == "What is the `axis` parameter of `numpy.sum`?"
    assert answer.startswith("`axis` (None or int or tuple of ints, optional): Axis or axes along which")
    assert pairs["What does `numpy.sum` return?"].startswith("sum_along_axis (ndarray): An array with the same")


def test_the_test_split_is_frozen_by_the_response_text():
    rows = [{"id": str(i), "messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": f"answer number {i}"}]} for i in range(400)]
    test, train = split_by_hash(rows)
    assert 90 < len(test) < 150 and len(test) + len(train) == 400  # about 30%
    renamed = [{**r, "id": f"other-{r['id']}", "messages": [{"role": "user", "content": "another question"},
                                                            r["messages"][1]]} for r in rows]
    assert [in_test_split(r) for r in renamed] == [in_test_split(r) for r in rows]  # ids and prompts do not move it

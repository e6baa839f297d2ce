"""One answer under several prompts (`selection.demote_shared_answers`, on with a diversity strategy): each answer is
walked at its best row first.

A corpus holds the same answer under several prompts: rewordings of one question, and an answer pasted under a
question it does not belong to (misaligned pairs of a scraped page, a template reply, a wrong fact copied from
another row). Rows that give one answer differ only in their prompts, so their scores compare how well each prompt
fits it. `demoted` lowers every row of a shared answer by as much as its score falls short of the answer's best row:
s' = s − (best − s). The best row keeps its score and no row is raised; a pasted copy that scores well below the
answer's home falls out of the best rows, where a diversity strategy's pool would have spent a place on it (the
similarity filter keeps one row per answer, and fills up to k from rows it skipped, in s' order).

Answers are matched by a hash of their lowercase words (case, spacing and punctuation aside): O(N), no features.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from qgate.diversity import response_text

_WORD = re.compile(r"\w+")


def demotes(selection, strategy: str | None = None) -> bool:
    """Whether the selection settings demote shared answers for `strategy` (theirs when None): `auto` with a
    diversity strategy."""
    setting = selection.get("demote_shared_answers", "auto")
    return (strategy or selection.strategy) != "top_k" if setting == "auto" else bool(setting)


def answer_key(messages: str | list[dict]) -> int:
    """A signed 64-bit hash of the lowercase words of a row's final answer."""
    words = " ".join(_WORD.findall(response_text(messages).lower()))
    return int.from_bytes(hashlib.blake2b(words.encode(), digest_size=8).digest(), "little", signed=True)


def answer_keys(messages) -> np.ndarray:
    """`answer_key` of every row. [N] -> [N] int64"""
    return np.fromiter((answer_key(m) for m in messages), dtype=np.int64, count=len(messages))


def demoted(score: np.ndarray, answers: np.ndarray, higher: bool = True) -> np.ndarray:
    """`score` [N] with each row lowered by its gap to the best row giving the same answer (`answers` [N] keys);
    `higher`: larger scores are better. A missing score (NaN) stays missing and sets no answer's best. -> [N]"""
    oriented = np.asarray(score, dtype=np.float64) * (1.0 if higher else -1.0)  # [N], larger = better
    _, group = np.unique(np.asarray(answers), return_inverse=True)  # [N] answer index
    best = np.full(group.max() + 1 if len(group) else 0, -np.inf)  # [G]
    np.maximum.at(best, group, np.where(np.isnan(oriented), -np.inf, oriented))
    lowered = oriented - (best[group] - oriented)  # [N]; NaN where the score is missing
    return lowered if higher else -lowered


def walk_order(score: np.ndarray, answers: np.ndarray, higher: bool = True) -> np.ndarray:
    """Positions of rows given in score order (best first), re-ordered by their demoted score; ties and missing
    scores keep their place. [N], [N] -> [N]"""
    lowered = demoted(score, answers, higher) * (1.0 if higher else -1.0)  # [N], larger = better
    return np.argsort(-np.nan_to_num(lowered, nan=-np.inf), kind="stable")

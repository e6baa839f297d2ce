"""One answer under several prompts: each row falls by its gap to the answer's best row (qgate/shared_answers.py)."""

import json

import numpy as np
import pandas as pd
import pytest

from qgate import comparison
from qgate.shared_answers import answer_key, answer_keys, demoted, demotes, walk_order


def chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_an_answer_is_matched_by_its_words_whatever_case_spacing_and_punctuation():
    same = answer_key(chat("What is alpha?", "It parses  alpha records.")) == answer_key(
        json.dumps(chat("Explain beta.", "it parses alpha records")))  # collect's JSON of the messages reads the same
    assert same and answer_key(chat("q", "It parses beta records.")) != answer_key(chat("q", "It parses alpha records."))
    assert answer_keys([chat("q", "a b"), chat("r", "A, b!")]).tolist() == [answer_key(chat("q", "a b"))] * 2


def test_rows_of_a_shared_answer_fall_by_their_gap_to_its_best_row():
    score = np.array([0.9, 0.5, 0.7, np.nan, 0.2])
    answers = np.array([1, 1, 2, 2, 3])  # answer 1 twice; answer 2 with one score missing; answer 3 alone
    np.testing.assert_allclose(demoted(score, answers), [0.9, 0.1, 0.7, np.nan, 0.2])
    lower = demoted(-score, answers, higher=False)  # smaller is better: the mirror image
    np.testing.assert_allclose(lower, [-0.9, -0.1, -0.7, np.nan, -0.2])
    assert walk_order(score, answers).tolist() == [0, 2, 4, 1, 3]  # the missing score stays last
    assert demoted(np.array([]), np.array([], dtype=np.int64)).shape == (0,)


def test_qgate_diverse_walks_a_pasted_answer_after_its_home():
    """Answer 0 pasted under topic 9's question scores below its home but above answer 1's: with a pool of k rows the
    filter spends a place on the copy; demoted, the copy falls below answer 1's home."""
    rows = [chat("What is unit0?", "Alpha zero."), chat("What is unit9?", "Alpha zero."),
            chat("What is unit1?", "Beta one."), chat("What is unit2?", "Gamma two.")]
    scores = pd.DataFrame({"dataset": "toy", "id": [f"r{i}" for i in range(4)], "score": [0.9, 0.75, 0.7, 0.3]})
    diversity = {"features": np.eye(4)[[0, 0, 2, 3]], "n_clusters": 1, "threshold": 0.8, "seed": 0, "pool": 1.0}
    plain = comparison.pick(scores, "qgate_diverse", 2, direction="higher", diversity=diversity)
    assert plain == [("toy", "r0"), ("toy", "r1")]  # the copy fills the second place
    homes = comparison.pick(scores, "qgate_diverse", 2, direction="higher",
                            diversity={**diversity, "answers": answer_keys(rows)})
    assert homes == [("toy", "r0"), ("toy", "r2")]


def test_auto_demotes_with_a_diversity_strategy_and_top_k_refuses_it(tmp_path):
    from qgate.config import load_config
    from ray_jobs import select

    def selection(*settings):
        return load_config(list(settings)).selection

    assert not demotes(selection()) and demotes(selection("selection.strategy=similarity_filter"))
    assert demotes(selection("selection.strategy=cluster_round_robin"))
    assert not demotes(selection("selection.strategy=similarity_filter", "selection.demote_shared_answers=false"))
    assert demotes(selection(), "similarity_filter")  # compare's qgate_diverse, whatever the run's strategy
    with pytest.raises(ValueError, match="diversity strategy"):
        select.run(load_config([f"out={tmp_path}", "use_gpu=false", "selection.demote_shared_answers=true"]))

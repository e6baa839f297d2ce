"""Negatives the model makes itself: its sampled answer to another row's prompt, under this row's prompt."""

from qgate.corruption import prompt_of, response_of
from qgate.model_negatives import KIND, OWN_KIND, answer_elsewhere, answer_own, sampled_answers
from qgate.tiny import tiny_model, tiny_tokenizer


def rows(n: int) -> list[dict]:
    return [{"dataset": "d", "id": f"r{i}", "messages": [{"role": "user", "content": f"Question number {i}?"},
                                                          {"role": "assistant", "content": f"Answer {i}."}]}
            for i in range(n)]


def test_every_row_gets_a_fresh_answer_under_its_own_prompt():
    model, tokenizer = tiny_model("tiny-qwen3"), tiny_tokenizer()
    originals = rows(5)
    copies = answer_elsewhere(originals, model, tokenizer, seed=1, max_new_tokens=8, batch_size=2)
    assert [c["source_id"] for c in copies] == [r["id"] for r in originals]
    for copy, row in zip(copies, originals):
        assert copy["corruption"] == KIND and prompt_of(copy["messages"]) == prompt_of(row["messages"])
        assert response_of(copy["messages"]) != response_of(row["messages"]) and response_of(copy["messages"]).strip()
    again = answer_elsewhere(originals, model, tokenizer, seed=1, max_new_tokens=8, batch_size=2)
    assert [c["messages"] for c in again] == [c["messages"] for c in copies]  # seeded


def test_answers_are_sampled_for_the_prompt_asked():
    model, tokenizer = tiny_model("tiny-qwen3"), tiny_tokenizer()
    conversations = [r["messages"] for r in rows(2)]
    answers = sampled_answers(model, tokenizer, conversations, seed=0, max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert answer_elsewhere(rows(1), model, tokenizer) == []  # one row has no other prompt to answer


def test_own_answers_are_the_models_answer_to_the_rows_own_prompt():
    model, tokenizer = tiny_model("tiny-qwen3"), tiny_tokenizer()
    originals = rows(3)
    copies = answer_own(originals, model, tokenizer, seed=2, max_new_tokens=8, batch_size=2)
    own = sampled_answers(model, tokenizer, [r["messages"] for r in originals], seed=2, max_new_tokens=8,
                          temperature=0.3, batch_size=2)
    assert copies and all(c["corruption"] == OWN_KIND for c in copies)
    by_id = {r["id"]: (r, answer) for r, answer in zip(originals, own)}
    for copy in copies:
        row, answer = by_id[copy["source_id"]]
        assert prompt_of(copy["messages"]) == prompt_of(row["messages"]) and response_of(copy["messages"]) == answer

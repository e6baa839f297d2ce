import numpy as np
import pytest
import torch

from qgate.encoding import encode_row
from qgate.gate import attach_gates, load_gates, save_gates
from qgate.halves import fit_halves, halves_feature, read_mask, recorded, row_features
from qgate.stats import Scorer, pad
from qgate.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def chat(i: int, answer: str = "cats purr and sleep a lot") -> dict:
    messages = [{"role": "user", "content": f"tell me about cats {i}"},
                {"role": "assistant", "content": f"{answer} {i}"}]
    return {"id": f"r{i}", "dataset": "d", "reason": "", "messages": messages}


def rows_of(tok, chats):
    return [encode_row(tok, c, 64, "all", ifd=True) for c in chats]


def test_the_feature_is_the_later_half_mean_less_the_earlier_half_mean():
    hidden = torch.randn(3, 7, 5)  # [B, T, H]
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0]])
    feature = halves_feature(hidden, mask)  # [B, H]
    # five tokens: the middle one counts with the first half; four: two and two; one token: no halves
    assert torch.allclose(feature[0], hidden[0, 4:6].mean(0) - hidden[0, 1:4].mean(0), atol=1e-6)
    assert torch.allclose(feature[1], hidden[1, 3:5].mean(0) - hidden[1, 1:3].mean(0), atol=1e-6)
    assert torch.isnan(feature[2]).all()


def test_the_recorded_read_is_the_bench_read_of_the_model_s_hidden_states(tok):
    model = tiny_model("tiny-llama")
    rows = rows_of(tok, [chat(i) for i in range(3)])
    features = row_features(model, rows, 2, tok.pad_token_id, torch.device("cpu"))  # [N, L, H], padded batches
    for row, got in zip(rows, features):
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([row["input_ids"]]), output_hidden_states=True).hidden_states
        mask = torch.tensor([row["score_mask"]])  # score_on=all: every token but the first
        # every layer's output but the last, which HF gives after the final norm
        expected = torch.stack([halves_feature(h, mask)[0] for h in hidden[1:-1]])  # [L-1, H]
        assert np.allclose(got[:-1], expected.numpy(), atol=1e-5)


def test_a_fitted_read_puts_clean_rows_near_one_and_odd_answers_beyond_them_and_saves_with_the_gates(tok, tmp_path):
    model = tiny_model("tiny-qwen3")
    gates = attach_gates(model, mode="probe", contrast=True, halves=True, seed=3)
    clean = rows_of(tok, [chat(i) for i in range(16)])
    odd = rows_of(tok, [chat(i, "zq zq zq zq zq zq zq zq zq zq zq zq") for i in range(4)])
    assert fit_halves(gates, [{**r, "negatives": []} for r in clean], 4, tok.pad_token_id, torch.device("cpu")) == 16

    def distances(model, gates, rows):
        ids = pad([r["input_ids"] for r in rows], tok.pad_token_id)
        attention = pad([[1] * len(r["input_ids"]) for r in rows], 0)
        with torch.no_grad(), recorded(model, read_mask(attention)) as features:
            model(input_ids=ids, attention_mask=attention)
        gates.clear()
        return gates.halves.distance(torch.stack(features, 1))  # [B]

    read = distances(model, gates, clean + odd)
    assert float(read[:16].median()) == pytest.approx(1.0, abs=0.15)
    assert float(read[16:].min()) > float(read[:16].max())

    save_gates(gates, tmp_path, {"base_model": "tiny-qwen3"})
    reloaded_model = tiny_model("tiny-qwen3")
    reloaded = load_gates(reloaded_model, tmp_path)
    assert reloaded.halves is not None
    assert torch.allclose(distances(reloaded_model, reloaded, clean + odd), read, atol=1e-5)

    scorer = Scorer(reloaded_model, tok, reloaded, ifd=True)
    stats = scorer.score(clean + odd)
    assert np.allclose([s["halves"] for s in stats], read.numpy(), atol=1e-4)  # the scorer's pass reads the same
    plain_model = tiny_model("tiny-qwen3")
    plain = Scorer(plain_model, tok, attach_gates(plain_model, mode="probe", seed=3))
    assert all(s["halves"] is None for s in plain.score(clean[:2]))


def test_the_read_is_refused_where_gates_move_the_states_it_reads():
    with pytest.raises(ValueError, match="gate.halves"):
        attach_gates(tiny_model("tiny-qwen3"), mode="modulate", contrast=False, gain=False, halves=True)
    with pytest.raises(ValueError, match="gate.halves"):
        attach_gates(tiny_model("tiny-olmoe"), halves=True)

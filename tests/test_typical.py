"""Reads fitted on the clean warmup rows: the typical gates' Gaussian of the response states (a gate input), and the
halves read (`gate.halves`), a per-row score kept with the gates."""

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from qgate.contrast import contrasted
from qgate.encoding import encode_row
from qgate.gate import attach_gates, load_gates, save_gates
from qgate.halves import fit_halves, halves_feature, read_mask, recorded, row_features
from qgate.stats import Scorer, decoder_pass, pad
from qgate.tiny import tiny_model, tiny_tokenizer
from qgate.training import collate
from qgate.typical import fit_typical, gathered


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def chat(i: int, answer: str = "cats purr and sleep a lot") -> dict:
    messages = [{"role": "user", "content": f"tell me about cats {i}"},
                {"role": "assistant", "content": f"{answer} {i}"}]
    return {"id": f"r{i}", "dataset": "d", "reason": "", "messages": messages}


def rows_of(tok, chats):
    return [encode_row(tok, c, 64, "all", ifd=True) for c in chats]


def gate_logits(model, gates, rows, pad_id):
    """Every gate's logits on `rows` with their contrast pass. -> [B, L, T]"""
    batch = collate(rows, pad_id, contrast=True)
    with torch.no_grad(), contrasted(model, batch, batch["attention_mask"], with_nll=False):
        decoder_pass(model, batch["input_ids"], batch["attention_mask"])
    logits = gates.logits()
    gates.clear()
    return logits


def test_typical_gates_read_the_distance_to_the_clean_rows_gaussian_and_save_it(tok, tmp_path):
    kwargs = {"mode": "probe", "contrast": True, "seed": 3}
    plain = attach_gates(tiny_model("tiny-qwen3"), **kwargs).state_dict()
    model = tiny_model("tiny-qwen3")
    gates = attach_gates(model, typical=True, **kwargs)
    assert all(torch.equal(gates.state_dict()[k], v) for k, v in plain.items())  # the seed's other weights as they were
    clean = rows_of(tok, [chat(i) for i in range(16)])
    odd = rows_of(tok, [chat(i, "zq zq zq zq zq zq zq zq zq zq zq zq") for i in range(4)])
    unfitted = gate_logits(model, gates, clean + odd, tok.pad_token_id)

    assert fit_typical(gates, [{**r, "negatives": [r]} for r in clean], 4, tok.pad_token_id, torch.device("cpu")) == 16
    assert torch.equal(gate_logits(model, gates, clean + odd, tok.pad_token_id), unfitted)  # the read starts at w = 0
    for gate in gates.gates:
        torch.nn.init.constant_(gate.typical.weight, -1.0)
    read = unfitted - gate_logits(model, gates, clean + odd, tok.pad_token_id)  # √H · distance  [B, L, T]
    assert read[:1, :, :len(clean[0]["input_ids"])].std(-1).max() < 1e-4  # one value for every token of a row
    distance = read[:, :, 0] / gates.gates[0].gain_scale  # [B, L]
    # in units of the fit rows' median distance: the clean rows sit around 1, the odd answers far beyond them
    assert distance[:16].median(0).values == pytest.approx([1.0] * len(gates.gates), abs=0.15)
    assert (distance[16:].min(0).values > distance[:16].max(0).values).all()

    save_gates(gates, tmp_path, {"base_model": "tiny-qwen3"})
    reloaded_model = tiny_model("tiny-qwen3")
    reloaded = load_gates(reloaded_model, tmp_path)
    assert reloaded.typical
    assert torch.allclose(gate_logits(reloaded_model, reloaded, clean + odd, tok.pad_token_id), unfitted - read,
                          atol=1e-4)


def test_a_floor_leaves_the_typical_rows_alone_and_reads_only_the_distance_above_it(tok):
    model = tiny_model("tiny-qwen3")
    gates = attach_gates(model, mode="probe", contrast=True, typical=True, typical_quantile=0.5, seed=3)
    clean = rows_of(tok, [chat(i) for i in range(16)])
    odd = rows_of(tok, [chat(i, "zq zq zq zq zq zq zq zq zq zq zq zq") for i in range(4)])
    fit_typical(gates, [{**r, "negatives": []} for r in clean], 4, tok.pad_token_id, torch.device("cpu"))
    assert [float(g.typical_floor) for g in gates.gates] == pytest.approx([1.0] * len(gates.gates), abs=1e-4)
    unfitted = gate_logits(model, gates, clean + odd, tok.pad_token_id)
    for gate in gates.gates:
        torch.nn.init.constant_(gate.typical.weight, -1.0)
    read = unfitted - gate_logits(model, gates, clean + odd, tok.pad_token_id)  # √H · distance  [B, L, T]
    distance = read[:, :, 0] / gates.gates[0].gain_scale
    assert ((distance[:16] < 1e-5).sum(0) >= 8).all()  # the half of the fit rows at or below the median read 0
    assert (distance[16:] > 0.5).all()


def test_the_warmup_loop_fits_the_gaussian_before_its_first_step(tok):
    from qgate.training import WarmupLossConfig
    from qgate.warmup_loop import warm_up_alone

    model = tiny_model("tiny-qwen3")
    gates = attach_gates(model, mode="probe", contrast=True, typical=True, seed=0)
    clean = rows_of(tok, [chat(i) for i in range(8)])
    odd = rows_of(tok, [chat(i, "zq zq zq zq zq zq zq zq") for i in range(8)])
    shard = [{**r, "negatives": [{**o, "is_clean": 0.0}]} for r, o in zip(clean, odd)]
    warm_up_alone(model, shard, WarmupLossConfig(), steps=2, batch_size=4, lr=1e-2, pad_id=tok.pad_token_id,
                  contrast=True)
    expected = gates.gates[0].typical_mean.clone()
    assert expected.abs().sum() > 0 and gates.gates[0].typical_precision.abs().sum() > 0
    fit_typical(gates, [{**r, "negatives": []} for r in clean], 4, tok.pad_token_id, torch.device("cpu"))
    assert torch.allclose(gates.gates[0].typical_mean, expected)  # fitted on the originals alone
    assert all(g.typical.weight.detach().abs().item() > 0 for g in gates.gates)  # and learnt by the steps


def test_typical_gates_need_the_contrast_pass_and_probe_mode():
    with pytest.raises(ValueError, match="needs gate.contrast"):
        attach_gates(tiny_model("tiny-qwen3"), mode="probe", contrast=False, typical=True)
    with pytest.raises(ValueError, match="gate.mode=probe"):
        attach_gates(tiny_model("tiny-qwen3"), mode="modulate", contrast=True, typical=True)


def _gather_worker(rank: int, port: int, out) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        features = [np.full((rank + 1, 3), rank, dtype=np.float64), np.full((rank + 1, 2), 10 + rank, dtype=np.float64)]
        out.put((rank, [f.tolist() for f in gathered(features)]))
    finally:
        torch.distributed.destroy_process_group()


def test_every_worker_fits_on_every_workers_rows_in_rank_order():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.Queue()
    workers = [context.Process(target=_gather_worker, args=(rank, port, out)) for rank in range(2)]
    for worker in workers:
        worker.start()
    results = dict(out.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    expected = [[[0.0] * 3] + [[1.0] * 3] * 2, [[10.0] * 2] + [[11.0] * 2] * 2]
    assert results[0] == results[1] == expected


# ---- the halves read (gate.halves): a per-row Gaussian read kept with the gates, not a gate input ----------


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

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from qgate.contrast import contrasted
from qgate.encoding import encode_row
from qgate.gate import attach_gates, load_gates, save_gates
from qgate.stats import decoder_pass
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

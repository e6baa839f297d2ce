import pytest
import torch

from qgate.contrast import alone_batch, contrasted, final_run, prompt_gain, response_pairs
from qgate.encoding import encode_row
from qgate.gate import (
    PromptGain,
    attach_gates,
    freeze_backbone,
    load_gates,
    read_gate_metadata,
    reads_contrast,
    running_mean,
    save_gates,
)
from qgate.stats import Scorer, token_nll
from qgate.tiny import tiny_model, tiny_tokenizer
from qgate.training import WarmupLossConfig, collate, train_step


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def chat(i: int, prompt: str = "tell me about cats", answer: str = "cats purr and sleep a lot") -> dict:
    messages = [{"role": "user", "content": f"{prompt} {i}"}, {"role": "assistant", "content": f"{answer} {i}"}]
    return {"id": f"r{i}", "dataset": "d", "reason": "", "messages": messages}


def encoded(tok, rows, max_length=64):
    return [encode_row(tok, r, max_length, "all", ifd=True) for r in rows]


def contrast_gates(model, layers=None, evidence=False, summary=False, gain=False):
    gates = attach_gates(model, mode="probe", contrast=True, layers=layers, evidence=evidence, summary=summary,
                         gain=gain, bias=False)
    for gate in gates.gates:  # contrast, evidence, summary and gain weights start at 0; make them read something
        for extra in (gate.contrast, gate.evidence, gate.summary, gate.gain):
            if extra is not None:
                torch.nn.init.normal_(extra.weight, std=0.5)
    return gates


def test_final_run_is_the_last_block_of_ones():
    assert final_run([0, 1, 1, 0, 0, 1, 1, 1, 0]) == [5, 6, 7]
    assert final_run([1, 1]) == [0, 1]
    assert final_run([0, 0]) == []


def test_pairs_line_up_the_final_response_token_for_token(tok):
    row = encoded(tok, [chat(0)])[0]
    pairs = response_pairs(row)
    assert len(pairs) == sum(row["response_mask"]) > 3
    assert all(row["input_ids"][f] == row["ifd_input_ids"][a] for f, a in pairs)


def test_pairs_of_a_truncated_row_stop_where_the_full_row_ends(tok):
    whole = encoded(tok, [chat(0)])[0]
    prompt_cut = encoded(tok, [chat(0)], max_length=len(whole["input_ids"]) - 4)[0]  # the prompt gives way first
    assert len(response_pairs(prompt_cut)) == len(response_pairs(whole))
    cut = encoded(tok, [chat(0)], max_length=sum(whole["response_mask"]))[0]  # now the response is cut too
    assert 0 < len(response_pairs(cut)) == sum(cut["response_mask"]) < len(response_pairs(whole))


def test_pairs_stop_at_the_first_token_that_differs(tok):
    row = encoded(tok, [chat(0)])[0]
    positions = [f for f, _ in response_pairs(row)]
    row["input_ids"][positions[2]] += 1  # as if the full row held another token there
    assert len(response_pairs(row)) == 2


def test_running_mean_averages_the_known_positions_so_far():
    values = torch.tensor([[5.0, 1.0, 3.0, 7.0, 2.0]])
    known = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]])
    assert running_mean(values, known).tolist() == [[0.0, 1.0, 2.0, 0.0, 2.0]]


def test_running_mean_of_bf16_evidence_keeps_small_terms_over_a_long_response():
    values = torch.full((1, 2000), 0.01, dtype=torch.bfloat16)  # a bf16 running sum stalls near 2 or 4
    known = torch.ones(1, 2000, dtype=torch.bfloat16)
    exact = values.double().cumsum(1) / torch.arange(1, 2001, dtype=torch.float64)
    assert torch.allclose(running_mean(values, known).double(), exact, rtol=1e-4)


@pytest.mark.parametrize("evidence, summary", [(False, False), (True, False), (True, True)])
def test_contrast_logits_are_the_plain_gate_plus_the_prompt_effect_on_response_tokens(tok, evidence, summary):
    model = tiny_model("tiny-llama")
    gates = contrast_gates(model, layers=[1], evidence=evidence, summary=summary)
    rows = encoded(tok, [chat(0), chat(1, answer="dogs bark")])
    seen = []
    model.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.append(out))
    Scorer(model, tok, gates, alphas=[0.0]).score(rows[:1])
    alone_x, full_x = seen[0][0].clone(), seen[1][0].clone()  # [T', H], [T, H]: the response alone runs first
    gate = gates.gates[0]
    with torch.no_grad():
        plain = full_x @ gate.linear.weight[0]  # [T]
        expected = plain.clone()
        running = []  # evidence: the mean of [x, x − x̃] · u over the response so far
        for full_at, alone_at in response_pairs(rows[0]):
            delta = full_x[full_at] - alone_x[alone_at]
            expected[full_at] += delta @ gate.contrast.weight[0]
            if evidence:
                running.append(torch.cat([full_x[full_at], delta]) @ gate.evidence.weight[0])
                expected[full_at] += sum(running) / len(running)
        if summary:  # every token: x_end · z, read at the row's last token
            expected += full_x[-1] @ gate.summary.weight[0]

    batch = alone_batch(rows[:1], tok.pad_token_id)
    with torch.no_grad(), contrasted(model, batch, torch.ones(1, len(rows[0]["input_ids"]))):
        model(torch.tensor([rows[0]["input_ids"]]))
    assert gates.reference is None  # the block leaves no reference behind
    assert torch.allclose(gates.logits()[0, 0], expected, atol=1e-5)
    prompt = [t for t in range(len(expected)) if t not in {f for f, _ in response_pairs(rows[0])}]
    assert torch.allclose(gates.logits()[0, 0, prompt], plain[prompt], atol=1e-5) is not summary
    assert not torch.allclose(expected, plain, atol=1e-3)  # the contrast term is really there


def test_contrast_scores_do_not_depend_on_batch_mates_and_ifd_is_unchanged(tok):
    model = tiny_model("tiny-qwen3")
    rows = encoded(tok, [chat(i, answer="x " * (i + 1)) for i in range(4)])  # padded to the longest in a batch
    plain = Scorer(model, tok, attach_gates(model, mode="probe"), alphas=[0.0], ifd=True).score(rows)
    model.qgate_gates.remove()
    gates = contrast_gates(model, evidence=True, summary=True, gain=True)
    together = Scorer(model, tok, gates, alphas=[0.0, 1.0], ifd=True).score(rows)
    alone = [Scorer(model, tok, gates, alphas=[0.0, 1.0], ifd=True).score([r])[0] for r in rows]
    for a, b in zip(together, alone):
        assert torch.allclose(torch.tensor(a["S"]), torch.tensor(b["S"]), atol=1e-5)
    assert [r["ifd"] for r in together] == pytest.approx([r["ifd"] for r in plain], rel=1e-5)


@pytest.mark.parametrize("evidence, summary, gain", [(False, False, False), (True, False, False),
                                                     (True, True, False), (True, True, True)])
def test_contrast_gates_save_and_reload_to_identical_scores(tok, tmp_path, evidence, summary, gain):
    model = tiny_model("tiny-llama")
    gates = contrast_gates(model, evidence=evidence, summary=summary, gain=gain)
    rows = encoded(tok, [chat(i) for i in range(3)])
    expected = Scorer(model, tok, gates, alphas=[0.0]).score(rows)
    save_gates(gates, tmp_path)
    meta = read_gate_metadata(tmp_path)
    assert reads_contrast(tmp_path) and (meta["evidence"], meta["summary"], meta["gain"]) == (evidence, summary, gain)
    reloaded = load_gates(tiny_model("tiny-llama"), tmp_path)
    assert reloaded.contrast and (reloaded.evidence, reloaded.summary, reloaded.gain) == (evidence, summary, gain)
    assert Scorer(reloaded.model, tok, reloaded, alphas=[0.0]).score(rows) == expected


def token_nll_of(model, ids: list[int]) -> list[float]:
    """−log p(ids[t] | ids[:t]) from the model's own logits, position 0 gets 0."""
    with torch.no_grad():
        log_p = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [T, V]
    return [0.0] + [-log_p[t - 1, ids[t]].item() for t in range(1, len(ids))]


def test_gain_gates_add_how_much_the_prompt_helps_each_response_token(tok):
    model = tiny_model("tiny-llama")
    gates = contrast_gates(model, layers=[1], gain=True)
    row = encoded(tok, [chat(0)])[0]
    full, alone = token_nll_of(model, row["input_ids"]), token_nll_of(model, row["ifd_input_ids"])
    pairs = response_pairs(row)
    c = gates.gates[0].gain.weight[0].detach() * model.config.hidden_size ** 0.5
    expected, so_far = {}, []
    for full_at, alone_at in pairs:  # √H · [g_t, mean of g up to t] · c
        so_far.append(alone[alone_at] - full[full_at])
        expected[full_at] = c[0] * so_far[-1] + c[1] * sum(so_far) / len(so_far)

    batch = alone_batch([row], tok.pad_token_id)
    attention = torch.ones(1, len(row["input_ids"]))
    with torch.no_grad(), contrasted(model, batch, attention) as alone_nll:
        nll = token_nll(model, torch.tensor([row["input_ids"]]), attention)
    gain = prompt_gain(nll, alone_nll, batch["pairs"])
    added = gates.logits(gain)[0, 0] - gates.logits(PromptGain(gain.values * 0, gain.known))[0, 0]  # [T]
    assert torch.allclose(added, torch.tensor([expected.get(t, 0.0) for t in range(len(added))]), atol=1e-4)
    assert gain.known.sum() == len(pairs) and added.abs().sum() > 1e-3
    assert torch.equal(gates.logits(), gates.logits(PromptGain(gain.values * 0, gain.known)))  # no gain: no term


def test_gain_gates_are_probe_gates_on_the_contrast():
    with pytest.raises(ValueError, match="needs gate.contrast"):
        attach_gates(tiny_model("tiny-llama"), contrast=False, evidence=False, summary=False, gain=True)
    with pytest.raises(ValueError, match="gate.mode=probe"):
        attach_gates(tiny_model("tiny-llama"), mode="modulate", contrast=True, summary=False, gain=True)
    assert not attach_gates(tiny_model("tiny-llama"), mode="modulate", contrast=True, summary=False, gain="auto").gain
    assert attach_gates(tiny_model("tiny-llama"), mode="probe", contrast=True, gain="auto").gain
    assert not attach_gates(tiny_model("tiny-olmoe"), contrast="auto", gain="auto").gain


def test_evidence_of_a_token_reads_only_the_response_up_to_it(tok):
    model = tiny_model("tiny-llama")
    gates = contrast_gates(model, evidence=True)
    short, longer = encoded(tok, [chat(0, answer="cats purr"), chat(0, answer="cats purr and sleep a lot")])
    logits = []
    for row in (short, longer):
        batch = alone_batch([row], tok.pad_token_id)
        with torch.no_grad(), contrasted(model, batch, torch.ones(1, len(row["input_ids"]))):
            model(torch.tensor([row["input_ids"]]))
        logits.append(gates.logits()[0])  # [L, T]
    shared = [f for f, _ in response_pairs(short)][:2]  # "cats purr": the same tokens at the same positions
    assert shared and all(short["input_ids"][t] == longer["input_ids"][t] for t in shared)
    assert torch.allclose(logits[0][:, shared], logits[1][:, shared], atol=1e-5)


def test_warmup_trains_the_contrast_weights_and_needs_the_responses_alone(tok):
    model = tiny_model("tiny-qwen3")
    gates = attach_gates(model, mode="probe", contrast=True, evidence=True, summary=True, gain=True, bias=True,
                         init_bias=3.0)
    optimizer = torch.optim.AdamW(freeze_backbone(model), lr=1e-2)
    rows = encoded(tok, [chat(0), chat(1)]) + [{**r, "is_clean": 0} for r in encoded(tok, [chat(2, answer="zq")])]
    cfg = WarmupLossConfig(negatives_weight=1.0, quality_loss_weight=0.0)
    parts = train_step(model, optimizer, collate(rows, tok.pad_token_id, contrast=True), cfg)
    assert all(extra.weight.abs().sum() > 0 for gate in gates.gates
               for extra in (gate.contrast, gate.evidence, gate.summary, gate.gain))
    assert "ce" not in parts  # the gain needs the NLL; probe gates still train on the negatives loss alone
    with pytest.raises(ValueError, match="contrast=True"):
        train_step(model, optimizer, collate(rows, tok.pad_token_id), cfg)


def test_rows_without_a_response_alone_are_refused_by_name(tok):
    rows = [encode_row(tok, chat(0), 64, "all", ifd=False)]
    with pytest.raises(ValueError, match="ifd=True"):
        alone_batch(rows, tok.pad_token_id)


def test_moe_trash_cans_have_no_contrast_input():
    with pytest.raises(ValueError, match="contrast"):
        attach_gates(tiny_model("tiny-olmoe"), contrast=True)
    with pytest.raises(ValueError, match="evidence"):
        attach_gates(tiny_model("tiny-olmoe"), evidence=True)
    assert not attach_gates(tiny_model("tiny-olmoe"), contrast="auto", evidence="auto").evidence
    assert not attach_gates(tiny_model("tiny-olmoe"), contrast="auto", summary="auto").summary


def test_evidence_needs_the_contrast():
    with pytest.raises(ValueError, match="needs gate.contrast"):
        attach_gates(tiny_model("tiny-llama"), contrast=False, evidence=True)
    assert not attach_gates(tiny_model("tiny-llama"), contrast=False, evidence="auto").evidence


def test_summary_needs_the_contrast_and_probe_mode():
    with pytest.raises(ValueError, match="needs gate.contrast"):
        attach_gates(tiny_model("tiny-llama"), mode="probe", contrast=False, summary=True)
    with pytest.raises(ValueError, match="gate.mode=probe"):  # a modulating gate would read tokens after its own
        attach_gates(tiny_model("tiny-llama"), mode="modulate", contrast=True, summary=True)
    assert attach_gates(tiny_model("tiny-llama"), mode="probe", contrast=True, summary="auto").summary
    assert not attach_gates(tiny_model("tiny-llama"), mode="modulate", contrast=True, summary="auto").summary


def test_summary_reads_the_end_of_the_row(tok):
    model = tiny_model("tiny-llama")
    gates = contrast_gates(model, summary=True)
    whole, cut = encoded(tok, [chat(0, answer="cats purr and sleep a lot"), chat(0, answer="cats purr and sle")])
    shared = [f for f, _ in response_pairs(cut)][:3]
    logits = []
    for row in (whole, cut):
        attention = torch.ones(1, len(row["input_ids"]))
        with torch.no_grad(), contrasted(model, alone_batch([row], tok.pad_token_id), attention):
            model(torch.tensor([row["input_ids"]]))
        logits.append(gates.logits()[0])  # [L, T]
    # the same first tokens gate differently once the row ends elsewhere: the end reaches every token
    assert not torch.allclose(logits[0][:, shared], logits[1][:, shared], atol=1e-3)

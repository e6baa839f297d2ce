import pytest
import torch
from conftest import TINY_ARCHS, toy_rows

from qgate.gate import (
    attach_gates,
    freeze_backbone,
    load_gated_model,
    load_gates,
    save_gated_model,
    save_gates,
)
from qgate.stats import Scorer
from qgate.tiny import tiny_model, tiny_tokenizer
from qgate.training import WarmupLossConfig, collate, train_step

IDS = torch.tensor([[1, 17, 40, 99, 5, 230, 8, 61], [1, 3, 300, 12, 77, 42, 9, 100]])


def logits_of(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_probe_mode_leaves_logits_bit_identical(arch):
    model = tiny_model(arch)
    base = logits_of(model)
    gates = attach_gates(model, mode="probe")
    assert torch.equal(logits_of(model), base)
    assert gates.logits().shape == (2, 2, 8)  # [B, L, T]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_modulate_mode_forced_open_matches_base_and_differs_at_init(arch):
    model = tiny_model(arch)
    base = logits_of(model)
    gates = attach_gates(model, mode="modulate", bias=False, contrast=False)
    with gates.forced(1.0):
        assert torch.allclose(logits_of(model), base, atol=1e-5)
    assert (logits_of(model) - base).abs().max() > 1e-2  # sigmoid ≈ 0.5 at the seed init


def test_gate_logits_read_the_ffn_input():
    model = tiny_model("tiny-llama")
    gates = attach_gates(model, mode="probe", layers=[1], bias=False, contrast=False)
    seen = {}
    model.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    logits_of(model)
    expected = seen["x"] @ gates.gates[0].linear.weight.T  # [B, T, 1]
    assert torch.allclose(gates.logits()[:, 0], expected.squeeze(-1), atol=1e-6)


def test_bad_arguments_are_explained():
    model = tiny_model()
    with pytest.raises(ValueError, match="mode"):
        attach_gates(model, mode="sideways")
    with pytest.raises(ValueError, match="out of range"):
        attach_gates(model, layers=[5])
    with pytest.raises(ValueError, match="no decoder layers"):
        attach_gates(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("mode", ["modulate", "probe"])
def test_warmup_steps_change_only_gate_parameters(mode):
    model = tiny_model("tiny-qwen3")
    attach_gates(model, mode=mode, contrast=False)
    params = freeze_backbone(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = collate(toy_rows(4), pad_id=0)
    for _ in range(3):
        train_step(model, optimizer, batch, WarmupLossConfig())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("quality_gate" in k for k in changed)
    assert {k.split(".quality_gate")[0] for k in changed} == {"model.layers.0", "model.layers.1"}  # both moved


def test_saved_gates_reload_to_identical_scores(tmp_path):
    model = tiny_model("tiny-llama")
    gates = attach_gates(model, mode="modulate", init_std=0.5, seed=3)
    tokenizer = tiny_tokenizer()
    rows = toy_rows(5)
    expected = Scorer(model, tokenizer, gates, alphas=[0.0, 1.0]).score(rows)
    save_gates(gates, tmp_path / "g", {"base_model": "tiny-llama"})

    fresh = tiny_model("tiny-llama")
    reloaded = load_gates(fresh, tmp_path / "g")
    assert reloaded.mode == "modulate" and reloaded.layers == [0, 1]
    assert Scorer(fresh, tokenizer, reloaded, alphas=[0.0, 1.0]).score(rows) == expected

    save_gated_model(model, tokenizer, tmp_path / "full", {"base_model": "tiny-llama"})
    model2, _, gates2 = load_gated_model(tmp_path / "full")
    assert Scorer(model2, tokenizer, gates2, alphas=[0.0, 1.0]).score(rows) == expected


def test_gates_refuse_a_different_model(tmp_path):
    save_gates(attach_gates(tiny_model()), tmp_path, {"base_model": "tiny-qwen3"})
    from transformers import AutoModelForCausalLM

    from qgate.tiny import tiny_config

    wider = AutoModelForCausalLM.from_config(tiny_config().__class__(**{**tiny_config().to_dict(), "hidden_size": 32}))
    with pytest.raises(ValueError, match="hidden size"):
        load_gates(wider, tmp_path)


def test_gates_stay_float32_on_a_bf16_backbone():
    """A bf16 model's gates and their Adam state are float32; their logits come out float32."""
    model = tiny_model("tiny-qwen3").to(torch.bfloat16)
    gates = attach_gates(model, mode="probe", contrast=False)
    optimizer = torch.optim.AdamW(freeze_backbone(model), lr=1e-2)
    assert {p.dtype for p in gates.parameters()} == {torch.float32}
    model(input_ids=IDS)
    logits = gates.logits()  # [B, L, T]
    gates.clear()
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    logits.sigmoid().mean().backward()
    optimizer.step()
    assert all(state["exp_avg"].dtype == torch.float32 for state in optimizer.state.values())


def test_tent_gates_leave_every_other_weight_of_a_seed_and_save_their_centre(tmp_path):
    from qgate.gate import PromptGain

    kwargs = {"mode": "probe", "contrast": True, "gain": True, "seed": 4}
    plain = attach_gates(tiny_model("tiny-qwen3"), tent=False, **kwargs).state_dict()
    model = tiny_model("tiny-qwen3")
    tent = attach_gates(model, tent=True, **kwargs)
    assert {k: v for k, v in tent.state_dict().items() if k in plain}.keys() == plain.keys()
    assert all(torch.equal(tent.state_dict()[k], v) for k, v in plain.items())
    assert all(float(tent.state_dict()[f"layers.{i}.tent.weight"]) == 0 for i in tent.layers)

    # two rows of known gain [1, 3] and [5, 5]; only the first is clean: running means 1, 2 -> centre 1.5
    gain = PromptGain(values=torch.tensor([[1.0, 3.0], [5.0, 5.0]]), known=torch.ones(2, 2))
    tent.track_center(gain, torch.tensor([1.0, 0.0]))
    assert float(tent.gates[0].gain_center) == pytest.approx(1.5)
    tent.track_center(PromptGain(values=torch.tensor([[4.0, 4.0]]), known=torch.ones(1, 2)), torch.tensor([1.0]))
    assert float(tent.gates[1].gain_center) == pytest.approx(0.9 * 1.5 + 0.1 * 4.0)
    tent.track_center(gain, torch.tensor([0.0, 0.0]))  # no clean token: the centre stays
    assert float(tent.gates[1].gain_center) == pytest.approx(1.75)

    for gate in tent.gates:
        torch.nn.init.constant_(gate.tent.weight, 0.5)
    expected = [gate.gain_logits(gain) for gate in tent.gates]
    torch.nn.init.zeros_(tent.gates[0].tent.weight)
    # the tent adds 0.5 · √H · |running mean − 1.75| to the gain's own read
    distance = (torch.tensor([[1.0, 2.0], [5.0, 5.0]]) - 1.75).abs() * tent.gates[0].gain_scale
    assert torch.allclose(expected[0] - tent.gates[0].gain_logits(gain), 0.5 * distance, atol=1e-4)
    torch.nn.init.constant_(tent.gates[0].tent.weight, 0.5)
    save_gates(tent, tmp_path, {"base_model": "tiny-qwen3"})
    reloaded = load_gates(tiny_model("tiny-qwen3"), tmp_path)
    assert reloaded.tent and all(gate.centered for gate in reloaded.gates)
    assert [float(g.gain_center) for g in reloaded.gates] == pytest.approx([1.75, 1.75])
    assert all(torch.allclose(g.gain_logits(gain), e) for g, e in zip(reloaded.gates, expected))


def test_surprise_gates_read_how_far_the_responses_loss_sits_from_the_clean_rows_and_save_that_centre(tmp_path):
    from qgate.gate import PromptGain

    kwargs = {"mode": "probe", "contrast": True, "gain": True, "tent": True, "seed": 4}
    plain = attach_gates(tiny_model("tiny-qwen3"), **kwargs).state_dict()
    gates = attach_gates(tiny_model("tiny-qwen3"), surprise=True, **kwargs)
    assert all(torch.equal(gates.state_dict()[k], v) for k, v in plain.items())  # the seed's other weights as they were

    # NLL [1, 3] on the clean row, [0, 0] on a loop-like copy: running means 1, 2 -> clean centre 1.5
    gain = PromptGain(values=torch.zeros(2, 2), known=torch.ones(2, 2), nll=torch.tensor([[1.0, 3.0], [0.0, 0.0]]))
    gates.track_center(gain, torch.tensor([1.0, 0.0]))
    assert [float(g.nll_center) for g in gates.gates] == pytest.approx([1.5] * len(gates.gates))
    before = [g.gain_logits(gain) for g in gates.gates]
    for gate in gates.gates:
        torch.nn.init.constant_(gate.surprise.weight, -0.5)
    after = [g.gain_logits(gain) for g in gates.gates]
    # the read adds −0.5 · √H · |running mean NLL − 1.5|: the copy, far below the centre, is pushed down most
    distance = (torch.tensor([[1.0, 2.0], [0.0, 0.0]]) - 1.5).abs() * gates.gates[0].gain_scale
    assert torch.allclose(after[0] - before[0], -0.5 * distance, atol=1e-4)

    save_gates(gates, tmp_path, {"base_model": "tiny-qwen3"})
    reloaded = load_gates(tiny_model("tiny-qwen3"), tmp_path)
    assert reloaded.surprise and [float(g.nll_center) for g in reloaded.gates] == pytest.approx([1.5] * len(gates.gates))
    assert all(torch.allclose(g.gain_logits(gain), a) for g, a in zip(reloaded.gates, after))
    with pytest.raises(ValueError, match="needs gate.gain"):
        attach_gates(tiny_model("tiny-qwen3"), mode="probe", contrast=True, gain=False, tent=False, surprise=True)


def test_a_tent_needs_the_gain_it_reads():
    with pytest.raises(ValueError, match="needs gate.gain"):
        attach_gates(tiny_model("tiny-qwen3"), mode="probe", contrast=True, gain=False, tent=True)


def test_the_gain_reads_can_learn_at_their_own_rate_and_every_gate_weight_is_in_one_group():
    from qgate.gate import optimizer_groups

    gates = attach_gates(tiny_model("tiny-qwen3"), mode="probe", contrast=True, gain=True, tent=True)
    wide, gain = optimizer_groups(gates, lr=1e-2, gain_lr_scale=10.0)
    assert (wide["lr"], gain["lr"]) == (1e-2, pytest.approx(0.1))
    assert {id(p) for p in wide["params"]} | {id(p) for p in gain["params"]} == {id(p) for p in gates.parameters()}
    assert not {id(p) for p in wide["params"]} & {id(p) for p in gain["params"]}
    assert sorted(p.numel() for p in gain["params"]) == [1] * len(gates.layers) + [2] * len(gates.layers)
    assert len(optimizer_groups(attach_gates(tiny_model("tiny-qwen3"), mode="probe", gain=False), lr=1e-2)) == 1

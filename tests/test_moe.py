"""Select-MoE trash-can experts on tiny OLMoE and Qwen3-MoE decoders: exactness, frozen experts, losses, save/load."""

import json

import pytest
import torch
from conftest import toy_rows

from qgate.gate import (
    attach_gates,
    freeze_backbone,
    load_gated_model,
    load_gates,
    save_gated_model,
    save_gates,
)
from qgate.moe import TrashCanGateSet, beta_constraint_loss
from qgate.stats import Scorer, token_nll
from qgate.tiny import tiny_model, tiny_tokenizer
from qgate.training import WarmupLossConfig, collate, train_step, warmup_loss

pytestmark = pytest.mark.timeout(120)

MOE_ARCHS = ["tiny-olmoe", "tiny-qwen3-moe"]
IDS = torch.tensor([[1, 17, 40, 99, 5, 230, 8, 61], [1, 3, 300, 12, 77, 42, 9, 100]])


def logits_of(model):
    with torch.no_grad():
        return model(IDS).logits


def routed_as(model, implementation: str, norm_topk_prob: bool):
    """The model with the given experts kernel and top-k normalisation in every router."""
    model.config._experts_implementation = implementation
    for layer in model.model.layers:
        layer.mlp.gate.norm_topk_prob = norm_topk_prob
    return model


def frozen_backbone(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "quality_gate" not in k}


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_mass_forced_onto_real_experts_reproduces_the_base_model(arch, implementation, norm_topk_prob):
    model = routed_as(tiny_model(arch), implementation, norm_topk_prob)
    base = logits_of(model)
    gates = attach_gates(model, mode="modulate", bias=True, init_bias=0.0)
    assert isinstance(gates, TrashCanGateSet) and gates.layers == [0, 1]
    assert (logits_of(model) - base).abs().max() > 1e-4  # a third of the mass goes to trash at this init
    with gates.forced(1.0):
        assert (logits_of(model) - base).abs().max() <= 1e-5
    with torch.no_grad():
        for gate in gates.gates:
            gate.linear.bias.fill_(-1e4)  # trash logits far below every real one: softmax mass exactly 0
    assert (logits_of(model) - base).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_probe_mode_leaves_logits_bit_identical(arch):
    model = tiny_model(arch)
    base = logits_of(model)
    gates = attach_gates(model, mode="probe")
    assert torch.equal(logits_of(model), base)
    assert gates.logits().shape == (2, 2, 8)  # [B, L, T]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_ratio_is_the_real_experts_share_of_the_extended_softmax(arch):
    model = tiny_model(arch)
    gates = attach_gates(model, mode="probe", bias=True, init_bias=3.0, init_std=0.5)
    seen = {}
    model.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    logits_of(model)
    x = seen["x"]  # [B, T, H]
    router, trash = model.model.layers[1].mlp.gate, gates.gates[1].linear
    probs = torch.softmax(torch.cat([x @ router.weight.T, trash(x)], dim=-1), dim=-1)  # [B, T, E + n]
    ratio = torch.sigmoid(gates.logits())  # [B, L, T]
    assert torch.allclose(ratio[:, 1], probs[..., :router.num_experts].sum(-1), atol=1e-5)
    assert ((ratio >= 0) & (ratio <= 1)).all() and 0.5 < ratio.mean() < 1.0
    assert trash.out_features == router.top_k


@pytest.mark.parametrize("train_router", [False, True])
def test_warmup_steps_keep_the_experts_bit_identical(train_router):
    model = tiny_model("tiny-olmoe")
    before = frozen_backbone(model)
    gates = attach_gates(model, bias=True, init_bias=3.0, train_router=train_router)
    assert all(torch.equal(v, before[k]) for k, v in frozen_backbone(model).items())
    trash_before = [g.linear.weight.clone() for g in gates.gates]
    optimizer = torch.optim.AdamW(freeze_backbone(model), lr=1e-2)
    batch = collate(toy_rows(4), pad_id=0)
    for _ in range(3):
        parts = train_step(model, optimizer, batch, WarmupLossConfig(negatives_weight=0.0))
    assert 0.0 < min(parts["good_ratio"]) and max(parts["good_ratio"]) < 1.0
    changed = {k for k, v in frozen_backbone(model).items() if not torch.equal(v, before[k])}
    assert changed == ({f"model.layers.{i}.mlp.gate.weight" for i in (0, 1)} if train_router else set())
    assert all(not torch.equal(g.linear.weight, w) for g, w in zip(gates.gates, trash_before))


def test_warmup_loss_adds_the_trash_can_losses():
    model = tiny_model("tiny-olmoe")
    attach_gates(model, mode="modulate", bias=True, init_bias=3.0, constraint_loss_weight=0.5,
                 load_balancing_weight=0.25)
    seeds_losses = WarmupLossConfig(quality_loss_weight=1.0, negatives_weight=0.0)
    total, parts = warmup_loss(model, collate(toy_rows(4), pad_id=0), seeds_losses)
    expected = parts["ce"] + parts["quality"] + 0.5 * parts["constraint"] + 0.25 * parts["load_balancing"]
    assert parts["constraint"] > 0 and parts["load_balancing"] > 0
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_constraint_loss_goes_down_under_training():
    model = tiny_model("tiny-qwen3-moe")
    gates = attach_gates(model, bias=True, init_bias=3.0, trash_can_loss_beta=5.0, constraint_loss_weight=1.0,
                         load_balancing_weight=0.01)
    optimizer = torch.optim.AdamW(freeze_backbone(model), lr=5e-2)
    batch = collate(toy_rows(4), pad_id=0)
    history = []
    for _ in range(6):
        token_nll(model, batch["input_ids"], batch["attention_mask"])
        total, parts = gates.aux_loss(batch["attention_mask"])
        gates.clear()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(parts["constraint"])
        assert parts["load_balancing"] > 0
    assert history[-1] < history[0] - 0.1


def test_beta_constraint_loss_formula():
    ratio = torch.tensor([[[0.2, 0.4, 0.9]], [[0.6, 0.0, 0.5]]])  # [B=2, L=1, T=3]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    r = (0.2 + 0.4 + 0.6) / 3
    assert beta_constraint_loss(ratio, mask, beta=5.0).item() == pytest.approx(-4.0 * torch.log(torch.tensor(1 - r)))
    assert beta_constraint_loss(ratio, mask, beta=1.0, alpha=3.0).item() == pytest.approx(-2.0 * torch.log(
        torch.tensor(r)))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_saved_trash_cans_reload_to_identical_scores(arch, tmp_path):
    model = tiny_model(arch)
    gates = attach_gates(model, bias=True, init_bias=1.0, init_std=0.3, train_router=True, seed=3)
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.mul_(1.5)  # as if warmup had trained the router
    tokenizer, rows = tiny_tokenizer(), toy_rows(5)
    expected = Scorer(model, tokenizer, gates, alphas=[0.0, 1.0]).score(rows)
    assert len(expected[0]["S"]) == 2 and len(expected[0]["S"][0]) == 2  # [A, L]
    save_gates(gates, tmp_path / "g", {"base_model": arch})
    meta = json.loads((tmp_path / "g" / "gates.json").read_text())
    assert meta["kind"] == "trash_can" and meta["n_trash"] == 2 and meta["train_router"] is True

    fresh = tiny_model(arch)
    reloaded = load_gates(fresh, tmp_path / "g")
    assert isinstance(reloaded, TrashCanGateSet) and reloaded.settings.train_router
    assert Scorer(fresh, tokenizer, reloaded, alphas=[0.0, 1.0]).score(rows) == expected

    save_gated_model(model, tokenizer, tmp_path / "full", {"base_model": arch})
    model2, _, gates2 = load_gated_model(tmp_path / "full")
    assert Scorer(model2, tokenizer, gates2, alphas=[0.0, 1.0]).score(rows) == expected


def test_dense_gates_still_attach_to_an_moe_model_when_asked(tmp_path):
    model = tiny_model("tiny-olmoe")
    gates = attach_gates(model, kind="dense")
    assert not isinstance(gates, TrashCanGateSet)
    save_gates(gates, tmp_path)
    assert not isinstance(load_gates(tiny_model("tiny-olmoe"), tmp_path), TrashCanGateSet)


def test_bad_settings_are_explained(tmp_path):
    with pytest.raises(TypeError, match="unknown gate settings"):
        attach_gates(tiny_model("tiny-qwen3"), trash_cans=3)
    with pytest.raises(ValueError, match="trash_can_loss_on"):
        attach_gates(tiny_model("tiny-olmoe"), trash_can_loss_on="both")
    with pytest.raises(ValueError, match="sparse MoE layers"):
        attach_gates(tiny_model("tiny-olmoe"), layers=[4])
    save_gates(attach_gates(tiny_model("tiny-olmoe")), tmp_path)
    with pytest.raises(ValueError, match="experts"):
        load_gates(tiny_model("tiny-qwen3"), tmp_path)


@pytest.fixture(scope="module")
def own_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.mark.timeout(900)
def test_pipeline_runs_every_stage_on_tiny_olmoe(own_ray, tmp_path):
    from test_pipeline import assert_complete_run, tiny_args

    from ray_jobs.cli import main
    from qgate.demo_corpus import build_demo_corpus

    corpus = build_demo_corpus(tmp_path / "corpus", n_rows=60, seed=1, noise_fraction=0.2)
    args = [a for a in tiny_args(corpus["data_dir"], tmp_path / "run") if not a.startswith("model=")]
    main(["pipeline", *args, "model=tiny-olmoe", "selection.strategy=cluster_round_robin", "selection.n_clusters=3"])
    stats = assert_complete_run(tmp_path / "run", corpus["n_rows"], 0.25)
    meta = json.loads((tmp_path / "run" / "gates" / "gates.json").read_text())
    assert meta["kind"] == "trash_can" and meta["n_trash"] == 2
    assert stats["strategy"] == "cluster_round_robin" and len(stats["clusters"]) == 3

import pytest
import torch
from conftest import toy_rows

from qgate.gate import attach_gates, freeze_backbone
from qgate.losses import LOSS_TYPES, negatives_loss, quality_loss, sample_gate_scores
from qgate.scoring import layer_scores
from qgate.stats import pad
from qgate.tiny import tiny_model
from qgate.training import collate


def gated_good_ratio(model, batch):
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = model.qgate_gates.logits()
    model.qgate_gates.clear()
    return torch.sigmoid(logits)  # [B, L, T]


@pytest.mark.parametrize("sample_wise", [True, False])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_goes_down_under_training(loss_type, sample_wise):
    model = tiny_model("tiny-qwen3")
    attach_gates(model, mode="probe", init_std=0.3)
    optimizer = torch.optim.Adam(freeze_backbone(model), lr=0.05)
    batch = collate(toy_rows(6), pad_id=0)
    losses = []
    for _ in range(8):
        loss = quality_loss(gated_good_ratio(model, batch), batch["score_mask"], loss_type, sample_wise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-4, losses


@pytest.mark.parametrize("sample_wise", [True, False])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_padding_does_not_change_the_loss(loss_type, sample_wise):
    g = torch.Generator().manual_seed(1)
    ratio = torch.rand(3, 2, 5, generator=g)  # [B, L, T]
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    padded_ratio = torch.cat([ratio, torch.rand(3, 2, 4, generator=g)], dim=2)  # junk in the padding
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=mask.dtype)], dim=1)
    a = quality_loss(ratio, mask, loss_type, sample_wise)
    b = quality_loss(padded_ratio, padded_mask, loss_type, sample_wise)
    assert torch.allclose(a, b, atol=1e-6)


def test_linear_loss_is_the_mean_good_ratio():
    ratio = torch.tensor([[[0.2, 0.4, 0.9]], [[0.6, 0.8, 0.0]]])  # [B=2, L=1, T=3]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert quality_loss(ratio, mask, "linear", True).item() == pytest.approx((0.3 + 1.4 / 3) / 2)
    assert quality_loss(ratio, mask, "linear", False).item() == pytest.approx(2.0 / 5)
    assert quality_loss(ratio, mask, "sigmoid", False).item() == pytest.approx(2.0 / 5)


def test_sample_gate_scores_match_numpy_scoring():
    g = torch.Generator().manual_seed(2)
    logits, nll = torch.randn(2, 3, 6, generator=g), torch.rand(2, 6, generator=g) * 5
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    got = sample_gate_scores(logits, nll, mask, alpha=2.0)  # [B, L]
    for i in range(2):
        keep = mask[i].bool()
        expected = layer_scores(logits[i][:, keep].double().numpy(), nll[i][keep].double().numpy(), alpha=2.0)
        assert torch.allclose(got[i].double(), torch.from_numpy(expected), atol=1e-6)


def test_negatives_loss_rewards_open_gates_on_originals():
    nll, mask = torch.ones(2, 4), torch.ones(2, 4)
    is_clean = torch.tensor([1.0, 0.0])
    right = torch.tensor([[[3.0] * 4], [[-3.0] * 4]])  # open on the original, closed on the copy
    assert negatives_loss(right, nll, mask, is_clean) < negatives_loss(-right, nll, mask, is_clean)
    assert pad([[1], [1, 2]], 0).tolist() == [[1, 0], [1, 2]]


def test_probe_warmup_skips_the_lm_head_and_trains_the_same_gates():
    """Probe gates with uniform token weights: the loss without the LM head has the gradients of the full one."""
    from qgate.stats import token_nll
    from qgate.training import WarmupLossConfig, warmup_loss

    model = tiny_model("tiny-qwen3")
    gates = attach_gates(model, mode="probe", init_std=0.3, contrast=False)
    freeze_backbone(model)
    rows = toy_rows(4)
    batch = collate(rows + [{**r, "is_clean": 0.0} for r in toy_rows(4, seed=1)], pad_id=0)
    cfg = WarmupLossConfig(quality_loss_weight=0.0, negatives_weight=1.0, negatives_alpha=0.0)
    total, parts = warmup_loss(model, batch, cfg)
    assert "ce" not in parts
    total.backward()
    skipped = [p.grad.clone() for p in gates.parameters()]
    model.zero_grad()
    nll = token_nll(model, batch["input_ids"], batch["attention_mask"])  # the full pass, head included
    full = negatives_loss(model.qgate_gates.logits(), nll, batch["score_mask"], batch["is_clean"], alpha=0.0)
    model.qgate_gates.clear()
    full.backward()
    assert full.item() == pytest.approx(total.item(), abs=1e-6)
    for a, p in zip(skipped, gates.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-7)

"""Select-MoE (seed 003): trash-can experts in the routers of MoE decoders (OLMoE, Qwen3-MoE).

Each chosen layer's router (`mlp.gate`: E experts, top-k) gets `n_trash = top_k` more rows whose experts output
zeros. Per token, over the E + n_trash router logits:
    p = softmax([router(x), trash(x)])                                        # [N, E + n]
    ratio = Σ_{e < E} p_e                                                     (routing mass on real experts)
    g = log(ratio / (1 − ratio)) = logsumexp(real logits) − logsumexp(trash logits), clamped to ±LOGIT_LIMIT
`GateSet.logits()` returns g, so sigmoid(g) = ratio feeds warmup, S, select and serve unchanged.

- `modulate`: top-k routing over all E + n experts, normalised as the model does (`norm_topk_prob`: over the k
  chosen, trash included), then the trash slots are dropped (they add zero). With norm_topk_prob=False (OLMoE,
  Qwen3-MoE defaults) every real expert's weight shrinks by the trash mass, the MoE analogue of the dense gate.
- `probe`: the model routes as before; g is only read.

The experts are never touched; the router weights change only when `train_router` (the seed's full-rank mode for
the router) and warmup trains them. The trash rows live as `layer.quality_gate` (so `save_gated_model` works as for
dense gates) and act through a forward hook on the router. Init: trash weights ~ N(init_mean, init_std) as the
seed's `trash_can_init_mean/std`; with `bias`, a trash bias of log(E / n) − init_bias, so that while the router
logits are about equal, ratio ≈ sigmoid(init_bias) (0.95 for the default 3.0): little mass goes to trash at start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from qgate.gate import MODES, GateSet, find_decoder_layers
from qgate.settings import GATE

KIND = "trash_can"
LOGIT_LIMIT = 30.0  # |g| cap: sigmoid(±30) is 0 or 1 in float32; keeps forced or -inf trash logits finite
LOSS_ON = ("ratio", "trash")


@dataclass
class TrashCanSettings:
    """The MoE part of the `gate:` settings (qgate/settings.py says what each does)."""

    train_router: bool = GATE.train_router
    trash_can_loss_beta: float = GATE.trash_can_loss_beta
    constraint_loss_weight: float = GATE.constraint_loss_weight
    trash_can_loss_on: str = GATE.trash_can_loss_on
    load_balancing_weight: float | None = GATE.load_balancing_weight


def settings_of(values: dict) -> TrashCanSettings:
    """Validated settings from keyword arguments; unknown keys raise."""
    known = {f.name for f in fields(TrashCanSettings)}
    unknown = set(values) - known
    if unknown:
        raise TypeError(f"unknown gate settings {sorted(unknown)}; trash-can settings are {sorted(known)}")
    settings = TrashCanSettings(**values)
    if settings.trash_can_loss_on not in LOSS_ON:
        raise ValueError(f"trash_can_loss_on must be one of {LOSS_ON}, got {settings.trash_can_loss_on!r}")
    return settings


def moe_router(block: nn.Module) -> nn.Module | None:
    """The top-k router of a decoder block's sparse MoE (`mlp.gate` beside `mlp.experts`), else None."""
    mlp = getattr(block, "mlp", None)
    router = getattr(mlp, "gate", None)
    if getattr(mlp, "experts", None) is None or not all(hasattr(router, a) for a in ("weight", "top_k", "num_experts")):
        return None
    return router


def moe_layers(model: nn.Module) -> list[int]:
    return [i for i, block in enumerate(find_decoder_layers(model)) if moe_router(block) is not None]


def is_moe(model: nn.Module) -> bool:
    return bool(moe_layers(model))


class TrashCan(nn.Module):
    """The router rows of one layer's trash-can experts: `x · W_t (+ b_t)`, one logit per trash expert."""

    def __init__(self, hidden_size: int, n_trash: int, init_mean: float, init_std: float, bias: bool,
                 init_bias: float):
        super().__init__()
        self.linear = nn.Linear(hidden_size, n_trash, bias=bias)
        nn.init.normal_(self.linear.weight, mean=init_mean, std=init_std)
        if bias:
            nn.init.constant_(self.linear.bias, init_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(self.linear.weight.dtype))  # [N, H] -> [N, n]


# ---- routing math --------------------------------------------------------------------------------------


def ratio_logit(logits: torch.Tensor, n_experts: int) -> torch.Tensor:
    """g = log(ratio / (1 − ratio)) over real+trash router logits. [N, E + n] -> [N] float32"""
    logits = logits.float()
    g = logits[:, :n_experts].logsumexp(-1) - logits[:, n_experts:].logsumexp(-1)
    return g.clamp(-LOGIT_LIMIT, LOGIT_LIMIT)


def forced_log_probs(real_logits: torch.Tensor, ratio: float, n_trash: int) -> torch.Tensor:
    """Log-probabilities with exactly `ratio` on the real experts (as the router splits it), the rest on trash."""
    log_real = math.log(ratio) if ratio > 0 else -math.inf
    log_trash = math.log((1.0 - ratio) / n_trash) if ratio < 1 else -math.inf
    real = F.log_softmax(real_logits.float(), dim=-1) + log_real  # [N, E]
    return torch.cat([real, real.new_full((real.shape[0], n_trash), log_trash)], dim=-1)  # [N, E + n]


def top_k_routing(log_probs: torch.Tensor, top_k: int, n_experts: int, norm_topk_prob: bool,
                  trash_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, k] float32, expert index [N, k]) of top-k routing over real+trash; trash slots get weight 0
    and index `trash_index` (a slot the experts skip, or any real expert, which the zero weight cancels)."""
    weights, index = log_probs.exp().topk(top_k, dim=-1)  # [N, k]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    trash = index >= n_experts  # [N, k]
    return weights.masked_fill(trash, 0.0), index.masked_fill(trash, trash_index)


def trash_index_for(experts: nn.Module, n_experts: int) -> int:
    """HF's eager experts loop skips index E (its expert-parallel sentinel); the kernels need a real index."""
    impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    return n_experts if impl in (None, "eager") else 0


# ---- losses --------------------------------------------------------------------------------------------


def beta_constraint_loss(ratio: torch.Tensor, mask: torch.Tensor, beta: float, alpha: float = 1.0,
                         eps: float = 1e-6) -> torch.Tensor:
    """`−((α−1)·log r + (β−1)·log(1−r))` on each layer's mean r over the masked tokens, averaged over layers.

    ratio [B, L, T] in [0, 1], mask [B, T] -> scalar. As the seed computes it: one r per layer and batch.
    """
    mask = mask.to(ratio.dtype).unsqueeze(1)  # [B, 1, T]
    r = (ratio * mask).sum((0, 2)) / mask.sum((0, 2)).clamp_min(1.0)  # [L]
    r = r.clamp(eps, 1.0 - eps)
    return -((alpha - 1.0) * r.log() + (beta - 1.0) * (1.0 - r).log()).mean()


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, mask: torch.Tensor) -> torch.Tensor:
    """The Switch-Transformer balance loss over real+trash experts, as the model's own aux loss computes it."""
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    n_all = router_logits[0].shape[-1]
    return load_balancing_loss_func(tuple(router_logits), num_experts=n_all, top_k=top_k, attention_mask=mask)


# ---- the gate set --------------------------------------------------------------------------------------


class TrashCanGateSet(GateSet):
    """Trash-can experts behind the `GateSet` interface: `logits()` is logit(ratio) [B, L, T]."""

    kind = KIND
    contrast = False
    evidence = False
    summary = False
    gain = False
    tent = False
    surprise = False
    typical = False
    typical_quantile = 0.0
    halves = None

    def __init__(self, model: nn.Module, mode: str, layers: list[int], gates: list[TrashCan],
                 settings: TrashCanSettings):
        self.model, self.mode, self.layers, self.gates, self.settings = model, mode, layers, gates, settings
        self.forced_ratio: float | None = None
        blocks = find_decoder_layers(model)
        self.routers = [moe_router(blocks[i]) for i in layers]
        self.experts = [blocks[i].mlp.experts for i in layers]
        self._logits: list[torch.Tensor | None] = [None] * len(gates)
        self._router_logits: list[torch.Tensor | None] = [None] * len(gates)
        self._shapes: list[torch.Size | None] = [None] * len(gates)
        self._hooks = []
        for slot, index in enumerate(layers):
            blocks[index].quality_gate = gates[slot]
            self._hooks.append(blocks[index].mlp.register_forward_pre_hook(self._shape_hook(slot)))
            self._hooks.append(self.routers[slot].register_forward_hook(self._route_hook(slot)))

    def _shape_hook(self, slot: int):
        def hook(module, args):
            self._shapes[slot] = args[0].shape[:-1]  # [B, T]
        return hook

    def _route_hook(self, slot: int):
        def hook(router, args, output):
            real_logits = output[0]  # [N, E]
            hidden = args[0].reshape(-1, args[0].shape[-1])  # [N, H]
            logits = torch.cat([real_logits, self.gates[slot](hidden).to(real_logits.dtype)], dim=-1)  # [N, E + n]
            self._router_logits[slot] = logits
            self._logits[slot] = ratio_logit(logits, router.num_experts).view(self._shapes[slot])  # [B, T]
            if self.mode != "modulate":
                return None
            return (real_logits, *self._route(slot, router, logits))
        return hook

    def _route(self, slot: int, router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_experts = router.num_experts
        if self.forced_ratio is None:
            log_probs = F.log_softmax(logits.float(), dim=-1)  # [N, E + n]
        else:
            log_probs = forced_log_probs(logits[:, :n_experts], self.forced_ratio, logits.shape[-1] - n_experts)
        weights, index = top_k_routing(log_probs, router.top_k, n_experts, router.norm_topk_prob,
                                       trash_index_for(self.experts[slot], n_experts))
        return weights.to(logits.dtype), index  # [N, k], [N, k]

    def clear(self) -> None:
        super().clear()
        self._router_logits = [None] * len(self.gates)

    @property
    def load_balancing_weight(self) -> float:
        weight = self.settings.load_balancing_weight
        return float(getattr(self.model.config, "router_aux_loss_coef", 0.0) if weight is None else weight)

    def aux_loss(self, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """w_constraint · Beta constraint + w_balance · load balancing of the last forward pass; mask [B, T].

        Call before `clear()`. Returns the weighted sum and its unweighted parts (floats) for logging.
        """
        ratio = torch.sigmoid(self.logits().float())  # [B, L, T]
        target = ratio if self.settings.trash_can_loss_on == "ratio" else 1.0 - ratio
        constraint = beta_constraint_loss(target, mask, self.settings.trash_can_loss_beta)
        balance = load_balancing_loss(self._router_logits, self.routers[0].top_k, mask)
        total = self.settings.constraint_loss_weight * constraint + self.load_balancing_weight * balance
        return total, {"constraint": constraint.item(), "load_balancing": float(balance.detach())}

    def parameters(self) -> list[nn.Parameter]:
        trash = [p for gate in self.gates for p in gate.parameters()]
        return trash + ([router.weight for router in self.routers] if self.settings.train_router else [])

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"layers.{index}.trash.{name}": tensor.detach().cpu().contiguous()
                 for index, gate in zip(self.layers, self.gates)
                 for name, tensor in gate.linear.state_dict().items()}
        if self.settings.train_router:
            state.update({f"layers.{index}.router.weight": router.weight.detach().cpu().contiguous()
                          for index, router in zip(self.layers, self.routers)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for index, gate, router in zip(self.layers, self.gates, self.routers):
            prefix = f"layers.{index}.trash."
            gate.linear.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            key = f"layers.{index}.router.weight"
            if self.settings.train_router:
                with torch.no_grad():
                    router.weight.copy_(state[key])

    def extra_metadata(self) -> dict:
        router = self.routers[0]
        return {"kind": KIND, "n_experts": int(router.num_experts), "n_trash": self.gates[0].linear.out_features,
                "top_k": int(router.top_k), "norm_topk_prob": bool(router.norm_topk_prob),
                **{f.name: getattr(self.settings, f.name) for f in fields(TrashCanSettings)}}


def _chosen_layers(model: nn.Module, layers: list[int] | None) -> list[int]:
    available = moe_layers(model)
    chosen = available if layers is None else sorted(int(i) for i in layers)
    missing = [i for i in chosen if i not in available]
    if not chosen or missing:
        raise ValueError(f"trash-can layers {chosen} must be sparse MoE layers of this model ({available})")
    return chosen


def attach_trash_cans(model: nn.Module, mode: str = GATE.mode, init_mean: float = GATE.init_mean,
                      init_std: float = GATE.init_std, bias: bool = GATE.bias, init_bias: float = GATE.init_bias,
                      layers: list[int] | None = GATE.layers, seed: int = 0,
                      **settings) -> TrashCanGateSet:
    """Add `top_k` trash-can experts to the router of each chosen MoE layer (all by default)."""
    if mode not in MODES:
        raise ValueError(f"gate mode must be one of {MODES}, got {mode!r}")
    settings = settings_of(settings)
    layers = _chosen_layers(model, layers)
    blocks = find_decoder_layers(model)
    routers = [moe_router(blocks[i]) for i in layers]
    reference = routers[0].weight
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gates = [TrashCan(model.config.hidden_size, r.top_k, init_mean, init_std, bias,
                          math.log(r.num_experts / r.top_k) - init_bias) for r in routers]
    gates = [g.to(device=reference.device, dtype=reference.dtype) for g in gates]
    gate_set = TrashCanGateSet(model, mode, layers, gates, settings)
    model.qgate_gates = gate_set
    return gate_set


def check_loadable(model: nn.Module, meta: dict) -> None:
    """Saved trash cans fit this model: the same expert count in every layer they sit on."""
    blocks = find_decoder_layers(model)
    for index in meta["layers"]:
        router = moe_router(blocks[index])
        if router is None or router.num_experts != meta["n_experts"]:
            raise ValueError(f"trash cans for layer {index} were made for a router of {meta['n_experts']} experts; "
                             f"this model's layer {index} has {getattr(router, 'num_experts', 'no')} experts")


def saved_settings(meta: dict) -> dict:
    return {f.name: meta[f.name] for f in fields(TrashCanSettings) if f.name in meta}

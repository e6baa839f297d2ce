"""The quality gate: a tiny linear probe before the FFN of every decoder layer of any HF causal decoder.

In each chosen layer the gate reads the FFN input x (the output of `post_attention_layernorm`):
`score = x · w`, `good_ratio = sigmoid(score)`. A contrast gate (`contrast=True`) also reads, on the tokens of
the final response, how the prompt changed them: `score = x · w + (x − x̃) · v`, where x̃ is the same token's FFN
input when the response runs without its prompt (`qgate.contrast` runs that pass and sets `GateSet.reference`).
An evidence gate (`evidence=True`, on top of contrast) adds the running mean, over the final response up to the
token, of a second projection `[x, x − x̃] · u`: a mismatch between prompt and response shows weakly in each token,
and the running mean lets later tokens' gates add it up.
A summary gate (`summary=True`, on top of contrast, probe mode only) adds to every token one read of the row's
last token, `x_end · z`: as in a reward model, the last token has seen the whole row, so a cut answer or one that
ends off the point shows there.
A gain gate (`gain=True`, on top of contrast, probe mode only) adds, on the final response's tokens, a read of how
much the prompt helps predict each token, `√H · [g_t, mean_{u≤t} g_u] · c` with g_t = NLL(token | response alone) −
NLL(token | prompt + response): an answer that belongs to another question is fluent but its prompt does not help.
The gain comes from the LM head, after the pass, so it joins the logits in `GateSet.logits(gain)`.
A tent gate (`tent=True`, on top of gain) also reads how far the running mean gain sits from the clean warmup rows'
(an EMA kept in warmup, saved with the gate): a clean answer sits between "the prompt explains nothing" (an answer
to another question) and "it explains everything" (an echo, the model's own answer), whichever side the negatives
were on. A surprise gate (`surprise=True`, on top of gain) reads the same distance for the response's own loss,
√H · |running mean NLL(token | prompt + response) − the clean rows' mean|: text far easier than a real answer (a
loop, an echo) and far harder (noise, residue) sit on either side of it.
A typical gate (`typical=True`, on top of contrast, probe mode only) adds to every token a read of how far the
whole response's mean FFN input sits from the clean warmup rows', the Mahalanobis distance to a Gaussian fitted
on them before warmup (`qgate.typical`, saved with the gate): a read no corruption kind shapes, which sees a loop,
a mixed language or a wrong format as far from a real answer.
- `modulate`: the FFN output is scaled, `h = residual + good_ratio · MLP(x)`; `1 − good_ratio` goes to a zero path.
- `probe`: the gate only reads x; the model's outputs are untouched.

The gate lives as `layer.quality_gate` and acts through hooks on `layer.mlp`, so the backbone's own state-dict
keys never change and the gates save and load on their own (`gates.safetensors` + `gates.json`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import qgate
from qgate.settings import GATE

MODES = ("modulate", "probe")
GATES_FILE = "gates.safetensors"
GATES_META = "gates.json"
GATES_FORMAT = 1
# optional extra projections of a gate, saved as layers.{i}.{name}.weight
EXTRA_INPUTS = ("contrast", "evidence", "summary", "gain", "tent", "surprise", "typical")
CENTER_EMA = 0.9  # tent gates: weight of the kept clean-row centre against each new batch's
# the clean-row centres tent and surprise gates keep, and typical gates' Gaussian, saved with them
CENTERS = ("gain_center", "nll_center", "typical_mean", "typical_precision", "typical_scale", "typical_floor")


class QualityGate(nn.Module):
    """`nn.Linear(hidden, 1)`: one logit per token. Init N(init_mean, init_std); optional bias set to init_bias.

    With `contrast`, a second `nn.Linear(hidden, 1)` (init 0) reads the prompt's effect x − x̃ where it is known;
    with `evidence`, an `nn.Linear(2 · hidden, 1)` (init 0) adds the running mean of `[x, x − x̃] · u` there;
    with `summary`, an `nn.Linear(hidden, 1)` (init 0) adds `x_end · z` to every token;
    with `gain`, an `nn.Linear(2, 1)` (init 0) reads √H · the prompt's gain on the response tokens (`gain_logits`);
    with `tent`, an `nn.Linear(1, 1)` (init 0) reads √H · |running mean gain − `gain_center`| there;
    with `surprise`, an `nn.Linear(1, 1)` (init 0) reads √H · |running mean NLL − `nll_center`| there;
    with `typical`, an `nn.Linear(1, 1)` (init 0) adds to every token √H · the response's Mahalanobis distance to
    the clean rows' Gaussian (`typical_mean`, `typical_precision`), in units of the fit rows' median distance,
    less `typical_floor` (the fit rows' `typical_quantile` quantile; 0 reads the whole distance) and never below 0.
    """

    def __init__(self, hidden_size: int, init_mean: float = 0.0, init_std: float = 0.02,
                 bias: bool = False, init_bias: float = 0.0, contrast: bool = False, evidence: bool = False,
                 summary: bool = False, gain: bool = False, tent: bool = False, surprise: bool = False,
                 typical: bool = False, typical_quantile: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, bias=bias)
        nn.init.normal_(self.linear.weight, mean=init_mean, std=init_std)
        if bias:
            nn.init.constant_(self.linear.bias, init_bias)
        self.contrast = nn.Linear(hidden_size, 1, bias=False) if contrast else None
        if contrast:
            nn.init.zeros_(self.contrast.weight)
        if evidence and not contrast:
            raise ValueError("gate.evidence reads the prompt contrast; it needs gate.contrast")
        if summary and not contrast:
            raise ValueError("gate.summary finds the row's end through the contrast pass; it needs gate.contrast")
        if gain and not contrast:
            raise ValueError("gate.gain reads the prompt's gain from the contrast pass; it needs gate.contrast")
        self.evidence = nn.Linear(2 * hidden_size, 1, bias=False) if evidence else None
        self.summary = nn.Linear(hidden_size, 1, bias=False) if summary else None
        self.gain = nn.Linear(2, 1, bias=False) if gain else None
        if tent and not gain:
            raise ValueError("gate.tent reads how far the prompt's gain sits from its clean centre; it needs "
                             "gate.gain")
        # made without drawing from the RNG, so that adding it leaves every other weight of a seed as it was
        self.tent = nn.utils.skip_init(nn.Linear, 1, 1, bias=False) if tent else None
        self.register_buffer("gain_center", torch.zeros(()) if tent else None)  # the clean rows' mean gain
        if surprise and not gain:
            raise ValueError("gate.surprise reads the response's loss from the gain's pass; it needs gate.gain")
        self.surprise = nn.utils.skip_init(nn.Linear, 1, 1, bias=False) if surprise else None
        self.register_buffer("nll_center", torch.zeros(()) if surprise else None)  # the clean rows' mean NLL
        if typical and not contrast:
            raise ValueError("gate.typical finds the response's tokens through the contrast pass; it needs "
                             "gate.contrast")
        self.typical = nn.utils.skip_init(nn.Linear, 1, 1, bias=False) if typical else None
        # the clean rows' Gaussian (`qgate.typical.fit_typical`); a zero precision reads every row as typical
        self.register_buffer("typical_mean", torch.zeros(hidden_size) if typical else None)  # [H]
        self.register_buffer("typical_precision", torch.zeros(hidden_size, hidden_size) if typical else None)
        self.register_buffer("typical_scale", torch.ones(()) if typical else None)  # the fit rows' median distance
        if not 0.0 <= typical_quantile < 1.0:
            raise ValueError(f"gate.typical_quantile must be in [0, 1), got {typical_quantile}")
        self.typical_quantile = typical_quantile  # the fit sets `typical_floor` to this quantile of its rows
        self.register_buffer("typical_floor", torch.zeros(()) if typical else None)  # in units of the median
        self.centered = False  # whether warmup has tracked the centre yet (a loaded one has)
        # The gain's two features are scaled by √H so that an optimizer step moves their share of the logit about as
        # far as it moves the H-wide reads of x (‖x‖₁ is 36–113 in SmolLM2-135M's 576-wide layers, the gain ~0–3).
        self.gain_scale = hidden_size ** 0.5
        for extra in (self.evidence, self.summary, self.gain, self.tent, self.surprise, self.typical):
            if extra is not None:
                nn.init.zeros_(extra.weight)

    def forward(self, x: torch.Tensor, reference: LayerReference | None = None) -> torch.Tensor:
        """x [B, T, H]; `reference`: what the response alone gave this layer (contrast gates). -> logits [B, T]"""
        x = x.to(self.linear.weight.dtype)
        logits = self.linear(x).squeeze(-1)
        if self.contrast is not None and reference is not None:
            known = reference.known.to(x.dtype)
            delta = (x - reference.alone.to(x.dtype)) * known.unsqueeze(-1)  # [B, T, H], 0 where x̃ is unknown
            logits = logits + self.contrast(delta).squeeze(-1)
            if self.evidence is not None:
                per_token = self.evidence(torch.cat([x, delta], dim=-1)).squeeze(-1)  # [B, T]
                logits = logits + running_mean(per_token, known)
            if self.summary is not None:
                end = x[torch.arange(x.shape[0], device=x.device), reference.last]  # [B, H]
                logits = logits + self.summary(end)  # [B, T] + [B, 1]
            if self.typical is not None:
                distance = self.gain_scale * self.typical_distance(x, reference.known)  # [B]
                logits = logits + self.typical(distance.unsqueeze(-1).to(x.dtype))  # [B, T] + [B, 1]
        return logits

    def typical_distance(self, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of the response's mean x to the clean rows' Gaussian, in units of the fit rows'
        median; 0 for a row with no known token. x [B, T, H], known [B, T] -> [B]"""
        centred = response_mean(x, known) - self.typical_mean.float()  # [B, H]
        squared = ((centred @ self.typical_precision.float()) * centred).sum(-1).clamp_min(0.0)  # [B]
        distance = (squared.sqrt() / self.typical_scale.float() - self.typical_floor.float()).clamp_min(0.0)
        return distance * (known.sum(1) > 0).float()

    def gain_logits(self, gain: PromptGain) -> torch.Tensor:
        """What the prompt's gain adds to this gate's logits: 0 off the known response tokens. -> [B, T]"""
        values, known = gain.values.float(), gain.known.float()
        mean = running_mean(values, known)  # [B, T]
        features = self.gain_scale * torch.stack([values * known, mean], dim=-1)  # [B, T, 2]
        logits = self.gain(features.to(self.gain.weight.dtype)).squeeze(-1)
        if self.tent is not None:
            logits = logits + self._distance_read(self.tent, mean, self.gain_center, known)
        if self.surprise is not None:
            nll_mean = running_mean(gain.nll.float(), known)  # [B, T]
            logits = logits + self._distance_read(self.surprise, nll_mean, self.nll_center, known)
        return logits

    def _distance_read(self, read: nn.Linear, mean: torch.Tensor, center: torch.Tensor,
                       known: torch.Tensor) -> torch.Tensor:
        """`read` of √H · |running mean − clean centre| on the known tokens. [B, T] -> [B, T]"""
        distance = self.gain_scale * (mean - center.float()).abs() * known  # [B, T]
        return read(distance.unsqueeze(-1).to(read.weight.dtype)).squeeze(-1)

    def track_center(self, gain_value: torch.Tensor | None, nll_value: torch.Tensor | None = None) -> None:
        """Tent and surprise gates: move the kept clean-row centres towards a batch's values (`clean_mean`), an
        EMA; the first batch sets them."""
        for center, value in ((self.gain_center, gain_value), (self.nll_center, nll_value)):
            if center is not None and value is not None:
                value = value.to(center.dtype)
                center.copy_(CENTER_EMA * center + (1 - CENTER_EMA) * value if self.centered else value)
        self.centered = True


@dataclass
class PromptGain:
    """How much the prompt helped predict each token of the final response (`qgate.contrast.prompt_gain`)."""

    values: torch.Tensor  # [B, T]: NLL alone − NLL with the prompt at the known positions, 0 elsewhere
    known: torch.Tensor  # [B, T]: 1 on the final response's tokens that the alone pass holds
    nll: torch.Tensor | None = None  # [B, T]: NLL with the prompt at the known positions, 0 elsewhere


@dataclass
class LayerReference:
    """What one gated layer's FFN input was when the rows' final responses ran alone (`qgate.contrast`)."""

    alone: torch.Tensor  # [B, T, H]: x̃ at the known positions of the full rows, 0 elsewhere
    known: torch.Tensor  # [B, T]: 1 on the final response's tokens that the alone pass holds
    last: torch.Tensor  # [B] long: each full row's last position


def clean_mean(values: torch.Tensor, gain: PromptGain, is_clean: torch.Tensor) -> torch.Tensor | None:
    """The running mean of `values` (the gain, or the NLL) over the clean rows' known tokens, averaged, summed over
    every DDP rank first (so one or N workers see the same value); None when the batch holds no such token.
    values [B, T]; is_clean [B]."""
    known = gain.known.float() * (is_clean.to(gain.known.device) > 0.5).float().unsqueeze(1)  # [B, T]
    totals = torch.stack([(running_mean(values, gain.known) * known).sum(), known.sum()]).detach()  # [2]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return None if totals[1] == 0 else totals[0] / totals[1]


def response_mean(x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean of x over each row's known positions, in float32. [B, T, H], [B, T] -> [B, H]"""
    known = known.float().unsqueeze(-1)  # [B, T, 1]
    return (x.float() * known).sum(1) / known.sum(1).clamp_min(1.0)


def running_mean(values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the known positions up to each known position, 0 elsewhere. [B, T], [B, T] -> [B, T]

    Summed in float32: a bf16 running sum over hundreds of tokens loses the small per-token evidence.
    """
    values, known = values.float(), known.float()
    return (values * known).cumsum(dim=1) / known.cumsum(dim=1).clamp_min(1.0) * known


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The first ModuleList whose blocks all have `post_attention_layernorm` and `mlp`."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
            hasattr(block, "post_attention_layernorm") and hasattr(block, "mlp") for block in module
        ):
            return module
    raise ValueError(
        f"{type(model).__name__} has no decoder layers with `post_attention_layernorm` and `mlp`; "
        "quality gates attach to Llama/Qwen/Mistral-style decoders"
    )


class GateSet:
    """The gates of one model: their hooks, the logits of the last forward pass, save and load."""

    def __init__(self, model: nn.Module, mode: str, layers: list[int], gates: list[QualityGate]):
        self.model, self.mode, self.layers, self.gates = model, mode, layers, gates
        self.forced_ratio: float | None = None
        self.contrast = any(gate.contrast is not None for gate in gates)
        self.evidence = any(gate.evidence is not None for gate in gates)
        self.summary = any(gate.summary is not None for gate in gates)
        self.gain = any(gate.gain is not None for gate in gates)
        self.tent = any(gate.tent is not None for gate in gates)
        self.surprise = any(gate.surprise is not None for gate in gates)
        self.typical = any(gate.typical is not None for gate in gates)
        self.typical_quantile = gates[0].typical_quantile if gates else 0.0
        self.halves = None  # the halves read's Gaussian (`qgate.halves.HalvesRead`), when the run keeps it
        self.recording: list[list[torch.Tensor]] | None = None  # typical gates' fit: per gate, each pass's means
        self.reference: list[LayerReference] | None = None  # contrast gates: per gated layer, for the next pass
        self.capture = False  # keep each gated layer's FFN input of the next forward pass in `captured`
        self.captured: list[torch.Tensor | None] = [None] * len(gates)
        self._logits: list[torch.Tensor | None] = [None] * len(gates)
        self._hooks = []
        blocks = find_decoder_layers(model)
        for slot, (index, gate) in enumerate(zip(layers, gates)):
            blocks[index].quality_gate = gate
            self._hooks.append(blocks[index].mlp.register_forward_pre_hook(self._read_hook(slot)))
            self._hooks.append(blocks[index].mlp.register_forward_hook(self._scale_hook(slot)))

    def _read_hook(self, slot: int):
        def hook(module, args):
            if self.capture:
                self.captured[slot] = args[0].detach()  # [B, T, H]
            reference = None if self.reference is None else self.reference[slot]
            if self.recording is not None and reference is not None:
                self.recording[slot].append(response_mean(args[0].detach(), reference.known))  # [B, H]
            self._logits[slot] = self.gates[slot](args[0], reference)  # [B, T]
        return hook

    def _scale_hook(self, slot: int):
        def hook(module, args, output):
            if self.mode != "modulate":
                return None
            ratio = self.good_ratio_of(self._logits[slot]).unsqueeze(-1)  # [B, T, 1]
            if isinstance(output, tuple):  # MoE blocks return (hidden, router_logits)
                return (output[0] * ratio.to(output[0].dtype),) + output[1:]
            return output * ratio.to(output.dtype)
        return hook

    def good_ratio_of(self, logits: torch.Tensor) -> torch.Tensor:
        if self.forced_ratio is not None:
            return torch.full_like(logits, self.forced_ratio)
        return torch.sigmoid(logits)

    def logits(self, gain: PromptGain | None = None) -> torch.Tensor:
        """Gate logits of the last forward pass, with what gain gates read of the prompt's `gain`. [B, L, T]

        Without `gain` gain gates give their other terms, as contrast gates do on a pass without a reference.
        """
        if any(x is None for x in self._logits):
            raise RuntimeError("no forward pass has run since the gates were attached or cleared")
        if not self.gain or gain is None:
            return torch.stack(self._logits, dim=1)
        return torch.stack([logits + gate.gain_logits(gain).to(logits.dtype)
                            for logits, gate in zip(self._logits, self.gates)], dim=1)

    def track_center(self, gain: PromptGain, is_clean: torch.Tensor) -> None:
        """Tent and surprise gates: the clean rows of this batch move every gate's kept centres of the gain and the
        NLL (warmup)."""
        gain_value = clean_mean(gain.values, gain, is_clean) if self.tent else None
        nll_value = clean_mean(gain.nll, gain, is_clean) if self.surprise and gain.nll is not None else None
        if gain_value is None and nll_value is None:
            return
        for gate in self.gates:
            gate.track_center(gain_value, nll_value)

    def clear(self) -> None:
        self._logits = [None] * len(self.gates)
        self.captured = [None] * len(self.gates)

    @contextlib.contextmanager
    def forced(self, ratio: float = 1.0):
        """Within the block every gate passes `ratio` of the FFN (1.0 = the base model in modulate mode)."""
        previous, self.forced_ratio = self.forced_ratio, ratio
        try:
            yield self
        finally:
            self.forced_ratio = previous

    def parameters(self) -> list[nn.Parameter]:
        return [p for gate in self.gates for p in gate.parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`layers.{i}.weight` (and `.bias`) of each gate; contrast, evidence, summary, gain and tent gates add
        `layers.{i}.{contrast,evidence,summary,gain,tent,surprise,typical}.weight`; tent gates also
        `layers.{i}.gain_center`, surprise gates `layers.{i}.nll_center`, typical gates their Gaussian
        (`layers.{i}.typical_{mean,precision,scale,floor}`); the halves read `halves.{mean,precision,scale}`."""
        state = {}
        for index, gate in zip(self.layers, self.gates):
            state.update({f"layers.{index}.{name}": tensor for name, tensor in gate.linear.state_dict().items()})
            for name in EXTRA_INPUTS:
                if getattr(gate, name) is not None:
                    state[f"layers.{index}.{name}.weight"] = getattr(gate, name).weight
            for center in CENTERS:
                if getattr(gate, center) is not None:
                    state[f"layers.{index}.{center}"] = getattr(gate, center)
        if self.halves is not None:
            state.update({f"halves.{name}": tensor for name, tensor in self.halves.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for index, gate in zip(self.layers, self.gates):
            prefix = f"layers.{index}."
            extra = tuple(f"{prefix}{name}." for name in EXTRA_INPUTS)
            gate.linear.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                         if k.startswith(prefix) and not k.startswith(extra)
                                         and k[len(prefix):] not in CENTERS})
            for name in EXTRA_INPUTS:
                if getattr(gate, name) is not None:
                    getattr(gate, name).load_state_dict({"weight": state[f"{prefix}{name}.weight"]})
            for center in CENTERS:
                if getattr(gate, center) is not None and f"{prefix}{center}" in state:  # floors came later
                    getattr(gate, center).copy_(state[f"{prefix}{center}"])
                    gate.centered = True
        if self.halves is not None:
            self.halves.load_state_dict({k[len("halves."):]: v for k, v in state.items() if k.startswith("halves.")})

    def remove(self) -> None:
        """Detach hooks and gate modules: the model is the plain backbone again."""
        blocks = find_decoder_layers(self.model)
        for handle in self._hooks:
            handle.remove()
        for index in self.layers:
            del blocks[index].quality_gate
        self.model.qgate_gates = None


def resolved(name: str, setting: bool | str, auto: bool) -> bool:
    """A `gate.<name>` setting as a bool: `auto` where it is "auto"; anything else but true/false is refused."""
    value = auto if setting == "auto" else setting
    if value not in (True, False):
        raise ValueError(f"gate.{name} must be true, false or auto, got {setting!r}")
    return bool(value)


def attach_gates(model: nn.Module, mode: str = GATE.mode, init_mean: float = GATE.init_mean,
                 init_std: float = GATE.init_std, bias: bool = GATE.bias, init_bias: float = GATE.init_bias,
                 layers: list[int] | None = GATE.layers, seed: int = 0, kind: str | None = None,
                 contrast: bool | str = GATE.contrast, evidence: bool | str = GATE.evidence,
                 summary: bool | str = GATE.summary, gain: bool | str = GATE.gain, tent: bool | str = GATE.tent,
                 surprise: bool | str = GATE.surprise, typical: bool | str = GATE.typical,
                 typical_quantile: float = GATE.typical_quantile, halves: bool = GATE.halves,
                 **trash_can) -> GateSet:
    """Add a quality gate to each chosen decoder layer (all by default); returns the model's GateSet.

    An MoE model (OLMoE, Qwen3-MoE) gets Select-MoE trash-can experts instead (`qgate.moe`), set up by the same
    arguments plus `trash_can` (`qgate.moe.TrashCanSettings`, unused on dense models); `kind` ("dense" or
    "trash_can") overrides the choice by model. `contrast` gives dense gates the prompt-contrast input ("auto":
    dense gates get it, trash cans do not); `evidence` adds the running mean over the response ("auto": wherever
    the contrast is on); `summary` adds the read of the row's last token ("auto": wherever the contrast is on in
    probe mode; a modulating gate must not read tokens after its own); `gain` adds the read of the prompt's gain
    ("auto": as summary); `tent` the read of its distance from the clean rows' ("auto": wherever `gain` is on);
    `surprise` the read of the response loss's distance from the clean rows' ("auto": off); `typical` the read of
    the response states' distance from the clean rows' Gaussian ("auto": off), above the fit rows'
    `typical_quantile` quantile. `halves` keeps the halves read's Gaussian with the gates (`qgate.halves`): not a
    gate input, a per-row score collect writes beside q.
    """
    from qgate import moe

    if mode not in MODES:
        raise ValueError(f"gate mode must be one of {MODES}, got {mode!r}")
    if getattr(model, "qgate_gates", None) is not None:
        raise ValueError("this model already has quality gates; call .remove() on them first")
    moe.settings_of(trash_can)
    trash_cans = (kind or ("trash_can" if moe.is_moe(model) else "dense")) == moe.KIND
    contrast = resolved("contrast", contrast, not trash_cans)
    evidence = resolved("evidence", evidence, contrast)
    summary = resolved("summary", summary, contrast and mode == "probe")
    gain = resolved("gain", gain, contrast and mode == "probe")
    tent = resolved("tent", tent, gain)
    surprise = resolved("surprise", surprise, False)
    typical = resolved("typical", typical, False)
    if summary and mode != "probe":
        raise ValueError("gate.summary reads the row's last token, which a modulating gate must not see before it "
                         "is generated; use gate.mode=probe or gate.summary=false")
    if typical and mode != "probe":
        raise ValueError("gate.typical reads the whole response at every token, which a modulating gate must not see "
                         "before it is generated; use gate.mode=probe or gate.typical=false")
    if halves and mode != "probe":
        raise ValueError("gate.halves reads the states a modulating gate moves; use gate.mode=probe or "
                         "gate.halves=false")
    if gain and mode != "probe":
        raise ValueError("gate.gain reads the LM head's output after the pass, which a modulating gate acts "
                         "before; use gate.mode=probe or gate.gain=false")
    if trash_cans:
        if contrast or evidence or summary or gain or tent or surprise or typical or halves:
            raise ValueError("gate.contrast, gate.evidence, gate.summary, gate.gain, gate.tent, gate.surprise, "
                             "gate.typical and gate.halves are for dense gates; MoE trash-can experts have no "
                             "contrast input")
        return moe.attach_trash_cans(model, mode, init_mean, init_std, bias, init_bias, layers, seed, **trash_can)
    blocks = find_decoder_layers(model)
    layers = list(range(len(blocks))) if layers is None else sorted(int(i) for i in layers)
    if not layers or layers[0] < 0 or layers[-1] >= len(blocks):
        raise ValueError(f"gate layers {layers} out of range for a model with {len(blocks)} layers")
    reference = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gates = [QualityGate(model.config.hidden_size, init_mean, init_std, bias, init_bias, contrast, evidence,
                             summary, gain, tent, surprise, typical, typical_quantile) for _ in layers]
    # Gates (and so their optimizer state) stay at least float32 on a bf16/fp16 backbone: tiny weights, exact updates.
    gates = [g.to(device=reference.device, dtype=torch.promote_types(reference.dtype, torch.float32)) for g in gates]
    gate_set = GateSet(model, mode, layers, gates)
    if halves:
        from qgate.halves import HalvesRead

        gate_set.halves = HalvesRead(len(blocks), model.config.hidden_size).to(reference.device)
    model.qgate_gates = gate_set
    return gate_set


def freeze_backbone(model: nn.Module) -> list[nn.Parameter]:
    """Only gate parameters keep `requires_grad`; returns them."""
    gate_params = {id(p) for p in model.qgate_gates.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in gate_params)
    return model.qgate_gates.parameters()


def optimizer_groups(gates: GateSet, lr: float, gain_lr_scale: float = 1.0) -> list[dict]:
    """AdamW's parameter groups: the gain, tent, surprise and typical reads (a few numbers a gate) at
    `gain_lr_scale` · lr, every wide read of x at lr."""
    reads = [(gate.gain, gate.tent, gate.surprise, gate.typical) for gate in gates.gates]
    gain_reads = [p for per_gate in reads for read in per_gate if read is not None for p in read.parameters()]
    chosen = {id(p) for p in gain_reads}
    rest = [p for p in gates.parameters() if id(p) not in chosen]
    return [{"params": rest, "lr": lr}] + ([{"params": gain_reads, "lr": lr * gain_lr_scale}] if gain_reads else [])


def save_gates(gates: GateSet, out_dir: str | Path, metadata: dict | None = None) -> Path:
    """`gates.safetensors` + `gates.json` (format, mode, layers, shapes and whatever `metadata` adds)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(gates.state_dict(), out_dir / GATES_FILE)
    meta = {"format": GATES_FORMAT, "qgate_version": qgate.__version__, "mode": gates.mode,
            "layers": gates.layers, "hidden_size": gates.gates[0].linear.in_features,
            "bias": gates.gates[0].linear.bias is not None, "contrast": gates.contrast, "evidence": gates.evidence,
            "summary": gates.summary, "gain": gates.gain, "tent": gates.tent, "surprise": gates.surprise,
            "typical": gates.typical, "typical_quantile": gates.typical_quantile, "halves": gates.halves is not None,
            "n_model_layers": len(find_decoder_layers(gates.model)),
            "kind": getattr(gates, "kind", "dense"), **getattr(gates, "extra_metadata", dict)(), **(metadata or {})}
    (out_dir / GATES_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out_dir


def read_gate_metadata(gates_dir: str | Path) -> dict:
    return json.loads((Path(gates_dir) / GATES_META).read_text())


def reads_contrast(gates_dir: str | Path) -> bool:
    """Whether the saved gates read the prompt contrast: rows must then be encoded with their response alone."""
    return bool(read_gate_metadata(gates_dir).get("contrast", False))


def load_gates(model: nn.Module, gates_dir: str | Path, mode: str | None = None) -> GateSet:
    """Attach gates to `model` as saved in `gates_dir` (mode may be overridden) and load their weights."""
    meta = read_gate_metadata(gates_dir)
    n_layers = len(find_decoder_layers(model))
    if meta["hidden_size"] != model.config.hidden_size or meta["n_model_layers"] != n_layers:
        raise ValueError(
            f"gates in {gates_dir} were trained for hidden size {meta['hidden_size']} and {meta['n_model_layers']} "
            f"layers; this model has {model.config.hidden_size} and {n_layers} (base model: {meta.get('base_model')})"
        )
    extra = {}
    if meta.get("kind") == "trash_can":
        from qgate import moe

        moe.check_loadable(model, meta)
        extra = moe.saved_settings(meta)
    gates = attach_gates(model, mode=mode or meta["mode"], bias=meta["bias"], layers=meta["layers"],
                         kind=meta.get("kind", "dense"), contrast=meta.get("contrast", False),
                         evidence=meta.get("evidence", False), summary=meta.get("summary", False),
                         gain=meta.get("gain", False), tent=meta.get("tent", False),
                         surprise=meta.get("surprise", False), typical=meta.get("typical", False),
                         typical_quantile=meta.get("typical_quantile", 0.0), halves=meta.get("halves", False),
                         **extra)
    gates.load_state_dict(load_file(str(Path(gates_dir) / GATES_FILE)))
    return gates


def save_gated_model(model: nn.Module, tokenizer, out_dir: str | Path, metadata: dict | None = None) -> Path:
    """A directory that `from_pretrained` loads as the base model and `load_gated_model` loads with its gates."""
    gates = model.qgate_gates
    blocks = find_decoder_layers(model)
    detached = {index: blocks[index]._modules.pop("quality_gate") for index in gates.layers}
    try:
        model.save_pretrained(out_dir)
    finally:
        for index, gate in detached.items():
            blocks[index].quality_gate = gate
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return save_gates(gates, out_dir, metadata)


def load_gated_model(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer, gates) from a directory written by `save_gated_model`."""
    from qgate.models import load_model, load_tokenizer

    model = load_model(str(path), dtype=dtype, device=device)
    return model, load_tokenizer(str(path)), load_gates(model, path)


def build_gated_model(model_name: str, gates_dir: str | Path | None = None, gate_kwargs: dict | None = None,
                      dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """(model, tokenizer, gates): saved gates from `gates_dir`, or new ones made with `gate_kwargs`."""
    from qgate.models import load_model, load_tokenizer

    model = load_model(model_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    if gates_dir is not None:
        gates = load_gates(model, gates_dir)
    else:
        gates = attach_gates(model, **(gate_kwargs or {}))
    return model, tokenizer, gates

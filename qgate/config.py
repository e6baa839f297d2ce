"""Configuration: YAML defaults in `configs/qgate.yaml`, overridden by `key=value` arguments (OmegaConf)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "qgate.yaml"

ALIASES = {
    "workers": "warmup.workers",
    "steps": "warmup.steps",
    "selection_percentage": "selection.percentage",
    "alpha": "selection.alpha",
    "strict": "selfcheck.strict",
    "mode": "gate.mode",
    "max_length": "encoding.max_length",
    "score_on": "encoding.score_on",
    "actors": "collect.actors",
    "raw": "collect.raw",
}

# Settings with a fixed set of values, checked when the config loads rather than deep inside a Ray worker.
CHOICES = {
    "dtype": ("float32", "bfloat16", "float16"),
    "evaluate.dtype": (None, "float32", "bfloat16", "float16"),
    "autocast": ("auto", "bf16", "fp16", "none"),
    "gate.mode": ("modulate", "probe"),
    "gate.contrast": ("auto", True, False),
    "gate.evidence": ("auto", True, False),
    "gate.summary": ("auto", True, False),
    "encoding.score_on": ("all", "response"),
    "loss.quality_loss_type": ("linear", "beta_moment_matching", "mean_variance_regularization"),
    "selection.strategy": ("top_k", "cluster_round_robin", "similarity_filter"),
    "selection.direction": ("auto", "higher", "lower"),
    "selection.score": ("auto", "q", "q_ifd"),
}


def parse_overrides(args: list[str]) -> DictConfig:
    """`["a.b=1", "workers=2"]` -> a config; unknown keys are errors, aliases expand."""
    pairs = []
    for arg in args:
        if "=" not in arg:
            raise ValueError(f"expected key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        pairs.append(f"{ALIASES.get(key, key)}={value}")
    return OmegaConf.from_dotlist(pairs)


def load_config(args: list[str] | None = None, path: str | Path | None = None) -> DictConfig:
    """Defaults ⊕ optional YAML file ⊕ overrides; refuses keys the defaults do not have."""
    config = OmegaConf.load(DEFAULTS)
    OmegaConf.set_struct(config, True)
    layers = [OmegaConf.load(path)] if path else []
    layers.append(parse_overrides(args or []))
    for layer in layers:
        try:
            config = OmegaConf.merge(config, layer)
        except Exception as err:  # omegaconf raises its own ConfigKeyError subclasses
            raise ValueError(f"bad configuration: {err}".splitlines()[0]) from err
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(config, key)
        if value not in allowed:
            raise ValueError(f"bad configuration: {key} must be one of {allowed}, got {value!r}")
    return config


def save_config(config: DictConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, path, resolve=True)


def as_dict(config: DictConfig) -> dict:
    return OmegaConf.to_container(config, resolve=True)

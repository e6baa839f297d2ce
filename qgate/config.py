"""Configuration: the typed defaults of `qgate.settings.Settings`, then a shipped recipe (`recipe=seeds`:
`qgate/configs/seeds.yaml`), then the run's own recorded `out/config.yaml`, then an optional `--config FILE`, then
`key=value` arguments (OmegaConf, which checks every value against its setting's type).

`SHAPES` says which outputs of a run directory each setting shapes; `changes_refused` refuses a changed setting
whose outputs already exist and that the stage about to run does not rewrite (docs/run-directory.md).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qgate.diversity import FEATURES, STRATEGIES
from qgate.settings import Settings


def config_path(name: str) -> Path:
    """A YAML file shipped inside the package (`qgate/configs/<name>`), e.g. `demo.yaml`."""
    return Path(str(resources.files("qgate").joinpath("configs", name)))


def recipe_path(name: str) -> Path:
    """The file of a shipped recipe (`seeds`, `demo`)."""
    path = config_path(f"{name}.yaml")
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"bad configuration: no recipe {name!r}; shipped: {', '.join(shipped)}")
    return path

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
    "gate.gain": ("auto", True, False),
    "gate.tent": ("auto", True, False),
    "encoding.score_on": ("all", "response"),
    "loss.quality_loss_type": ("linear", "beta_moment_matching", "mean_variance_regularization"),
    "selection.strategy": STRATEGIES,
    "selection.features": FEATURES,
    "selection.direction": ("auto", "higher", "lower"),
    "selection.score": ("auto", "q", "q_ifd", "q_halves"),
    "selection.demote_shared_answers": ("auto", True, False),
}

# ---- which outputs each setting shapes -------------------------------------------------------------------

# The outputs of a run directory, each with those made from it.
DOWNSTREAM = {"warmup": ("gates",), "gates": ("stats",), "stats": ("selfcheck", "selection"),
              "selfcheck": ("selection",), "selection": ()}
# The first output a setting shapes (prefix match, the longest prefix wins; None or absent: none). `data` is
# absent: more files add rows, moved files resume by content (ray_jobs/collect.py). Beside this table, each stage
# checks the content hashes of the gates and base model its inputs were made from (qgate/identity.py).
SHAPES = {
    "gates": "stats", "model": "warmup", "dtype": "warmup", "trust_remote_code": "warmup", "seed": "warmup", "autocast": "warmup",
    "encoding": "warmup", "gate": "warmup", "loss": "warmup",
    "warmup": "warmup", "warmup.steps": "gates",  # more steps continue from the checkpoints
    "warmup.cpus_per_worker": None, "warmup.report_every": None, "warmup.checkpoint_every": None,
    "warmup.max_failures": None, "warmup.keep_checkpoints": None,
    "collect.alphas": "stats", "collect.eps": "stats", "collect.ifd": "stats", "collect.raw": "stats",
    "selfcheck": "selfcheck", "selfcheck.enabled": None, "selfcheck.strict": None,
    "selection": "selection",
}
# What each stage writes anew (collect only adds rows: a changed setting must not reach stats it resumes).
REWRITES = {"warmup": ("gates",), "collect": (), "selfcheck": ("selfcheck",), "select": ("selection",)}


def shaped_outputs(key: str) -> set[str]:
    """The outputs a dotted setting shapes, downstream ones included."""
    parts = key.split(".")
    prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    first = next((SHAPES[p] for p in prefixes if p in SHAPES), None)
    todo, out = [first] if first else [], set()
    while todo:
        name = todo.pop()
        out.add(name)
        todo += [n for n in DOWNSTREAM[name] if n not in out]
    return out


def changed_settings(recorded: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (recorded value, new value)} of the leaves that differ; keys one side lacks are skipped."""
    changes = {}
    for key in recorded.keys() & new.keys():
        old, value = recorded[key], new[key]
        if isinstance(old, dict) and isinstance(value, dict):
            changes.update(changed_settings(old, value, f"{prefix}{key}."))
        elif old != value:
            changes[f"{prefix}{key}"] = (old, value)
    return changes


def changes_refused(recorded: dict, new: dict, existing: set[str], stages: list[str]) -> list[str]:
    """One line per changed setting that shapes an output already there and not rewritten by `stages`."""
    rewritten = {name for stage in stages for name in REWRITES.get(stage, ())}
    lines = []
    for key, (old, value) in sorted(changed_settings(recorded, new).items()):
        if key == "out":
            continue
        stale = sorted(shaped_outputs(key) & existing - rewritten)
        if stale:
            lines.append(f"{key} changed from {old!r} to {value!r}, but {', '.join(s + '/' for s in stale)} "
                         f"{'was' if len(stale) == 1 else 'were'} made with {old!r}")
    return lines


# ---- loading --------------------------------------------------------------------------------------------


# Sections that take any key: options passed through to a library that validates them itself.
OPEN_SECTIONS = ("serve.autoscaling",)


def parse_overrides(args: list[str]) -> DictConfig:
    """`["a.b=1", "workers=2"]` -> a config; unknown keys are errors, aliases expand."""
    pairs = []
    for arg in args:
        if "=" not in arg:
            raise ValueError(f"expected key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        pairs.append(f"{ALIASES.get(key, key)}={value}")
    return OmegaConf.from_dotlist(pairs)


def recorded_layer(path: str | Path, defaults: DictConfig) -> DictConfig:
    """A run's recorded config, less keys the defaults no longer have (written by an older qgate); an open
    section keeps all of its keys."""
    def known(layer: dict, base: dict, prefix: str = "") -> dict:
        if prefix.rstrip(".") in OPEN_SECTIONS:
            return layer
        return {k: known(v, base[k], f"{prefix}{k}.") if isinstance(v, dict) and isinstance(base[k], dict) else v
                for k, v in layer.items() if k in base}

    recorded = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    return OmegaConf.create(known(recorded, OmegaConf.to_container(defaults)))


def load_config(args: list[str] | None = None, path: str | Path | None = None,
                recorded: str | Path | None = None) -> DictConfig:
    """Defaults ⊕ the recipe ⊕ the run's `recorded` config ⊕ optional YAML file ⊕ overrides; refuses keys the
    defaults lack and values of the wrong type."""
    config = OmegaConf.structured(Settings)
    OmegaConf.set_struct(config, True)
    for key in OPEN_SECTIONS:
        OmegaConf.set_struct(OmegaConf.select(config, key), False)
    overrides = parse_overrides(args or [])
    run = [recorded_layer(recorded, config)] if recorded else []
    recipe = OmegaConf.select(overrides, "recipe") or (OmegaConf.select(run[0], "recipe") if run else None)
    # the recipe under the run's own record: the record already holds the recipe and what was set over it
    layers = [OmegaConf.load(recipe_path(recipe))] if recipe else []
    layers += run + ([OmegaConf.load(path)] if path else []) + [overrides]
    for layer in layers:
        try:
            config = OmegaConf.merge(config, layer)
        except Exception as err:  # omegaconf raises its own ConfigKeyError subclasses
            raise ValueError(f"bad configuration: {err}".splitlines()[0]) from err
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(config, key)
        if value not in allowed:
            raise ValueError(f"bad configuration: {key} must be one of {allowed}, got {value!r}")
    pool = OmegaConf.select(config, "selection.pool")
    if not (pool in ("auto", None) or (isinstance(pool, (int, float)) and not isinstance(pool, bool) and pool >= 1)):
        raise ValueError(f"bad configuration: selection.pool must be auto, null or a number >= 1, got {pool!r}")
    return config


def scorer_config(config, gates_dir, device: str = "cpu", **overrides) -> dict:
    """The `load_scorer` arguments of a run config (an OmegaConf config or its plain dict): how collect scores,
    which the self-check and the scale benchmarks score the same way. `overrides` replace any of them."""
    collect = config["collect"]
    return {"model": config["model"], "gates_dir": str(gates_dir), "dtype": config["dtype"],
            "autocast": config["autocast"], "device": device, "trust_remote_code": bool(config["trust_remote_code"]),
            "alphas": [float(a) for a in collect["alphas"]], "eps": float(collect["eps"]),
            "max_batch_tokens": int(collect["max_batch_tokens"]), "ifd": bool(collect["ifd"]),
            "raw": bool(collect["raw"]), **overrides}


def save_config(config: DictConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, path, resolve=True)


def as_dict(config: DictConfig) -> dict:
    return OmegaConf.to_container(config, resolve=True)


# ---- describing ------------------------------------------------------------------------------------------

# The sections each command reads, beside the top-level keys.
COMMAND_SECTIONS = {
    "demo": ("demo", "encoding", "gate", "loss", "warmup", "collect", "selfcheck", "selection"),
    "pipeline": ("encoding", "gate", "loss", "warmup", "collect", "selfcheck", "selection"),
    "warmup": ("encoding", "gate", "loss", "warmup"),
    "collect": ("encoding", "collect"),
    "selfcheck": ("encoding", "collect", "selfcheck"),
    "select": ("selection",),
    "finetune": ("finetune",),
    "evaluate": ("evaluate",),
    "compare": ("compare", "finetune", "evaluate"),
    "serve": ("serve", "collect"),
    "config": (),
}


def describe(config: DictConfig, sections: tuple[str, ...] | None = None) -> str:
    """The configuration as YAML, each key with its help: the top-level keys and `sections` (None: every one)."""
    from qgate.settings import help_lines

    values = OmegaConf.to_container(config, resolve=True)
    out, section = [], None
    for key, _, text in help_lines():
        head, _, rest = key.partition(".")
        if rest and sections is not None and head not in sections:
            continue
        if rest and head != section:
            out.append(f"{head}:")
            section = head
        value = values[head][rest] if rest else values[head]
        out.append(f"{'  ' if rest else ''}{rest or head}: {_yaml_value(value)}" + (f"  # {text}" if text else ""))
    return "\n".join(out)


def _yaml_value(value) -> str:
    """One value as inline YAML: null, true, false, numbers, strings, flow-style lists and mappings."""
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value)
    return str(value)

"""`qgate <command> key=value …`: one subcommand per stage, each a thin door to its Ray entrypoint (or to Serve).

Every setting (`qgate config` lists them, with their defaults and help; `qgate/settings.py` defines them) can be
overridden (`gate.mode=probe`, `collect.actors=4`); short aliases are listed in `qgate.config.ALIASES`.
`qgate <command> --help` shows the command's docstring and the settings it reads.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("ray_jobs.demo", "the whole pipeline on the offline demo corpus with SmolLM2, graded on planted noise"),
    "pipeline": ("ray_jobs.pipeline", "warmup → collect → self-check → select, into one run directory"),
    "warmup": ("ray_jobs.warmup", "train the gates with the backbone frozen (Ray Train, DDP)"),
    "collect": ("ray_jobs.collect", "score a corpus into Parquet stats shards (Ray Data actor pool)"),
    "selfcheck": ("ray_jobs.selfcheck", "measure on the user's own rows whether high q means clean"),
    "select": ("ray_jobs.select", "global a/b/μ, q for every sample, top k%, report"),
    "finetune": ("ray_jobs.finetune", "LoRA on the selected data (Ray Train + peft), a standard peft adapter"),
    "evaluate": ("ray_jobs.evaluate", "lm-eval harness on base and base+adapter, local task files included"),
    "compare": ("ray_jobs.compare", "select by the run's score, random, PPL, IFD; finetune each; evaluate; one table"),
    "grade": ("ray_jobs.grade", "how the run's scores rank rows the user labelled, per kind, beside the baselines"),
    "serve": ("serve.app", "HTTP scoring of new samples relative to a run's corpus (Ray Serve)"),
    "demo-corpus": ("qgate.demo_corpus", "write the offline demo corpus of real Python documentation text"),
    "config": ("ray_jobs.cli", "print the resolved settings with their help: qgate config [section ...] [key=value ...]"),
}

# The extra that installs what a command imports beyond the core (pyproject.toml's optional dependencies).
EXTRAS = {"serve": "serve", "finetune": "finetune", "evaluate": "eval", "compare": "eval"}

USAGE = "usage: qgate <command> [key=value ...]   (qgate <command> --help for details)\n\ncommands:\n"


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return USAGE + "\n".join(lines) + "\n\nsettings: `qgate config` (every key overridable as key=value)"


def show_config(argv: list[str]) -> int:
    """`qgate config [section ...] [key=value ...]`: the settings a run would use (with `out=DIR`, that run's
    recorded ones under the overrides), each with its help."""
    from pathlib import Path

    from qgate.config import describe, load_config

    from qgate.settings import Settings

    sections = tuple(arg for arg in argv if "=" not in arg) or None
    unknown = sorted(set(sections or ()) - {f for f in Settings.__dataclass_fields__})
    if unknown:
        print(f"qgate config: no section {', '.join(unknown)}", file=sys.stderr)
        return 2
    overrides = [arg for arg in argv if "=" in arg]
    out = next((arg.split("=", 1)[1] for arg in overrides if arg.startswith("out=")), None)
    recorded = Path(out) / "config.yaml" if out and (Path(out) / "config.yaml").is_file() else None
    print(describe(load_config(overrides, recorded=recorded), sections))
    return 0


def command_help(command: str, module) -> str:
    from qgate.config import COMMAND_SECTIONS, describe, load_config

    sections = COMMAND_SECTIONS.get(command)
    if sections is None:
        return module.__doc__ or ""
    return f"{module.__doc__}\nsettings it reads (key=value to override):\n{describe(load_config([]), sections)}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"qgate: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if command == "config":
        return show_config(rest)
    try:
        module = importlib.import_module(COMMANDS[command][0])
        if any(arg in ("-h", "--help") for arg in rest):
            print(command_help(command, module))
            return 0
        result = module.main(rest)
    except ModuleNotFoundError as err:
        if command not in EXTRAS or err.name is None or err.name.startswith(("qgate", "ray_jobs", "serve.")):
            raise
        print(f"qgate {command}: {err.name} is not installed; pip install 'qgate[{EXTRAS[command]}]'",
              file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

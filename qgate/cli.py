"""`qgate <command> key=value …`: one subcommand per stage, each a thin door to its Ray entrypoint.

Every key of `qgate/configs/qgate.yaml` can be overridden (`gate.mode=probe`, `collect.actors=4`); short aliases
are listed in `qgate.config.ALIASES`. `qgate <command> --help` shows the command's own docstring.
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
    "serve": ("serve.app", "HTTP scoring of new samples relative to a run's corpus (Ray Serve)"),
    "demo-corpus": ("qgate.demo_corpus", "write the offline demo corpus of real Python documentation text"),
}

# The extra that installs what a command imports beyond the core (pyproject.toml's optional dependencies).
EXTRAS = {"serve": "serve", "finetune": "finetune", "evaluate": "eval", "compare": "eval"}

USAGE = "usage: qgate <command> [key=value ...]   (qgate <command> --help for details)\n\ncommands:\n"


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return USAGE + "\n".join(lines) + "\n\nconfiguration: qgate/configs/qgate.yaml (every key overridable as key=value)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"qgate: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command][0])
        if any(arg in ("-h", "--help") for arg in rest):
            print(module.__doc__)
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

"""lm-eval on a base model and base + adapter, with no Ray: the local task files (made loadable from anywhere),
the harness call, the metrics kept and the table. `ray_jobs/evaluate.py` runs it as a Ray task.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import tempfile
from pathlib import Path

import yaml

log = logging.getLogger("qgate.evaluate")

LOCAL_TASKS = Path(importlib.import_module("qgate.tasks").__file__).resolve().parent





def base_model_dir(name: str, workdir: str | Path) -> str:
    """A directory or hub id `from_pretrained` reads: tiny and GGUF models are saved under `workdir` first."""
    from qgate import tiny
    from qgate.models import resolve_model_path

    if not tiny.is_tiny(name) and not name.endswith(".gguf"):
        return resolve_model_path(name)
    target = Path(workdir) / f"base-{Path(name).stem}"
    if not (target / "config.json").exists():
        save_base_model(name, target)
    return str(target)



def save_base_model(name: str, target: Path) -> None:
    """Model and tokenizer in one directory, the embedding resized to the tokenizer so lm-eval keeps it as is."""
    from qgate.models import load_model, load_tokenizer

    model, tokenizer = load_model(name), load_tokenizer(name)
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)



class _Function(str):
    """A `!function module.name` value, kept as text when a task YAML is rewritten."""



class _Loader(yaml.SafeLoader):
    pass



class _Dumper(yaml.SafeDumper):
    pass



_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_Dumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def resolve_task_dirs(include_paths: list[str | Path], dest: Path) -> list[Path]:
    """Copies of the task directories (YAML and Python files) with relative local data files made absolute."""
    copies = []
    for i, source in enumerate(Path(p).resolve() for p in include_paths):
        copy = dest / f"{i}-{source.name}"
        for path in sorted(source.rglob("*")):
            if path.suffix in (".yaml", ".yml", ".py") and "__pycache__" not in path.parts:
                target = copy / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                if path.suffix != ".py":
                    _absolutize_data_files(path, target)
        copies.append(copy)
    return copies



def _absolutize_data_files(source: Path, target: Path) -> None:
    config = yaml.load(source.read_text(), Loader=_Loader)
    kwargs = config.get("dataset_kwargs") if isinstance(config, dict) else None
    if not isinstance(kwargs, dict) or not any(k in kwargs for k in ("data_files", "data_dir")):
        return
    for key in ("data_files", "data_dir"):
        if key in kwargs:
            kwargs[key] = _absolute(kwargs[key], source.parent)
    target.write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True))



def _absolute(value, base: Path):
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, str) and "://" not in value and not Path(value).is_absolute() and (base / value).exists():
        return str((base / value).resolve())
    return value



def task_manager(tasks: list[str], include_paths: list[Path]):
    """A TaskManager over the local task dirs; lm-eval's own index joins only when a task is not local."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include_paths], include_defaults=False)
    if all(task in manager.all_tasks for task in tasks):
        return manager
    return TaskManager(include_path=[str(p) for p in include_paths])



def lm_eval_scores(pretrained: str, tasks: list[str], adapter: str | None = None,
                   include_paths: list[str | Path] = (), limit: int | None = None, batch_size: int = 16,
                   num_fewshot: int | None = None, apply_chat_template: bool = False,
                   device: str | None = None, dtype: str = "float32") -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` from `lm_eval.simple_evaluate(model="hf")`, stderr as `<metric>_stderr`."""
    import lm_eval
    import torch

    model_args = {"pretrained": pretrained, "dtype": dtype}
    if adapter:
        model_args["peft"] = str(adapter)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = resolve_task_dirs([LOCAL_TASKS, *include_paths], Path(tmp))
        results = lm_eval.simple_evaluate(
            model="hf", model_args=model_args, tasks=list(tasks), task_manager=task_manager(tasks, dirs),
            limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, log_samples=False,
            apply_chat_template=apply_chat_template, device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        )
    return {task: _metrics(values) for task, values in results["results"].items()}



def _metrics(values: dict) -> dict[str, float]:
    """`{"acc,none": 0.3, "acc_stderr,none": 0.02, "alias": …}` -> `{"acc": 0.3, "acc_stderr": 0.02}`."""
    out = {}
    for key, value in values.items():
        metric, _, _ = key.partition(",")
        if isinstance(value, (int, float)) and "," in key:
            out[metric] = float(value)
    return out



def as_list(value) -> list[str]:
    """A list from a YAML list, a comma-separated string or null."""
    if value is None:
        return []
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else [str(v) for v in value]



def format_table(scores: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per model, one column per task metric."""
    columns = sorted({(task, metric) for by_task in scores.values() for task, metrics in by_task.items()
                      for metric in metrics if not metric.endswith("_stderr")})
    lines = ["| model | " + " | ".join(f"{t} {m}" for t, m in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, by_task in scores.items():
        cells = [_cell(by_task.get(t, {}), m) for t, m in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)



def _cell(metrics: dict, metric: str) -> str:
    if metric not in metrics:
        return "–"
    stderr = metrics.get(f"{metric}_stderr")
    return f"{metrics[metric]:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")

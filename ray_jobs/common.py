"""What every Ray entrypoint shares: connecting to Ray, the run directory and its recorded config, per-stage logs,
GPU choice."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from qgate.config import as_dict, changes_refused, load_config, save_config
from qgate.run_dir import RunDir

log = logging.getLogger("qgate")


def run_paths(out: str | Path) -> RunDir:
    """The layout of a run directory (`qgate.run_dir.RunDir`)."""
    return RunDir(out)


def init_ray(config: DictConfig) -> None:
    """Connect to `ray_address`, the cluster of `ray job submit`, or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    env_vars = {"TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get("QGATE_CACHE"):
        env_vars["QGATE_CACHE"] = os.environ["QGATE_CACHE"]
    env = {"env_vars": env_vars}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # A new local Ray even when another runs on this machine (`ray_address=auto` joins that one); its
        # dashboard serves the state API that Ray Train polls.
        ray.init(address="local", runtime_env=env, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False


def read_parquet(files: list[str], columns: list[str]):
    """`ray.data.read_parquet` through Ray's first Parquet datasource: the second one's file listing holds every
    pass ~3 s (0.1 s of it CPU) whatever the data's size (Ray 2.60), and select makes four passes. The choice is
    made when the dataset is built, so the driver's context is put back after it."""
    import ray

    context = ray.data.DataContext.get_current()
    if not hasattr(context, "use_datasource_v2"):
        return ray.data.read_parquet(files, columns=columns)
    before, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, columns=columns)
    finally:
        context.use_datasource_v2 = before


def gpus_available() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def use_gpu(config: DictConfig) -> bool:
    """`use_gpu: auto` means: when the cluster has GPUs."""
    if str(config.use_gpu).lower() == "auto":
        return gpus_available() > 0
    return bool(config.use_gpu)


@contextlib.contextmanager
def stage_log(out: str | Path, stage: str):
    """Logs of a stage go to the console and to `out/logs/<stage>.log`; the stage's wall time is logged."""
    path = run_paths(out)["logs"] / f"{stage}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    start = time.time()
    log.info("stage %s started", stage)
    try:
        yield path
    finally:
        log.info("stage %s finished in %.1f s", stage, time.time() - start)
        root.removeHandler(handler)
        handler.close()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def config_from_argv(argv: list[str] | None) -> DictConfig:
    """The run's recorded `out/config.yaml` (when there is one) under `--config FILE` and key=value overrides,
    over the defaults; `out` must be set."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = None
    if "--config" in argv:
        i = argv.index("--config")
        path = argv[i + 1]
        del argv[i:i + 2]
    config = load_config(argv, path)
    if not config.out:
        raise SystemExit("set the run directory: out=DIR")
    recorded = run_paths(config.out)["config"]
    return load_config(argv, path, recorded) if recorded.exists() else config


def existing_outputs(out: str | Path) -> set[str]:
    """Which outputs (the names of `qgate.config.DOWNSTREAM`) a run directory already holds."""
    paths = run_paths(out)
    found = {"warmup": any(paths["checkpoints"].glob("*/gates.safetensors")),
             "gates": (paths["gates"] / "gates.json").exists(), "stats": (paths["stats"] / "_schema.json").exists(),
             "selfcheck": paths.selfcheck_result.exists(), "selection": paths.selection_stats.exists()}
    return {name for name, there in found.items() if there}


def record_config(config: DictConfig, stages: list[str]) -> None:
    """Write `out/config.yaml`, after refusing any changed setting that shapes outputs already in `out` which
    `stages` do not write anew (the table in qgate/config.py)."""
    path = run_paths(config.out)["config"]
    if path.exists():
        recorded = as_dict(load_config(recorded=path))
        refused = changes_refused(recorded, as_dict(config), existing_outputs(config.out), stages)
        if refused:
            raise ValueError(f"{config.out} holds outputs made with other settings: " + "; ".join(refused)
                             + ". Use a new out directory, or remove those outputs to compute them again.")
    save_config(config, path)

import os

# Every test sees the same CPU, whatever this machine has: kernels capped at AVX2, so `autocast=auto` is float32
# and figures compared across runs, workers and processes do not depend on the machine (set before torch loads;
# Ray workers and subprocesses inherit it).
os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# One auth mode for every Ray this session starts or joins (local ones, `ray start` heads, multi-node clusters):
# a driver keeps the mode it first saw, and a cluster started later under another one refuses it.
os.environ["RAY_AUTH_MODE"] = "disabled"

FIRST_MODULES = ("test_scale_out.py",)


def pytest_collection_modifyitems(items):
    """The multi-node tests first: Ray Train cancels its controller on a multi-node cluster joined by a process
    that already ran Train on another cluster."""
    items.sort(key=lambda item: item.path.name not in FIRST_MODULES)

TINY_ARCHS = ["tiny-qwen3", "tiny-llama"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def toy_rows(n: int = 6, seed: int = 0, vocab: int = 400) -> list[dict]:
    """Encoded rows of varied length, as `encode_row` makes them, without a tokenizer."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + (i * 5) % 17
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        mask = [0] + [1] * (length - 1)
        rows.append({"id": f"r{i}", "input_ids": ids, "score_mask": mask, "response_mask": mask})
    return rows


def start_local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    return ray


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (2 CPUs), shut down after it."""
    ray = start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_finished_run(tmp_path_factory):
    """One `finished_run` for the modules that only read it (serve, serve security), built once per session under a
    Ray of its own (a session fixture is set up before any module's `ray_local`)."""
    import ray

    started = not ray.is_initialized()
    if started:
        start_local_ray()
    try:
        return finished_run(tmp_path_factory.mktemp("finished"))
    finally:
        if started:
            ray.shutdown()


# One `qgate pipeline` run every stage of, on a tiny model, for the tests that read it (the pipeline command, the
# self-check job) or work on a copy of it (run consistency). Held-out self-check kinds: warmup trains on two. The
# gates keep the halves read, so collect writes it and the self-check measures both blends.
TINY_PIPELINE_ROWS = 80
TINY_PIPELINE = ["model=tiny-qwen3", "steps=2", "warmup.batch_size=2", "warmup.checkpoint_every=1",
                 "max_length=256", "collect.actors=1", "selfcheck.rows=24", "selfcheck.min_rows=5",
                 "selfcheck.strict=false", "selection_percentage=0.25", "gate.contrast=true",
                 "warmup.negative_kinds=[word_shuffle,truncate]", "warmup.warmup_fraction=0.5",
                 "selection.score=q_ifd", "gate.halves=true"]


@pytest.fixture(scope="session")
def tiny_pipeline_run(tmp_path_factory):
    """(config, corpus) of a finished `qgate pipeline` over an 80-row demo corpus (20% planted), built once per
    session under a Ray of its own. Tests that write into a run work on a copy of `config.out`."""
    import ray

    from qgate.config import load_config
    from qgate.demo_corpus import build_demo_corpus
    from ray_jobs.cli import main

    root = tmp_path_factory.mktemp("tiny_pipeline")
    corpus = build_demo_corpus(root / "corpus", n_rows=TINY_PIPELINE_ROWS, seed=0, noise_fraction=0.2)
    args = [f"data={corpus['data_dir']}", f"out={root / 'run'}", f"grade.labels={corpus['labels']}", *TINY_PIPELINE]
    started = not ray.is_initialized()
    if started:
        start_local_ray()
    try:
        main(["pipeline", *args])
    finally:
        if started:
            ray.shutdown()
    return load_config(args, recorded=root / "run" / "config.yaml"), corpus


# ---- a finished tiny run, for the HTTP tests -----------------------------------------------------

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "python", "list", "string", "function",
         "returns", "value", "example"]
TINY_RUN = ["model=tiny-qwen3", "encoding.max_length=48", "collect.actors=1", "collect.ifd=true",
            "selection.direction=higher", "selfcheck.enabled=false", "serve.num_cpus=0.5"]


def corpus_text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def corpus_rows(n: int = 24) -> list[dict]:
    """All three loader forms, varied lengths; a few rows longer than `encoding.max_length` (truncated)."""
    rows = []
    for i in range(n):
        question, answer = corpus_text(i, 3 + i % 5), corpus_text(i + 1, 4 + (i * 5) % 40)
        if i % 3 == 0:
            rows.append({"id": f"r{i:02d}", "messages": [{"role": "user", "content": question},
                                                        {"role": "assistant", "content": answer}]})
        elif i % 3 == 1:
            rows.append({"id": f"r{i:02d}", "instruction": question, "input": "", "output": answer})
        else:
            rows.append({"id": f"r{i:02d}", "prompt": question, "completion": answer})
    return rows


def finished_run(root):
    """A run directory under `root` that `qgate serve` can serve: tiny gates, collect (with IFD) and select over
    `corpus_rows()`. Needs a running Ray. Returns the run's config."""
    from qgate.config import load_config, save_config
    from qgate.data import write_jsonl
    from qgate.gate import attach_gates, save_gates
    from qgate.models import model_identity
    from qgate.tiny import tiny_model
    from ray_jobs import collect, select
    from ray_jobs.common import run_paths

    write_jsonl(str(root / "data.jsonl"), corpus_rows())
    config = load_config([*TINY_RUN, f"out={root / 'run'}", f"data={root / 'data.jsonl'}"])
    paths = run_paths(config.out)
    save_config(config, paths["config"])
    gates = attach_gates(tiny_model("tiny-qwen3"), init_std=0.5, bias=True, init_bias=0.0, seed=1)
    save_gates(gates, paths["gates"], metadata=model_identity("tiny-qwen3"))
    collect.run(config)
    select.run(config)
    return config

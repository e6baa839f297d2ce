import os

import pytest
import torch

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


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (2 CPUs), shut down after it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()

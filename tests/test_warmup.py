"""Warmup through real Ray Train on the tiny model: outputs, DDP equivalence, resume, and a worker failure."""

import json

import pytest
import ray
from safetensors.torch import load_file

from qgate.config import load_config
from qgate.data import read_jsonl
from qgate.gate import EXTRA_INPUTS, attach_gates, load_gates, read_gate_metadata
from qgate.tiny import tiny_model
from qgate.warmup_loop import warmup_batch
from qgate.warmup_rows import shard_items
from ray_jobs import warmup

pytestmark = pytest.mark.timeout(120)

TOPICS = ["tea", "rivers", "bicycles", "volcanoes", "libraries", "owls", "bread", "chess", "glaciers", "trains",
          "honey", "lighthouses", "maps", "violins", "tides", "paper", "gardens", "clocks", "bridges", "salt"]


def less_rows() -> list[dict]:
    rows = []
    for i, topic in enumerate(TOPICS):
        rows.append(({"role": "user", "content": f"Tell me one fact about {topic}."},
                     {"role": "assistant", "content": f"People have studied {topic} for centuries, and each "
                                                      f"generation finds something new to say about them."}))
        rows.append(({"role": "user", "content": f"Why do people enjoy {topic}?"},
                     {"role": "assistant", "content": f"Many enjoy {topic} because they are useful, calm to "
                                                      f"think about, and often {['quiet', 'lovely'][i % 2]}."}))
    return [{"dataset": "toy", "id": f"toy-{i}", "messages": list(m)} for i, m in enumerate(rows)]


@pytest.fixture(scope="module")
def ray_local():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # the controller notices finished workers sooner
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    lines = [json.dumps(row) for row in less_rows()] + ["{not json", json.dumps({"messages": []})]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


TENT = {"gate.tent": "true", "warmup.own_answers": 0.25}  # every run here also trains a tent on own answers


def config(data, out, **overrides):
    args = {"data": data, "out": out, "model": "tiny-qwen3", "use_gpu": "false", "encoding.max_length": 64,
            "warmup.warmup_fraction": 0.5, "warmup.batch_size": 4, "warmup.workers": 1, "warmup.steps": 4,
            "warmup.report_every": 1, "warmup.checkpoint_every": 2, "warmup.lr": 0.01, **TENT, **overrides}
    return load_config([f"{key}={value}" for key, value in args.items()])


def run(data, out, **overrides) -> dict:
    """A warmup run; what it wrote, read back."""
    gates_dir = warmup.run(config(data, out, **overrides))
    return {"out": out, "gates": load_file(str(gates_dir / "gates.safetensors")),
            "meta": read_gate_metadata(gates_dir), "history": read_jsonl(str(out / "warmup" / "metrics.jsonl"))}


@pytest.fixture(scope="module")
def one_worker(ray_local, corpus, tmp_path_factory):
    return run(corpus, tmp_path_factory.mktemp("one"))


@pytest.fixture(scope="module")
def two_workers(ray_local, corpus, tmp_path_factory):
    """2 workers × batch 2 (the one-worker run's global batch); rank 0 fails once at step 3, so the run resumes
    from the step-2 checkpoint within the same fit."""
    out = tmp_path_factory.mktemp("two")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QGATE_FAIL_AT_STEP", "3")
        mp.setenv("QGATE_FAIL_MARKER", str(out / "failed-once"))
        return run(corpus, out, **{"warmup.workers": 2, "warmup.batch_size": 2, "warmup.max_failures": 1})


def test_global_batches_do_not_depend_on_the_number_of_workers():
    items = [{"input_ids": [100 + i, 7], "score_mask": [0, 1], "is_clean": 1.0, "negatives": []} for i in range(10)]
    cfg = {"seed": 3, "pad_id": 0}

    def global_batch(step, workers):
        shards = shard_items(items, 4 // workers, workers)
        return sorted(warmup_batch(shard, step, 4 // workers, cfg["seed"], cfg["pad_id"])["input_ids"][:, 0].tolist()
                      for shard in shards)

    batches = [[x for part in global_batch(step, 1) for x in part] for step in range(1, 10)]
    for step in range(1, 10):
        assert sorted(x for part in global_batch(step, 2) for x in part) == sorted(batches[step - 1])
    assert sorted(x for batch in batches[:3] for x in batch) == sorted(100 + i % 10 for i in range(12))  # one epoch


def test_a_global_batch_holds_neighbours_in_length():
    lengths = [5, 40, 12, 33, 7, 26, 19, 3]
    items = [{"input_ids": [1] * n, "score_mask": [1] * n, "is_clean": 1.0, "negatives": []} for n in lengths]
    items[0]["negatives"] = [{"input_ids": [1] * 30, "score_mask": [1] * 30, "is_clean": 0.0}]  # its copy is long
    for workers in (1, 2):
        shards = shard_items(items, 4 // workers, workers)
        blocks = [sorted(len(item["input_ids"]) for shard in shards for item in shard[b * 4 // workers:
                                                                                       (b + 1) * 4 // workers])
                  for b in range(2)]
        assert blocks == [[3, 7, 12, 19], [5, 26, 33, 40]]  # the row of 5 pads to its 30-token copy


def test_compose_share_gives_every_other_original_a_copy_of_two_kinds(corpus, tmp_path):
    from qgate.models import load_tokenizer
    from qgate.warmup_rows import warmup_items

    tokenizer = load_tokenizer("tiny-qwen3")
    registered = {"warmup.own_answers": 0}  # every copy made by the registered kinds
    _, plain, _ = warmup_items(config(corpus, tmp_path, **registered), tokenizer)
    _, mixed, _ = warmup_items(config(corpus, tmp_path, **registered, **{"warmup.compose_share": 0.5}), tokenizer)
    assert [item["input_ids"] for item in mixed] == [item["input_ids"] for item in plain]  # the same originals
    changed = [p["negatives"][0]["input_ids"] != m["negatives"][0]["input_ids"] for p, m in zip(plain, mixed)]
    # every other copy got a second kind; a few changes fall past max_length 64 and do not show
    assert sum(changed[1::2]) >= 0.75 * len(changed[1::2]) and not any(changed[::2])


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_one_worker_writes_gates_that_load_and_moved(one_worker):
    meta = one_worker["meta"]
    assert meta["steps_done"] == 4 and meta["resumed_from"] == 0
    assert meta["base_model"] == "tiny-qwen3" and meta["layers"] == [0, 1]
    assert meta["rows"]["reject:bad_json"] == 1 and meta["rows"]["reject:empty_messages"] == 1
    assert meta["rows"]["sampled"] == 20 and meta["rows"]["no_negative"] == 0
    # a quarter of the copies are the model's own answers (TENT); the tent kept the clean centre
    assert meta["tent"] and meta["rows"]["own_answers"] + meta["rows"]["own_answer_failed"] == 5
    assert meta["rows"]["own_answers"] >= 3
    centres = {float(v) for k, v in one_worker["gates"].items() if k.endswith("gain_center")}
    assert len(centres) == 1 and centres != {0.0}
    assert [m["step"] for m in one_worker["history"]] == [1, 2, 3, 4]
    assert set(meta["final_metrics"]) >= {"quality", "negatives", "good_ratio", "steps_per_s", "eta_s"}
    assert "ce" not in meta["final_metrics"]  # probe gates cannot change the LM loss: the head is skipped
    gates = load_gates(tiny_model("tiny-qwen3"), one_worker["out"] / "gates")
    saved = read_gate_metadata(one_worker["out"] / "gates")
    init = attach_gates(tiny_model("tiny-qwen3"), mode="probe", bias=True, init_bias=3.0, seed=0,
                        **{name: saved[name] for name in EXTRA_INPUTS})
    assert max_diff(gates.state_dict(), init.state_dict()) > 1e-3
    assert max_diff(gates.state_dict(), one_worker["gates"]) == 0
    assert (one_worker["out"] / "logs" / "warmup.log").exists()


def test_the_loop_without_ray_trains_the_gates_ray_train_trains(one_worker, corpus, tmp_path):
    """`warm_up_alone` (what the benchmarks and the GPU recipe run) on the same rows: the gates of one Ray Train
    worker, and the same metrics step by step."""
    from qgate.config import as_dict
    from qgate.models import load_tokenizer
    from qgate.training import WarmupLossConfig
    from qgate.warmup_loop import gate_kwargs, warm_up_alone
    from qgate.warmup_rows import warmup_items

    cfg = config(corpus, tmp_path)
    tokenizer = load_tokenizer(cfg.model)
    _, items, _ = warmup_items(cfg, tokenizer)  # without Ray: the model loaded here makes the own answers
    model = tiny_model("tiny-qwen3")
    attach_gates(model, **gate_kwargs(cfg))
    history = warm_up_alone(model, shard_items(items, cfg.warmup.batch_size, 1)[0],
                            WarmupLossConfig(**as_dict(cfg.loss)), steps=cfg.warmup.steps,
                            batch_size=cfg.warmup.batch_size, lr=cfg.warmup.lr, pad_id=tokenizer.pad_token_id,
                            seed=cfg.seed, weight_decay=cfg.warmup.weight_decay, contrast=cfg.gate.contrast,
                            autocast=cfg.autocast)
    assert max_diff(model.qgate_gates.state_dict(), one_worker["gates"]) < 1e-5
    assert [m["negatives"] for m in history] == pytest.approx([m["negatives"] for m in one_worker["history"]],
                                                              abs=1e-5)


def test_two_workers_stay_in_sync_and_match_one_worker(one_worker, two_workers):
    """Also after the injected failure: the resumed attempt replays the same batches with the restored optimizer,
    and the tent's clean-rows centre, summed over both ranks, is the one worker's."""
    checksums = two_workers["meta"]["final_metrics"]["gate_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert max_diff(two_workers["gates"], one_worker["gates"]) < 1e-5
    one, two = one_worker["history"][-1], two_workers["history"][-1]
    assert two["negatives"] == pytest.approx(one["negatives"], abs=1e-5)


def test_resume_continues_from_the_last_checkpoint(one_worker, corpus):
    resumed = run(corpus, one_worker["out"], **{"warmup.steps": 8})
    meta, history = resumed["meta"], resumed["history"]
    assert meta["resumed_from"] == 4 and meta["steps_done"] == 8
    assert [m["step"] for m in history] == list(range(1, 9))
    assert [m["start_step"] for m in history] == [0] * 4 + [4] * 4
    kept = sorted(p.name for p in (one_worker["out"] / "warmup").glob("step_*"))
    assert kept == ["step_000006", "step_000008"]
    assert max_diff(resumed["gates"], one_worker["gates"]) > 0


def test_a_worker_failure_resumes_and_finishes(two_workers):
    meta = two_workers["meta"]
    assert (two_workers["out"] / "failed-once").exists()
    assert meta["steps_done"] == 4 and meta["resumed_from"] == 2
    assert [m["step"] for m in two_workers["history"]] == [1, 2, 3, 4]
    assert [m["start_step"] for m in two_workers["history"]] == [0, 0, 2, 2]

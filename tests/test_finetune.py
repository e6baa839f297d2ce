"""Finetune, evaluate and compare on the tiny model: LoRA on assistant tokens, peft adapters, lm-eval, the table."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from omegaconf import OmegaConf
from peft import PeftModel

from qgate import comparison, evaluation
from qgate.config import load_config
from qgate.data import read_jsonl, write_jsonl
from qgate.finetune import (
    LoraSettings,
    ResponseLoss,
    collate,
    encode_rows,
    epoch_batches,
    heldout_loss,
    learning_rate_schedule,
    train,
)
from qgate.tasks import build_python_docs_mc as mc
from qgate.tiny import tiny_model, tiny_tokenizer
from ray_jobs import compare, finetune

pytestmark = pytest.mark.timeout(300)

TOPICS = ["tea", "rivers", "bicycles", "volcanoes", "libraries", "owls", "bread", "chess", "glaciers", "trains",
          "honey", "lighthouses", "maps", "violins", "tides", "paper"]
HELD_OUT_TOPICS = ["kites", "lamps", "ferns", "coral", "otters", "pianos"]


def toy_rows(prefix: str = "toy", topics=TOPICS) -> list[dict]:
    return [{"dataset": "toy", "id": f"{prefix}-{i}",
             "messages": [{"role": "user", "content": f"Tell me one fact about {topic}."},
                          {"role": "assistant", "content": f"People have studied {topic} for a long time."}]}
            for i, topic in enumerate(topics)]


def logits(model, tokenizer, text: str = "Tell me one fact about owls.") -> torch.Tensor:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ray_local():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl(str(root / "toy.jsonl"), toy_rows() + [{"messages": []}])
    write_jsonl(str(root / "heldout.jsonl"), toy_rows("held", HELD_OUT_TOPICS))
    return root


def tiny_config(out, **overrides):
    args = {"out": out, "model": "tiny-qwen3", "use_gpu": "false", "finetune.max_length": 64,
            "finetune.batch_size": 4, "finetune.lr": 0.01, "finetune.rank": 4, "finetune.alpha": 8,
            "evaluate.limit": 8, "evaluate.batch_size": 8, **overrides}
    return load_config([f"{key}={value}" for key, value in args.items()])


# ---- the library ---------------------------------------------------------------------------------


def test_the_loss_sees_assistant_tokens_only():
    tokenizer = tiny_tokenizer()
    (item,), dropped = encode_rows(tokenizer, toy_rows()[:1], max_length=64)
    assert not dropped
    kept = [t for t, m in zip(item["input_ids"], item["loss_mask"]) if m]
    assert tokenizer.decode(kept).strip() == "People have studied tea for a long time."
    batch = collate([item], tokenizer.pad_token_id)
    model = tiny_model("tiny-qwen3")
    total, count = ResponseLoss(model)(**batch)
    assert count == len(kept)
    prompt_labels = batch["input_ids"].clone()
    prompt_labels[batch["loss_mask"] == 0] = -100
    logits_ = model(input_ids=batch["input_ids"]).logits[:, :-1]
    reference = torch.nn.functional.cross_entropy(logits_.transpose(1, 2), prompt_labels[:, 1:], reduction="sum")
    assert total.item() == pytest.approx(reference.item(), rel=1e-4)


def test_global_batches_do_not_depend_on_the_number_of_workers():
    one = LoraSettings(batch_size=4, seed=3)
    two = LoraSettings(batch_size=2, seed=3)
    for epoch in range(2):
        single = epoch_batches(10, one, epoch, 0, 1)
        split = [epoch_batches(10, two, epoch, rank, 2) for rank in range(2)]
        assert len(single) == 3 and all(len(s) == len(single) for s in split)
        assert [sorted(a + b) for a, b in zip(*split)] == [sorted(s) for s in single]
    epoch = [i for batch in epoch_batches(10, one, 0, 0, 1) for i in batch]
    assert len(epoch) == 12 and set(epoch) == set(range(10))  # every row, two again to fill the last batch


def test_the_learning_rate_warms_up_then_follows_its_schedule_to_the_last_step():
    def rates(settings, n_items=10, world_size=1):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=settings.lr)
        scheduler = learning_rate_schedule(optimizer, settings, n_items, world_size)
        out = []
        for _ in range(settings.epochs * -(-n_items // (settings.batch_size * world_size))):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    assert rates(LoraSettings(lr=0.1, epochs=2, batch_size=2)) == [0.1] * 10  # the default: constant
    cosine = rates(LoraSettings(lr=0.1, epochs=2, batch_size=2, schedule="cosine", warmup_ratio=0.2))
    assert cosine[:3] == pytest.approx([0.0, 0.05, 0.1])  # 2 warmup steps of 10
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:])) and cosine[-1] < 0.01
    # steps count global batches: two workers of batch 2 take 3 steps an epoch of 10 rows
    assert len(rates(LoraSettings(lr=0.1, epochs=1, batch_size=2, schedule="linear"), world_size=2)) == 3
    settings = finetune.settings_of(load_config(["finetune.schedule=cosine", "finetune.warmup_ratio=0.1"]))
    assert (settings.schedule, settings.warmup_ratio) == ("cosine", 0.1)
    with pytest.raises(ValueError, match="schedule"):
        train(tiny_model("tiny-qwen3"), tiny_tokenizer(), toy_rows(), LoraSettings(schedule="step"))


def test_train_saves_an_adapter_that_loads_and_changes_outputs(tmp_path):
    tokenizer = tiny_tokenizer()
    settings = LoraSettings(rank=4, alpha=8, lr=0.01, epochs=3, batch_size=4, max_length=64, seed=0)
    before = heldout_loss(tiny_model("tiny-qwen3"), tokenizer, toy_rows(), 64)
    history = []
    trained = train(tiny_model("tiny-qwen3"), tokenizer, toy_rows(), settings, on_epoch=history.append)
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[0]["rows"] == len(TOPICS)
    assert heldout_loss(trained, tokenizer, toy_rows(), 64) < before - 0.5
    trained.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_model("tiny-qwen3"), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(loaded, tokenizer), logits(trained, tokenizer))
    assert (logits(loaded, tokenizer) - logits(tiny_model("tiny-qwen3"), tokenizer)).abs().max() > 1e-2


def test_bf16_autocast_trains_and_scores_like_float32():
    tokenizer = tiny_tokenizer()
    plain = heldout_loss(tiny_model("tiny-qwen3"), tokenizer, toy_rows(), 64)
    assert heldout_loss(tiny_model("tiny-qwen3"), tokenizer, toy_rows(), 64, autocast="bf16") == pytest.approx(
        plain, abs=0.05)
    settings = finetune.settings_of(load_config(["autocast=bf16", "finetune.rank=4", "finetune.alpha=8",
                                                 "finetune.lr=0.01", "finetune.epochs=3", "finetune.batch_size=4",
                                                 "finetune.max_length=64"]))
    assert settings.autocast == "bf16"
    trained = train(tiny_model("tiny-qwen3"), tokenizer, toy_rows(), settings)
    assert heldout_loss(trained, tokenizer, toy_rows(), 64, autocast="bf16") < plain - 0.5


# ---- the local lm-eval task ----------------------------------------------------------------------


def test_questions_cycle_the_answer_and_hold_four_distinct_choices():
    objects = [(f"m.f{i}", f"Sentence number {i} describes a function.") for i in range(9)]
    questions = mc.build_questions(objects, seed=0)
    assert [q["label"] for q in questions] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    for q in questions:
        assert len(set(q["choices"])) == 4
        assert q["choices"][q["label"]] == dict(objects)[q["name"]]
    assert questions == mc.build_questions(objects, seed=0)
    (row,) = mc.heldout_rows([mc.HeldOut("m.f0", "Sentence.", "Sentence. And more prose.")])
    assert row["messages"][-1] == {"role": "assistant", "content": "Sentence. And more prose."}


def test_the_shipped_task_is_held_out_of_the_demo_corpus():
    from qgate.demo_corpus import doc_entries

    corpus_text = "\n".join(entry.text for entry in doc_entries())
    questions = read_jsonl(str(mc.TASK_FILE))
    assert len(questions) >= 200
    assert not [q for q in questions if q["choices"][q["label"]] in corpus_text]
    assert not {q["name"].split(".")[0] for q in questions} & {"json", "os", "re", "collections"}


def test_task_yaml_data_files_are_resolved_next_to_the_yaml(tmp_path):
    (copy,) = evaluation.resolve_task_dirs([evaluation.LOCAL_TASKS], tmp_path)
    config = yaml.safe_load((copy / "python_docs_mc" / "python_docs_mc.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"]["test"] == str(mc.TASK_FILE)


def test_lm_eval_runs_the_local_task_on_base_and_adapter(tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tokenizer = tiny_tokenizer()
    settings = LoraSettings(rank=4, alpha=8, lr=0.01, epochs=3, batch_size=4, max_length=64)
    train(tiny_model("tiny-qwen3"), tokenizer, toy_rows(), settings).save_pretrained(tmp_path / "adapter")
    base = evaluation.base_model_dir("tiny-qwen3", tmp_path)
    scores = evaluation.lm_eval_scores(base, ["python_docs_mc"], adapter=str(tmp_path / "adapter"), limit=8,
                                     batch_size=8, device="cpu")
    metrics = scores["python_docs_mc"]
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0 and "acc_stderr" in metrics
    request = [Instance("loglikelihood", {}, ("Tell me one fact about owls.", " People have studied owls."), 0)]
    (plain, _), = HFLM(pretrained=base, device="cpu", batch_size=1).loglikelihood(request)
    (tuned, _), = HFLM(pretrained=base, peft=str(tmp_path / "adapter"), device="cpu", batch_size=1).loglikelihood(request)
    assert tuned > plain + 1.0  # lm-eval applies the adapter, and it learned the pattern


# ---- Ray Train and the comparison ----------------------------------------------------------------


def test_ray_finetune_writes_a_peft_adapter(ray_local, corpus, tmp_path):
    config = tiny_config(tmp_path / "run", **{"finetune.data": corpus / "toy.jsonl", "finetune.workers": 2,
                                              "finetune.batch_size": 2, "finetune.epochs": 2,
                                              "finetune.heldout": corpus / "heldout.jsonl"})
    adapter = finetune.run(config)
    tokenizer = tiny_tokenizer()
    loaded = PeftModel.from_pretrained(tiny_model("tiny-qwen3"), str(adapter)).eval()
    assert (logits(loaded, tokenizer) - logits(tiny_model("tiny-qwen3"), tokenizer)).abs().max() > 1e-2
    metrics = json.loads((tmp_path / "run" / "finetune" / "metrics.json").read_text())
    assert metrics["rows"] == {"read": len(TOPICS) + 1, "reject:empty_messages": 1}
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["after"]["heldout_loss"] < metrics["before"]["heldout_loss"]
    assert metrics["after"]["heldout_se"] > 0


def fake_run(root, corpus) -> None:
    """A finished run: its config names the data; scores.parquet as select writes it (q points lower here)."""
    (root / "selection").mkdir(parents=True)
    (root / "config.yaml").write_text(f"data: {corpus / 'toy.jsonl'}\n")
    n = len(TOPICS)
    q = [float((7 * i) % n) for i in range(n)]
    scores = pd.DataFrame({"id": [f"toy-{i}" for i in range(n)], "dataset": "toy", "q": q,
                           "selected": [v < 4 for v in q], "ppl": 1.0, "n_tokens": 20,
                           "response_nll": [float(i) for i in range(n)], "ifd": [float(n - i) for i in range(n)]})
    pq.write_table(pa.Table.from_pandas(scores, preserve_index=False), root / "selection" / "scores.parquet")
    write_jsonl(str(root / "labels.jsonl"), [{"dataset": "toy", "id": f"toy-{i}",
                                              "label": "corrupt" if q[i] >= 12 else "clean"} for i in range(n)])


def test_subsets_follow_each_strategy(tmp_path, corpus):
    fake_run(tmp_path, corpus)
    scores = pq.read_table(tmp_path / "selection" / "scores.parquet").to_pandas()
    direction = comparison.q_direction(scores)
    assert direction == "lower"
    picked = comparison.subsets(scores, ["qgate", "random", "response_ppl", "ifd"], 0.25, [0, 1], direction)
    ids = {(strategy, seed): [i for _, i in keys] for (strategy, _, seed), keys in picked.items()}
    assert sorted(ids["qgate", 0]) == sorted(scores.loc[scores["selected"], "id"]) and len(ids["qgate", 0]) == 4
    assert ids["response_ppl", 0] == ["toy-0", "toy-1", "toy-2", "toy-3"]
    assert ids["ifd", 0] == ["toy-15", "toy-14", "toy-13", "toy-12"]
    assert ids["random", 0] != ids["random", 1] and ids["qgate", 0] == ids["qgate", 1]
    assert [seed for _, _, seed in picked] == [0] * 4 + [1] * 4  # every arm's first seed before any second


def test_the_qgate_subset_follows_the_score_the_run_sorted_on(tmp_path, corpus):
    fake_run(tmp_path, corpus)
    scores = pq.read_table(tmp_path / "selection" / "scores.parquet").to_pandas()
    n = len(scores)
    scores["score"] = [float(i) for i in range(n)]  # a q + IFD blend, higher = clean, unlike q here
    scores["selected"] = scores["score"] >= n - 4
    direction = comparison.q_direction(scores)
    assert direction == "higher"
    picked = comparison.subsets(scores, ["qgate"], 0.25, [0], direction)
    assert [i for _, i in picked["qgate", 0.25, 0]] == [f"toy-{i}" for i in range(n - 1, n - 5, -1)]


def test_the_table_shows_mean_and_interval_over_seeds():
    base = {"strategy": "base (no finetune)", "heldout_loss": 3.0, "heldout_se": 0.05,
            "scores": {"t": {"acc_norm": 0.25}}}
    runs = [{"strategy": "qgate", "budget": 0.3, "seed": s, "rows": 8, "planted_share": 0.0, "heldout_loss": loss,
             "heldout_se": 0.0, "scores": {"t": {"acc_norm": acc}}} for s, loss, acc in [(0, 2.0, 0.5), (1, 2.2, 0.3)]]
    summary = comparison.summarize(runs, base, ["t"], "acc_norm")
    loss = summary[1]["heldout_loss"]
    half = 12.7062 * 0.141421 / 2 ** 0.5  # Student's t, 1 degree of freedom
    assert loss["mean"] == pytest.approx(2.1) and loss["sd"] == pytest.approx(0.141421, abs=1e-6)
    assert loss["ci"] == pytest.approx((2.1 - half, 2.1 + half), abs=1e-3)
    assert loss["se"] == pytest.approx(0.1)  # the seeds' spread; these runs' items add nothing
    assert summary[0]["heldout_loss"]["se"] == pytest.approx(0.05)  # the base model: its items' error alone
    table = comparison.format_table({"tasks": ["t"], "metric": "acc_norm", "summary": summary})
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    assert cells[2] == ["base (no finetune)", "–", "–", "–", "–", "3.0000", "0.250"]
    assert cells[3] == ["qgate", "30%", "2", "8", "0.0%", f"2.1000 [{2.1 - half:.4f}, {2.1 + half:.4f}]",
                        "0.400 [-0.871, 1.671]"]


def test_gaps_count_combined_standard_errors_against_each_baseline():
    def row(strategy, budget, mean, se):
        return {"strategy": strategy, "budget": budget, "mc_acc": {"mean": mean, "se": se}}

    summary = [row("qgate", 0.3, 0.60, 0.03), row("random", 0.3, 0.50, 0.04), row("random", 0.1, 0.9, 0.01),
               row("clean", None, 0.62, 0.0)]
    gaps = {g["versus"]: g for g in comparison.gaps(summary, 0.3, "mc_acc", ["random", "clean", "ifd"])}
    assert set(gaps) == {"random", "clean"}  # no ifd row, no gap; random at 10% is not compared
    assert gaps["random"]["diff"] == pytest.approx(0.10) and gaps["random"]["se"] == pytest.approx(0.05)
    assert gaps["random"]["z"] == pytest.approx(2.0) and gaps["clean"]["diff"] == pytest.approx(-0.02)


def test_the_goal_reads_the_gaps_with_the_sign_of_each_measure():
    gap_rows = [{"measure": "heldout_loss", "strategy": "qgate", "versus": "random", "z": -2.5},
                {"measure": "heldout_loss", "strategy": "qgate", "versus": "clean", "z": 3.0},
                {"measure": "mc_acc", "strategy": "qgate", "versus": "random", "z": 1.5},
                {"measure": "mc_acc", "strategy": "qgate", "versus": "clean", "z": -0.5},
                {"measure": "mc_acc", "strategy": "qgate_diverse", "versus": "random", "z": 9.0},
                {"measure": "mc_acc", "strategy": "qgate_diverse", "versus": "clean_random", "z": -1.6}]
    loss, mc = comparison.goal_of(gap_rows)
    assert loss == ("heldout_loss: qgate beats random by 2 SE (+2.5 SE); is not within 1 SE of the clean rows "
                    "(-3.0 SE)")  # lower loss is better: a negative gap to random is a win
    assert mc == "mc_acc: qgate does not beat random by 2 SE (+1.5 SE); is within 1 SE of the clean rows (-0.5 SE)"
    report = comparison.format_goal(gap_rows)  # every qgate variant compared gets its verdict
    assert f"- {loss}\n- {mc}\n- mc_acc: qgate_diverse beats random by 2 SE (+9.0 SE); is not within 1 SE of a " \
           "perfect filter at the budget (-1.6 SE)" in report


def test_the_curve_and_the_ceiling_pick_their_rows(tmp_path, corpus):
    fake_run(tmp_path, corpus)
    scores = pq.read_table(tmp_path / "selection" / "scores.parquet").to_pandas()
    labels = comparison.read_labels(tmp_path / "labels.jsonl")
    picked = comparison.subsets(scores, ["qgate", "all", "clean"], 0.25, [0], "lower", labels,
                                curve=[0.5, 0.25], curve_strategies=["qgate", "random"])
    assert sorted(picked) == sorted([("qgate", 0.25, 0), ("all", None, 0), ("clean", None, 0), ("qgate", 0.5, 0),
                                     ("random", 0.5, 0), ("random", 0.25, 0)])
    assert len(picked["qgate", 0.5, 0]) == 8 and len(picked["all", None, 0]) == len(scores)
    assert comparison.planted_share(picked["clean", None, 0], labels) == 0.0
    assert len(picked["clean", None, 0]) == sum(not planted for planted in labels.values())
    with pytest.raises(ValueError, match="clean strategy needs"):
        comparison.subsets(scores, ["clean"], 0.25, [0], "lower")
    perfect = comparison.subsets(scores, ["clean_random"], 0.25, [0, 1], "lower", labels)
    for seed in (0, 1):  # a perfect filter at the budget: k clean rows, a different draw per seed
        keys = perfect["clean_random", 0.25, seed]
        assert len(keys) == 4 and set(keys) <= set(picked["clean", None, 0])
    assert perfect["clean_random", 0.25, 0] != perfect["clean_random", 0.25, 1]


def test_qgate_diverse_keeps_one_of_near_duplicate_rows_within_the_pool():
    scores = pd.DataFrame({"dataset": "toy", "id": [f"toy-{i}" for i in range(8)], "score": [8.0 - i for i in range(8)],
                           "selected": [i < 3 for i in range(8)]})
    features = np.eye(8)[[0, 0, 2, 3, 4, 5, 6, 7]]  # rows 0 and 1 say the same
    diversity = {"features": features, "n_clusters": 2, "threshold": 0.8, "seed": 0, "pool": 1.5}
    picked = comparison.subsets(scores, ["qgate", "qgate_diverse"], 3 / 8, [0], "higher", diversity=diversity)
    assert [i for _, i in picked["qgate", 3 / 8, 0]] == ["toy-0", "toy-1", "toy-2"]
    assert picked["qgate_diverse", 3 / 8, 0] == [("toy", "toy-0"), ("toy", "toy-2"), ("toy", "toy-3")]
    narrow = comparison.pick(scores, "qgate_diverse", 3, direction="higher", diversity={**diversity, "pool": 1.0})
    assert narrow == [("toy", "toy-0"), ("toy", "toy-1"), ("toy", "toy-2")]  # the pool is the top 3: fill
    summary = [{"strategy": s, "budget": 0.3, "mc_acc": {"mean": m, "se": 0.01}} for s, m in
               [("qgate", 0.5), ("qgate_diverse", 0.6), ("random", 0.4)]]
    gap_rows = comparison.gaps(summary, 0.3, "mc_acc", ["qgate", "random"], "qgate_diverse")
    assert [(g["versus"], round(g["diff"], 6)) for g in gap_rows] == [("qgate", 0.1), ("random", 0.2)]
    assert "qgate_diverse − random" in comparison.format_gaps(gap_rows)


def test_clean_diverse_is_a_perfect_score_through_the_same_filter():
    scores = pd.DataFrame({"dataset": "toy", "id": [f"toy-{i}" for i in range(8)], "score": [8.0 - i for i in range(8)],
                           "selected": [i < 3 for i in range(8)]})
    labels = {("toy", f"toy-{i}"): i in (0, 3) for i in range(8)}  # rows 0 and 3 planted
    features = np.eye(8)[[0, 1, 1, 3, 1, 5, 6, 7]]  # rows 1, 2 and 4 say the same
    diversity = {"features": features, "n_clusters": 2, "threshold": 0.8, "seed": 0, "pool": None}
    picked = comparison.subsets(scores, ["clean_diverse"], 3 / 8, [0, 1, 2], "lower", labels, diversity=diversity)
    for seed in (0, 1, 2):  # clean rows only, one of the three that say the same, whatever qgate's score says
        keys = {i for _, i in picked["clean_diverse", 3 / 8, seed]}
        assert len(keys) == 3 and not keys & {"toy-0", "toy-3"} and len(keys & {"toy-1", "toy-2", "toy-4"}) == 1
    assert len({tuple(picked["clean_diverse", 3 / 8, seed]) for seed in (0, 1, 2)}) > 1  # a fresh order per seed
    with pytest.raises(ValueError, match="clean_diverse strategy needs"):
        comparison.pick(scores, "clean_diverse", 3, diversity=diversity)
    summary = [{"strategy": s, "budget": 0.3, "mc_acc": {"mean": m, "se": 0.01}} for s, m in
               [("qgate_diverse", 0.6), ("clean_diverse", 0.605)]]
    goal = comparison.goal_of(comparison.gaps(summary, 0.3, "mc_acc", ["clean_diverse"], "qgate_diverse"),
                              "qgate_diverse")
    assert goal == ["mc_acc: qgate_diverse is within 1 SE of a perfect score through the same filter (-0.4 SE)"]


def test_qgate_diverse_compares_questions_and_answers_unless_the_run_chose_text_features():
    from qgate.compare_runs import diversity_of

    scores = pd.DataFrame({"dataset": "toy", "id": ["a", "b", "c"]})
    answer = {"role": "assistant", "content": "It parses alpha records into beta tables."}
    rows = {("toy", "a"): {"messages": [{"role": "user", "content": "What does alpha do?"}, answer]},
            ("toy", "b"): {"messages": [{"role": "user", "content": "Explain gamma delta briefly."}, answer]},
            ("toy", "c"): {"messages": [{"role": "user", "content": "What is epsilon?"},
                                        {"role": "assistant", "content": "A Greek letter used for small numbers."}]}}
    gates_run = load_config(["selection.features=gates", "selection.similarity_threshold=0.95"])
    text_run = load_config(["selection.features=text", "selection.similarity_threshold=0.9"])
    response_run = load_config(["selection.features=response", "selection.similarity_threshold=0.85"])
    paired = diversity_of(gates_run, scores, rows)
    assert (paired["source"], paired["threshold"], paired["parts"]) == ("prompt_response", 0.8, 2)  # not 0.95
    assert paired["pool"] is None  # `auto` with questions and answers: every row is a candidate
    prompts, answers = np.split(paired["features"], 2, axis=1)  # [3, 256] unit rows each
    assert answers[0] @ answers[1] == pytest.approx(1.0) and answers[0] @ answers[2] < 0.5  # one answer, two asks
    assert prompts[0] @ prompts[1] < 0.5  # asked apart
    whole = diversity_of(text_run, scores, rows)
    assert (whole["source"], whole["threshold"]) == ("text", 0.9) and whole["features"][0] @ whole["features"][1] < 0.9
    answers_only = diversity_of(response_run, scores, rows)
    assert (answers_only["threshold"], answers_only["parts"], answers_only["pool"]) == (0.85, 1, 1.5)


def toy_mc(topics=HELD_OUT_TOPICS) -> list[dict]:
    items = []
    for i, topic in enumerate(topics):
        true, false = f"People have studied {topic} for a long time.", f"{topic} ate the moon yesterday."
        items.append({"question": f"Tell me one fact about {topic}.", "label": i % 2,
                      "choices": [false, true] if i % 2 else [true, false]})
    return items


def test_compare_end_to_end_writes_the_table_and_resumes(ray_local, corpus, tmp_path):
    fake_run(tmp_path, corpus)
    write_jsonl(str(tmp_path / "mc.jsonl"), toy_mc())
    config = tiny_config(tmp_path, **{"compare.heldout": corpus / "heldout.jsonl", "compare.budget": 0.5,
                                      "compare.seeds": 1, "compare.strategies": "[qgate,clean]",
                                      "compare.labels": tmp_path / "labels.jsonl", "compare.mc": tmp_path / "mc.jsonl",
                                      "compare.curve": "[0.25]", "compare.curve_strategies": "[qgate]",
                                      "finetune.epochs": 2})
    first = compare.run(OmegaConf.merge(config, {"compare": {"budget_min": 1e-9}}))
    assert len(first["runs"]) == 1 and len(first["not_run"]) == 2  # spent at once: one finetune, as every call
    result = compare.run(config)
    assert result["not_run"] == [] and len(result["runs"]) == 3
    assert json.loads((tmp_path / "compare" / "runs" / "qgate-50pct-s0.json").read_text())["fingerprint"]
    summary = {(row["strategy"], row["budget"]): row for row in result["summary"]}
    assert list(summary) == [("base (no finetune)", None), ("qgate", 0.5), ("clean", None), ("qgate", 0.25)]
    assert summary["qgate", 0.5]["planted_share"] == 0.0 and summary["clean", None]["planted_share"] == 0.0
    assert summary["clean", None]["rows"] == 12 and summary["qgate", 0.25]["rows"] == 4
    for row in summary.values():
        assert 0.0 <= row["python_docs_mc"]["mean"] <= 1.0 and 0.0 <= row["mc_acc"]["mean"] <= 1.0
    base_loss = summary["base (no finetune)", None]["heldout_loss"]["mean"]
    assert summary["qgate", 0.5]["heldout_loss"]["mean"] < base_loss
    assert {(g["measure"], g["versus"]) for g in result["gaps"]} == {
        (measure, "clean") for measure in ("heldout_loss", "mc_acc", "python_docs_mc")}
    table = (tmp_path / "compare" / "compare.md").read_text()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if "|" in line]
    assert ["qgate", "50%", "1", "8", "0.0%"] in [row[:5] for row in cells] and "fact MC acc_norm" in table
    assert "python_docs_mc acc_norm" in table and "![budget curve](budget_curve.png)" in table  # qgate at two budgets
    assert "- mc_acc: qgate is" in table and "within 1 SE of the clean rows" in table  # the goal, read for the user
    assert (tmp_path / "compare" / "budget_curve.png").stat().st_size > 5000
    assert json.loads((tmp_path / "compare" / "compare.json").read_text())["q_direction"] == "lower"
    assert (tmp_path / "compare" / "adapters" / "qgate-25pct-s0" / "adapter_config.json").exists()


def test_a_finetune_is_kept_across_calls_with_other_cores_and_redone_with_other_settings():
    from qgate.compare_runs import fingerprint

    keys = [("toy", "a"), ("toy", "b")]
    first = fingerprint(load_config(["finetune.cpus_per_worker=1"]), keys)
    assert fingerprint(load_config(["finetune.cpus_per_worker=2", "finetune.max_failures=3"]), keys[::-1]) == first
    assert fingerprint(load_config(["finetune.lr=1e-3"]), keys) != first
    assert fingerprint(load_config(["finetune.workers=2"]), keys) != first  # another global batch
    assert fingerprint(load_config([]), keys[:1]) != first


def test_the_gaps_to_random_are_read_at_every_budget_of_the_curve():
    def row(strategy, budget, mean, se):
        return {"strategy": strategy, "budget": budget, "mc_acc": {"mean": mean, "se": se}}

    summary = [row("qgate", 0.1, 0.35, 0.03), row("random", 0.1, 0.28, 0.04), row("qgate", 0.5, 0.67, 0.05),
               row("random", 0.5, 0.34, 0.0), row("qgate", 0.3, 0.54, 0.02), row("all", None, 0.6, 0.1)]
    rows = comparison.curve_gaps(summary, [0.1, 0.5, 0.7], "mc_acc")
    assert [(g["budget"], g["versus"]) for g in rows] == [(0.1, "random"), (0.5, "random")]  # none at 70%
    assert rows[0]["diff"] == pytest.approx(0.07) and rows[0]["z"] == pytest.approx(0.07 / 0.05)
    assert rows[1]["z"] == pytest.approx(0.33 / 0.05)
    assert "qgate − random at 50%" in comparison.format_gaps(rows)
    assert comparison.curve_gaps(summary, [0.1], "mc_acc", "qgate_diverse") == []


def test_the_budget_curve_is_drawn_for_strategies_at_several_budgets(tmp_path):
    def row(strategy, budget, mean):
        stat = {"mean": mean, "sd": 0.0, "ci": (mean - 0.1, mean + 0.1), "se": 0.05}
        return {"strategy": strategy, "budget": budget, "seeds": 3, "heldout_loss": stat}

    result = {"tasks": [], "metric": "acc_norm", "mc": False,
              "summary": [{**row("base (no finetune)", None, 3.0), "seeds": None}, row("all", None, 2.0)]
              + [row(s, b, 2.5 - b) for s in ("qgate", "random") for b in (0.1, 0.3, 0.5)]
              + [row("clean_random", 0.3, 1.9)]}
    series = comparison.curve_series(result)
    assert list(series["curves"]) == ["qgate", "random"] and list(series["points"]) == ["clean_random"]
    assert [r["budget"] for r in series["curves"]["qgate"]] == [0.1, 0.3, 0.5]
    assert list(series["lines"]) == ["base (no finetune)", "all"]
    path = comparison.plot_budget_curve(result, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    result["summary"] = result["summary"][:3] + result["summary"][-1:]  # no strategy at two budgets: no curve
    assert comparison.plot_budget_curve(result, tmp_path / "none.png") is None

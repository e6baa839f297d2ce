"""Finetune, evaluate and compare on the tiny model: LoRA on assistant tokens, peft adapters, lm-eval, the table."""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
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
    train_lora,
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


def test_train_lora_saves_an_adapter_that_loads_and_changes_outputs(tmp_path):
    tokenizer = tiny_tokenizer()
    settings = LoraSettings(rank=4, alpha=8, lr=0.01, epochs=3, batch_size=4, max_length=64, seed=0)
    before = heldout_loss(tiny_model("tiny-qwen3"), tokenizer, toy_rows(), 64)
    history = []
    trained = train_lora(tiny_model("tiny-qwen3"), tokenizer, toy_rows(), settings, on_epoch=history.append)
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
    trained = train_lora(tiny_model("tiny-qwen3"), tokenizer, toy_rows(), settings)
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
    train_lora(tiny_model("tiny-qwen3"), tokenizer, toy_rows(), settings).save_pretrained(tmp_path / "adapter")
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
    assert metrics["heldout_after"] < metrics["heldout_before"]


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
    ids = {key: [i for _, i in keys] for key, keys in picked.items()}
    assert sorted(ids["qgate", 0]) == sorted(scores.loc[scores["selected"], "id"]) and len(ids["qgate", 0]) == 4
    assert ids["response_ppl", 0] == ["toy-0", "toy-1", "toy-2", "toy-3"]
    assert ids["ifd", 0] == ["toy-15", "toy-14", "toy-13", "toy-12"]
    assert ids["random", 0] != ids["random", 1] and ids["qgate", 0] == ids["qgate", 1]


def test_the_qgate_subset_follows_the_score_the_run_sorted_on(tmp_path, corpus):
    fake_run(tmp_path, corpus)
    scores = pq.read_table(tmp_path / "selection" / "scores.parquet").to_pandas()
    n = len(scores)
    scores["score"] = [float(i) for i in range(n)]  # a q + IFD blend, higher = clean, unlike q here
    scores["selected"] = scores["score"] >= n - 4
    direction = comparison.q_direction(scores)
    assert direction == "higher"
    picked = comparison.subsets(scores, ["qgate"], 0.25, [0], direction)
    assert [i for _, i in picked["qgate", 0]] == [f"toy-{i}" for i in range(n - 1, n - 5, -1)]


def test_the_table_shows_mean_and_spread_over_seeds():
    base = {"strategy": "base (no finetune)", "heldout_loss": 3.0, "scores": {"t": {"acc_norm": 0.25}}}
    runs = [{"strategy": "qgate", "seed": s, "rows": 8, "planted_share": 0.0, "heldout_loss": loss,
             "scores": {"t": {"acc_norm": acc}}} for s, loss, acc in [(0, 2.0, 0.5), (1, 2.2, 0.3)]]
    summary = comparison.summarize(runs, base, ["t"], "acc_norm")
    assert summary[1]["heldout_loss"] == pytest.approx((2.1, 0.141421), abs=1e-6)
    assert summary[1]["t"] == pytest.approx((0.4, 0.141421), abs=1e-6)
    table = comparison.format_table({"tasks": ["t"], "metric": "acc_norm", "summary": summary})
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    assert cells[2] == ["base (no finetune)", "–", "–", "–", "3.0000 ± 0.0000", "0.250 ± 0.000"]
    assert cells[3] == ["qgate", "2", "8", "0.0 ± 0.0", "2.1000 ± 0.1414", "0.400 ± 0.141"]


def test_compare_end_to_end_writes_the_table(ray_local, corpus, tmp_path):
    fake_run(tmp_path, corpus)
    config = tiny_config(tmp_path, **{"compare.heldout": corpus / "heldout.jsonl", "compare.budget": 0.5,
                                      "compare.seeds": 1, "compare.strategies": "[qgate,random]",
                                      "compare.labels": tmp_path / "labels.jsonl", "finetune.epochs": 2})
    result = compare.run(config)
    table = (tmp_path / "compare" / "compare.md").read_text()
    assert [row["strategy"] for row in result["summary"]] == ["base (no finetune)", "qgate", "random"]
    assert len(result["runs"]) == 2 and all(r["rows"] == 8 for r in result["runs"])
    assert result["summary"][1]["planted_share"] == (0.0, 0.0)
    for row in result["summary"]:
        assert 0.0 <= row["python_docs_mc"][0] <= 1.0 and row["heldout_loss"][0] > 0
    assert result["summary"][1]["heldout_loss"][0] < result["summary"][0]["heldout_loss"][0]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if "|" in line]
    assert ["qgate", "1", "8", "0.0 ± 0.0"] in [row[:4] for row in cells] and "python_docs_mc acc_norm" in table
    assert json.loads((tmp_path / "compare" / "compare.json").read_text())["q_direction"] == "lower"
    assert (tmp_path / "compare" / "adapters" / "random-s0" / "adapter_config.json").exists()

from pathlib import Path

import pytest
import torch

from qgate.config import as_dict, changes_refused, load_config, save_config
from qgate.models import autocast_dtype


def test_aliases_expand_and_files_layer_under_overrides(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("warmup:\n  steps: 7\n  batch_size: 3\n")
    config = load_config(["steps=9", "max_length=64"], overlay)
    assert (config.warmup.steps, config.warmup.batch_size, config.encoding.max_length) == (9, 3, 64)


@pytest.mark.parametrize("arg, message", [("warmup.stepz=3", "stepz"), ("autocast=bf15", "autocast must be one of"),
                                          ("gate.mode=gated", "gate.mode must be one of"), ("steps", "key=value")])
def test_bad_settings_fail_when_the_config_loads(arg, message):
    with pytest.raises(ValueError, match=message):
        load_config([arg])


def test_autocast_auto_is_bf16_on_cuda_only():
    assert autocast_dtype("auto", "cuda") is torch.bfloat16 and autocast_dtype("auto", "cuda:1") is torch.bfloat16
    assert autocast_dtype("auto", "cpu") is None and autocast_dtype("none", "cuda") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16


def test_shipped_recipes_load_from_inside_the_package():
    import qgate
    from qgate.config import config_path

    package = Path(qgate.__file__).parent
    assert config_path("demo.yaml").parent == package / "configs" and config_path("demo.yaml").is_file()
    demo = load_config([], config_path("demo.yaml"))
    assert demo.encoding.max_length == 192 and demo.out == "runs/demo"  # the demo's value over the default 512
    assert load_config(["recipe=demo"]).encoding.max_length == 192


def test_the_seeds_recipe_is_one_key_and_the_defaults_are_the_measured_recipe():
    seeds = load_config(["recipe=seeds", "selection.alpha=0.5"])
    assert (seeds.gate.mode, seeds.gate.contrast, seeds.loss.quality_loss_weight, seeds.loss.negatives_weight) == \
        ("modulate", False, 1.0, 0.0)
    assert seeds.selection.alpha == 0.5  # the command line still wins
    default = load_config([])
    assert (default.gate.mode, default.loss.negatives_weight, default.selection.alpha) == ("probe", 1.0, 0.0)
    with pytest.raises(ValueError, match="no recipe 'nope'; shipped: demo, seeds"):
        load_config(["recipe=nope"])


def test_a_value_of_the_wrong_type_is_refused_with_its_key():
    with pytest.raises(ValueError, match="abc"):
        load_config(["warmup.steps=abc"])
    with pytest.raises(ValueError, match="mode"):
        load_config(["gate.mod=probe"])
    assert load_config(["serve.num_cpus=0.5"]).serve.num_cpus == 0.5


def test_the_library_built_without_arguments_gets_the_pipeline_defaults():
    from qgate.corruption import DEFAULT_WARMUP_KINDS
    from qgate.gate import attach_gates
    from qgate.stats import Scorer
    from qgate.tiny import tiny_model, tiny_tokenizer
    from qgate.training import WarmupLossConfig

    config = load_config([])
    gates = attach_gates(tiny_model("tiny-qwen3"))
    assert (gates.mode, gates.contrast, gates.evidence, gates.summary, gates.gain) == ("probe", True, True, True, True)
    assert WarmupLossConfig() == WarmupLossConfig(**config.loss)
    scorer = Scorer(gates.model, tiny_tokenizer(), gates)
    assert (scorer.alphas, scorer.eps, scorer.ifd) == (list(config.collect.alphas), config.collect.eps, True)
    assert list(DEFAULT_WARMUP_KINDS) == list(config.warmup.negative_kinds)


def test_qgate_config_prints_each_key_with_its_help(capsys):
    from ray_jobs.cli import main

    assert main(["config", "gate", "gate.mode=modulate"]) == 0
    shown = capsys.readouterr().out
    assert "  mode: modulate  # probe: the gate only reads" in shown and "model: smollm2-135m-instruct" in shown
    assert "selection:" not in shown
    assert main(["select", "--help"]) == 0
    assert "  percentage: 0.3  # share of the rows kept" in capsys.readouterr().out
    assert main(["config", "nothing"]) == 2


def test_the_recorded_config_layers_between_defaults_and_the_command_line(tmp_path):
    recorded = tmp_path / "config.yaml"
    save_config(load_config(["max_length=256", "steps=4", "selection.percentage=0.5"]), recorded)
    recorded.write_text(recorded.read_text() + "a_key_qgate_no_longer_has: 1\n")
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("warmup:\n  steps: 7\n")
    config = load_config(["selection.percentage=0.2"], overlay, recorded)
    assert (config.encoding.max_length, config.warmup.steps, config.selection.percentage) == (256, 7, 0.2)


ALL = {"warmup", "gates", "stats", "selfcheck", "selection"}


@pytest.mark.parametrize("key, old, new, existing, stages, refused", [
    ("encoding.max_length", 256, 512, ALL, ["collect"], "gates/, selection/, selfcheck/, stats/, warmup/"),
    ("warmup.steps", 2, 3, {"warmup", "gates"}, ["warmup"], None),  # warmup continues and writes the gates anew
    ("warmup.steps", 2, 3, {"warmup", "gates", "stats"}, ["warmup"], "stats/"),
    ("warmup.lr", 0.01, 0.02, {"warmup"}, ["warmup"], "warmup/"),  # its checkpoints were made with the old lr
    ("collect.alphas", [0.0], [1.0], {"warmup", "gates"}, ["collect"], None),
    ("collect.alphas", [0.0], [1.0], {"warmup", "gates", "stats"}, ["collect"], "stats/"),
    ("selection.percentage", 0.3, 0.2, ALL, ["select"], None),
    ("selection.percentage", 0.3, 0.2, ALL, ["collect"], "selection/"),
    ("selfcheck.rows", 300, 64, ALL, ["selfcheck", "select"], None),
    ("gates", None, "/elsewhere", {"warmup", "gates", "stats"}, ["collect"], "stats/"),
    ("data", "/mnt/a", "/mnt/b", ALL, ["collect"], None),  # moved data resumes by file content
    ("serve.port", 8000, 9000, ALL, [], None),
    ("collect.actors", 2, 8, ALL, ["collect"], None),
])
def test_a_changed_setting_is_refused_where_it_shapes_outputs_already_there(key, old, new, existing, stages,
                                                                              refused):
    recorded, changed = as_dict(load_config([f"{key}={old}"])), as_dict(load_config([f"{key}={new}"]))
    lines = changes_refused(recorded, changed, existing, stages)
    if refused is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(f"{key} changed") and f"but {refused} " in lines[0]


def test_a_stage_starts_from_the_runs_config_and_records_what_it_may(tmp_path):
    from ray_jobs.common import config_from_argv, record_config

    out = tmp_path / "run"
    record_config(load_config([f"out={out}", "max_length=256", "autocast=bf16"]), ["warmup"])
    (out / "stats").mkdir()
    (out / "stats" / "_schema.json").write_text("{}")
    config = config_from_argv([f"out={out}", "selection.percentage=0.2"])
    record_config(config, ["select"])
    again = load_config(recorded=out / "config.yaml")
    assert (again.encoding.max_length, again.autocast, again.selection.percentage) == (256, "bf16", 0.2)
    with pytest.raises(ValueError, match=r"encoding\.max_length changed from 256 to 512, but stats/ was made"):
        record_config(config_from_argv([f"out={out}", "max_length=512"]), ["collect"])
    assert load_config(recorded=out / "config.yaml").encoding.max_length == 256


def test_the_run_directory_names_every_folder_and_the_files_other_stages_read(tmp_path):
    from qgate.run_dir import RunDir

    run = RunDir(tmp_path / "r")
    assert run["stats"] == run.stats == (tmp_path / "r" / "stats").resolve()
    assert run.scores.parent == run.selection and run.selfcheck_result.parent == run.selfcheck
    assert {run[name].name for name in RunDir.FOLDERS} >= {"config.yaml", "gates", "warmup", "stats", "selection"}
    with pytest.raises(KeyError):
        run["nothing"]


def test_a_recorded_run_keeps_what_was_set_over_its_recipe(tmp_path):
    recorded = tmp_path / "config.yaml"
    save_config(load_config(["recipe=seeds", "gate.init_bias=2.0"]), recorded)
    later = load_config(["selection.percentage=0.2"], recorded=recorded)
    assert (later.recipe, later.gate.mode, later.gate.init_bias) == ("seeds", "modulate", 2.0)

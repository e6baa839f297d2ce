import pytest
import torch

from qgate.config import load_config
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

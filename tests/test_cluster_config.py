"""cluster.yaml passes Ray's own config checks and is closed by default: the dashboard (and its job-submission API)
on the head's loopback only, no placeholder resource ids, and `ray up` stops loudly while the user's settings are
unfilled or the shared filesystem is not mounted. The setup commands run in real bash, in a scratch HOME.

    .venv/bin/python -m pytest -q tests/test_cluster_config.py
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).parents[1] / "cluster.yaml"
FILLED = {"FILL_IN_efs_file_system_id": "fs-0abc", "FILL_IN_git_url_of_your_qgate_repository": "https://x/q.git"}

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def all_commands(cluster: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [command for key in keys for command in cluster.get(key) or []]


def test_cluster_yaml_passes_rays_config_checks(cluster):
    from ray.autoscaler._private.util import validate_config

    validate_config(cluster)
    assert cluster["provider"]["type"] == "aws" and cluster["head_node_type"] in cluster["available_node_types"]
    assert cluster["available_node_types"]["gpu_worker"]["min_workers"] == 0


def test_the_dashboard_listens_on_the_heads_loopback_only(cluster):
    (head_start,) = [c for c in cluster["head_start_ray_commands"] if c.startswith("ray start --head")]
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", head_start)
    assert not any("0.0.0.0" in command for command in all_commands(cluster))
    assert "ray dashboard cluster.yaml" in CLUSTER_YAML.read_text()  # the tunnel for job submission


def test_no_command_hides_a_failure(cluster):
    for command in all_commands(cluster):
        assert not re.search(r"\|\|\s*(true|:)\s*$", command), command


def test_no_placeholder_resource_ids_remain(cluster):
    text = CLUSTER_YAML.read_text()
    assert "fs-0123456789abcdef0:/" not in text and "github.com/qgate-ai" not in text
    assert "FILL_IN" in text


def bash(command: str, home: Path, path_dirs: list[Path] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "PATH": os.pathsep.join([*map(str, path_dirs), os.environ["PATH"]])}
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30, check=False)


def settings_commands(cluster: dict) -> list[str]:
    """The commands that write and check the user's settings (before any mount or install)."""
    return [c for c in cluster["setup_commands"] if "qgate.env" in c and "mount" not in c and "pip" not in c]


def test_ray_up_stops_while_the_settings_are_unfilled(cluster, tmp_path):
    write, check = settings_commands(cluster)
    assert bash(write, tmp_path).returncode == 0
    unfilled = bash(check, tmp_path)
    assert unfilled.returncode != 0 and "fill in" in unfilled.stderr
    filled = write
    for placeholder, value in FILLED.items():
        filled = filled.replace(placeholder, value)
    assert bash(filled, tmp_path).returncode == 0
    assert bash(check, tmp_path).returncode == 0
    assert bash('. ~/qgate.env && echo "$QGATE_EFS_ID $QGATE_GIT_URL"', tmp_path).stdout.split() == list(
        FILLED.values())


def _stub(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


def test_a_shared_filesystem_that_does_not_mount_stops_ray_up(cluster, tmp_path):
    """`mount` fails and /shared is no mount point: the command must fail (stand-ins for sudo/mount/mountpoint)."""
    (mount,) = [c for c in cluster["setup_commands"] if "mount -t efs" in c]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "sudo", '[ "$1" = mkdir ] && exit 0; exec "$@"')
    _stub(bin_dir, "mountpoint", "exit 1")
    _stub(bin_dir, "mount", 'echo "mount: $*" >&2; exit 32')
    (tmp_path / "qgate.env").write_text(" ".join(f"{k}={v}" for k, v in zip(
        ("QGATE_EFS_ID", "QGATE_GIT_URL"), FILLED.values())) + "\n")
    failed = bash(mount, tmp_path, [bin_dir])
    assert failed.returncode != 0 and "fs-0abc:/" in failed.stderr
    _stub(bin_dir, "mount", "exit 0")  # mount "succeeds" but nothing is mounted: still a failure
    assert bash(mount, tmp_path, [bin_dir]).returncode != 0
    _stub(bin_dir, "mountpoint", "exit 0")
    assert bash(mount, tmp_path, [bin_dir]).returncode == 0

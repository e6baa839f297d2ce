"""A real `ray start --head` on loopback for the tests that submit jobs to it (`ray job submit`)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def ray_cli(*args, env, timeout=120):
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


# Fixed ports of their own: the local Ray of the other tests in this module holds the defaults (52365, …), and a
# head whose dashboard agent cannot bind takes no jobs.
AGENT_PORTS = ["--dashboard-agent-listen-port=52395", "--dashboard-agent-grpc-port=52396",
               "--runtime-env-agent-port=52397", "--metrics-export-port=52398", "--ray-client-server-port=6391"]


@pytest.fixture
def ray_head(tmp_path):
    """A real `ray start --head --block` on loopback, auth disabled on cluster and client alike. Stopped through
    its process group: `ray stop` would stop every Ray on the machine, this test process's own included."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "RAY_ADDRESS": ""}
    port, dashboard = "6390", "8275"
    temp_dir = tempfile.mkdtemp(prefix="qg", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log = (tmp_path / "ray_head.log").open("w")
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
         "--num-cpus=2", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", *AGENT_PORTS], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_until_serving(f"{address}/api/version", head, tmp_path / "ray_head.log")
        yield env, address
    finally:
        stop_process_group(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_until_serving(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"ray start exited: {log_path.read_text()[-2000:]}"
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"{url} not up after {timeout_s} s: {log_path.read_text()[-2000:]}")


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM (Ray's --block shuts its processes down), then SIGKILL whatever of the group is left."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)  # workers the raylet left behind
    except ProcessLookupError:
        pass


def submit(address: str, env: dict, args: list[str], timeout: float = 840) -> subprocess.CompletedProcess:
    """`ray job submit` of `python -m ray_jobs.pipeline ARGS` with the source tree as working dir."""
    for _ in range(12):  # the head's job agent registers a few seconds after its dashboard answers
        job = ray_cli("job", "submit", f"--address={address}", f"--working-dir={ROOT}", "--",
                      "python", "-m", "ray_jobs.pipeline", *args, env=env, timeout=timeout)
        if "No available agent" not in job.stderr:
            return job
        time.sleep(5.0)
    return job

"""Scale out on one machine, with real Ray processes: multi-node warmup and collect, the autoscaler, a lost node.

A "node" here is a set of local Ray processes with its own raylet and resources (`ray.cluster_utils.Cluster`, or
the fake_multinode autoscaler of `tests/fake_multinode.yaml`). Heads have no CPUs, like cluster.yaml's, so every
train worker, scoring actor and read task runs on a worker node of 1 CPU: where it ran is read back from Ray's
state API (`ray.util.state.list_actors`), never from the jobs.

    .venv/bin/python -m pytest -q tests/test_scale_out.py
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.torch import load_file

from qgate.data import iter_file_rows, list_input_files

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks
from test_collect import _less_line, collect_config, make_gates, read_rejects, read_stats
from test_warmup import config as warmup_config
from test_warmup import less_rows, max_diff

from ray_jobs import collect, warmup

FAKE_CLUSTER_YAML = Path(__file__).with_name("fake_multinode.yaml")
# Ray Train's worker actors; Ray Data names a pool's actor class after its operator: MapWorker(...ScoreBatch)
TRAIN_WORKER, SCORING_ACTOR = "RayTrainWorker", "ScoreBatch"
ENV = {"RAY_AUTH_MODE": "disabled",  # driver and cluster alike: no token to hand around
       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "TOKENIZERS_PARALLELISM": "false"}


# ---- helpers -------------------------------------------------------------------------------------------


def short_temp_dir() -> str:
    """Ray's AF_UNIX sockets live under the temp dir and need paths < 107 bytes: pytest's tmp paths are too long.
    Ray still writes the head's address into its default temp dir, which a fresh machine does not have yet."""
    from ray._common.utils import get_default_ray_temp_dir

    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    return tempfile.mkdtemp(prefix="qgs-", dir="/tmp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def connected(address: str):
    """This process as the driver of the cluster at `address`; Ray Data settings restored afterwards."""
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.wait_for_min_actors_s
    ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    context.enable_progress_bars = False
    context.wait_for_min_actors_s = 120  # a pool starts all its actors before data flows (else one actor may take
    # every block while the other still loads the model, and be stopped unused)
    try:
        yield
    finally:
        ray.shutdown()
        context.enable_progress_bars, context.wait_for_min_actors_s = saved


def kill_strays(temp_dir: str) -> None:
    """SIGKILL what is left of our cluster: processes whose command line names our own unique temp dir."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if pid != os.getpid() and temp_dir.encode() in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def actor_nodes(class_part: str, state: str | None = None) -> dict[str, str]:
    """`{actor_id: node_id}` of the actors whose class name holds `class_part` (dead ones may have lost theirs)."""
    address = ray.get_runtime_context().gcs_address  # not "auto": other Ray clusters may run on this machine
    actors = list_actors(address=address, filters=[("state", "=", state)] if state else [], limit=10_000,
                         raise_on_missing_output=False)
    return {a.actor_id: a.node_id for a in actors if class_part in a.class_name and a.node_id}


@contextlib.contextmanager
def watch_actors(class_part: str, every_s: float = 0.5):
    """`{actor_id: node_id}` of the actors of a class that come up while the block runs (polled, alive ones)."""
    before, seen, stop = set(actor_nodes(class_part)), {}, threading.Event()

    def poll():
        while not stop.wait(every_s):
            seen.update(actor_nodes(class_part, state="ALIVE"))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        yield seen
    finally:
        stop.set()
        poller.join(timeout=30)
        seen.update(actor_nodes(class_part))
        for actor_id in before:
            seen.pop(actor_id, None)


def worker_nodes() -> list[dict]:
    """Alive nodes with CPUs: every node but the 0-CPU head."""
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


def write_corpus(root: Path, files: int, rows: int) -> Path:
    """`files` JSONL files of `rows` LESS rows (ids unique across files) plus one row each that is rejected."""
    data = root / "data"
    data.mkdir(parents=True)
    for f in range(files):
        lines = [_less_line(f * rows + i, f"part{f}") for i in range(rows)] + ["{not json"]
        (data / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    return data


def input_keys(data: Path) -> Counter:
    return Counter((row["source"], row["row"]) for path in list_input_files(str(data)) for row in iter_file_rows(path))


def output_keys(out: Path) -> Counter:
    stats = read_stats(out / "stats")
    keys = Counter(zip(stats.column("source").to_pylist(), stats.column("row").to_pylist()))
    return keys + Counter((r["source"], r["row"]) for r in read_rejects(out))


def assert_every_row_once(data: Path, out: Path, n_scored: int) -> None:
    assert output_keys(out) == input_keys(data)  # every input row scored or rejected, none twice
    ids = read_stats(out / "stats").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == n_scored


def scale_config(data: Path, gates: Path, out: Path, *overrides: str):
    """collect on 1-CPU nodes: 2 scoring actors of 1 CPU each, one pass (no IFD), one α."""
    return collect_config(data, gates, out, "collect.actors=2", "collect.cpus_per_actor=1", "collect.ifd=false",
                          "collect.alphas=[1.0]", *overrides)


# ---- a static cluster: head (0 CPUs) + three 1-CPU worker nodes ---------------------------------------


@pytest.fixture(scope="class")
def cluster():
    """`ray.cluster_utils.Cluster`: a 0-CPU head (with the dashboard, for the state API) and 3 nodes of 1 CPU."""
    temp_dir = short_temp_dir()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ENV.items():
            mp.setenv(key, value)
        c = Cluster()
        try:
            c.add_node(num_cpus=0, temp_dir=temp_dir, include_dashboard=True, dashboard_port=free_port(),
                       object_store_memory=200 * 2**20)
            for _ in range(3):
                c.add_node(num_cpus=1, object_store_memory=200 * 2**20)
            with connected(c.address):
                yield c
        finally:
            c.shutdown()
            kill_strays(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="class")
def warmup_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale_data") / "toy.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in less_rows()) + "\n")
    return path


class TestStaticCluster:
    @pytest.mark.timeout(240)
    def test_warmup_one_train_worker_per_node_matches_one_worker(self, cluster, warmup_corpus, tmp_path):
        """Two train workers on two nodes (batch 2 each) give the gates of one worker with batch 4."""
        start = time.time()
        one = warmup.run(warmup_config(warmup_corpus, tmp_path / "one", **{"warmup.workers": 1}))
        with watch_actors(TRAIN_WORKER) as nodes:
            two = warmup.run(warmup_config(warmup_corpus, tmp_path / "two",
                                           **{"warmup.workers": 2, "warmup.batch_size": 2}))
        gates_one, gates_two = (load_file(str(d / "gates.safetensors")) for d in (one, two))
        checksums = json.loads((two / "gates.json").read_text())["final_metrics"]["gate_checksums"]
        print(f"\nwarmup: 2 train workers on nodes {sorted(n[:8] for n in nodes.values())}, "
              f"max |Δgate| {max_diff(gates_one, gates_two):.2e}, both runs {time.time() - start:.1f} s")
        assert len(nodes) == 2 and len(set(nodes.values())) == 2
        assert cluster.head_node.node_id not in nodes.values()
        assert len(checksums) == 2 and checksums[0] == checksums[1]
        assert max_diff(gates_one, gates_two) < 1e-5

    @pytest.mark.timeout(180)
    def test_collect_spreads_actors_over_nodes(self, cluster, tmp_path):
        start = time.time()
        data, gates = write_corpus(tmp_path, files=2, rows=20), make_gates(tmp_path)
        with watch_actors(SCORING_ACTOR) as nodes:
            collect.run(scale_config(data, gates, tmp_path / "out"))
        print(f"\ncollect: {len(nodes)} scoring actors on nodes {sorted(n[:8] for n in nodes.values())}, "
              f"{time.time() - start:.1f} s")
        assert len(nodes) == 2 and len(set(nodes.values())) == 2
        assert cluster.head_node.node_id not in nodes.values()
        assert_every_row_once(data, tmp_path / "out", n_scored=40)

    @pytest.mark.timeout(240)
    def test_a_node_lost_during_collect_loses_no_row(self, cluster, tmp_path):
        """Kill (not drain) the node of one scoring actor mid-run; Ray Data restarts the actor elsewhere and
        retries its batches (actor pools default to max_restarts=-1, max_task_retries=-1). Should the job fail
        instead, the re-run into the same `out` completes it; the test says which happened."""
        cluster.add_node(num_cpus=1, object_store_memory=200 * 2**20)  # room for the restarted actor
        data, gates = write_corpus(tmp_path, files=12, rows=50), make_gates(tmp_path)
        out, start = tmp_path / "out", time.time()
        config = scale_config(data, gates, out, "collect.batch_rows=4", "collect.shard_rows=8")
        outcome = {}

        def run():
            try:
                collect.run(config)
                outcome["ok"] = True
            except Exception as err:  # noqa: BLE001 - whatever failed the job, the re-run must complete it
                outcome["error"] = err

        job = threading.Thread(target=run, daemon=True)
        job.start()
        victim = _wait_for_scoring_node(cluster, out, job)
        rows_before = rows_written(out)
        cluster.remove_node(victim, allow_graceful=False)
        killed_at = time.time() - start
        job.join(timeout=120)
        assert not job.is_alive(), "collect did not finish after the node was lost"
        if "error" in outcome:
            print(f"\ncollect failed after the node loss ({outcome['error']!r:.200}); re-running")
            collect.run(config)
        summary = json.loads((out / "stats" / "_collect_summary.json").read_text())
        print(f"\nnode lost: killed {victim.node_id[:8]} at {killed_at:.1f} s with {rows_before} rows written, "
              f"{retried_tasks(SCORING_ACTOR)} scoring task attempts retried; "
              f"{'recovered in the same run' if outcome.get('ok') else 'completed by the re-run'}; "
              f"attempts {[a['attempt'] for a in summary['attempts']]}, {time.time() - start:.1f} s")
        assert rows_before < 600  # the node went while there was scoring left to do
        assert_every_row_once(data, out, n_scored=600)
        assert outcome.get("ok"), f"Ray Data did not recover from the lost node: {outcome.get('error')!r}"


def retried_tasks(name_part: str) -> int:
    """Task attempts after the first, of tasks whose name holds `name_part` (Ray's task events)."""
    address = ray.get_runtime_context().gcs_address
    tasks = list_tasks(address=address, filters=[("attempt_number", "!=", "0")], limit=10_000,
                       raise_on_missing_output=False)
    return sum(1 for t in tasks if name_part in t.name)


def rows_written(out: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in (out / "stats").glob("attempt-*/*.parquet"))


def _wait_for_scoring_node(cluster, out: Path, job: threading.Thread, timeout: float = 90):
    """The worker node of a live scoring actor, once the first stats shard is written."""
    deadline = time.time() + timeout
    while time.time() < deadline and job.is_alive():
        alive = actor_nodes(SCORING_ACTOR, state="ALIVE")
        if alive and any((out / "stats").glob("attempt-*/*.parquet")):
            by_id = {node.node_id: node for node in cluster.worker_nodes}
            return next(by_id[n] for n in alive.values() if n in by_id)
        time.sleep(0.2)
    raise AssertionError("no scoring actor and first shard before the deadline (or collect already ended)")


# ---- the autoscaler: fake_multinode ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_fake_multinode_yaml_passes_rays_config_checks():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(FAKE_CLUSTER_YAML.read_text())
    validate_config(config)
    assert config["provider"]["type"] == "fake_multinode"
    for key in ("file_mounts", "cluster_synced_files", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands", "initialization_commands", "rsync_exclude", "auth", "docker"):
        assert key in config, key  # the launcher reads these without defaults


@pytest.fixture
def autoscaling_cluster():
    """A 0-CPU head running the autoscaler with the fake_multinode provider of tests/fake_multinode.yaml.

    The provider starts a node's processes itself and points them at `provider.gcs_address` (6379 if unset):
    we fill in this head's GCS address, on a free port, so the test does not need 6379.
    """
    temp_dir, port = short_temp_dir(), free_port()
    config = yaml.safe_load(FAKE_CLUSTER_YAML.read_text())
    config["provider"]["gcs_address"] = f"{ray.util.get_node_ip_address()}:{port}"
    config_path = Path(temp_dir) / "autoscaler.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**ENV, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}.items():
            mp.setenv(key, value)  # inherited by the head's autoscaler (monitor) process
        c = Cluster()
        try:
            c.add_node(num_cpus=0, temp_dir=temp_dir, gcs_server_port=port, autoscaling_config=str(config_path),
                       include_dashboard=True, dashboard_port=free_port(), object_store_memory=200 * 2**20)
            with connected(c.address):
                yield c
        finally:
            c.shutdown()
            kill_strays(temp_dir)  # nodes the autoscaler had not removed yet
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(240)
def test_autoscaler_adds_nodes_for_collect_and_removes_them_when_idle(autoscaling_cluster, tmp_path):
    start = time.time()
    assert worker_nodes() == []
    data, gates = write_corpus(tmp_path, files=2, rows=20), make_gates(tmp_path)
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], len(worker_nodes()))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with watch_actors(SCORING_ACTOR) as nodes:
            collect.run(scale_config(data, gates, tmp_path / "out"))
    finally:
        done.set()
        watcher.join(timeout=5)
    scored_at = time.time() - start
    assert_every_row_once(data, tmp_path / "out", n_scored=40)
    assert len(set(nodes.values())) == 2 and all(n.startswith("fffff") for n in nodes.values())  # fake nodes
    assert peak[0] >= 2
    deadline = time.time() + 90
    while worker_nodes() and time.time() < deadline:
        time.sleep(1)
    print(f"\nautoscaler: up to {peak[0]} worker nodes, actors on {sorted(n[-5:] for n in nodes.values())}; "
          f"collect done at {scored_at:.1f} s, idle nodes gone at {time.time() - start:.1f} s")
    assert worker_nodes() == [], "idle worker nodes were not removed"

"""The HTTP scoring app over real HTTP on loopback: the batch path's q, every error status, dynamic batching;
a run that selected by the q + IFD blend ranks new samples by the blend.

One module-scoped local Ray and Serve on a free port hold two apps on a tiny model: `/` (open) and `/guarded`
(bearer token from the environment, one request at a time, a queue of one: back-pressure is easy to reach).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import corpus_rows, corpus_text
from ray import serve

from qgate.config import load_config
from ray_jobs import select
from ray_jobs.common import run_paths
from serve.app import app_from_config, build_app, deployment_options
from serve.scoring import CorpusScorer, is_selected, rank_in_corpus, run_config, scorer_settings

pytestmark = pytest.mark.timeout(600)  # the first test also pays for collect, select and Serve (2 busy cores)

TOKEN = "test-token-1234"
TIMEOUT = httpx.Timeout(60.0, connect=10.0)


# ---- the batch path ------------------------------------------------------------------------------


def batch_q(config) -> dict[str, float]:
    """q per id from the run's selection."""
    table = pq.read_table(run_paths(config.out)["selection"] / "scores.parquet", columns=["id", "q"])
    return dict(zip(table.column("id").to_pylist(), table.column("q").to_pylist()))


@pytest.fixture(scope="module")
def run(shared_finished_run, ray_local):
    """A run directory with tiny gates, its corpus stats (with IFD) and batch q: (config, {id: q})."""
    return shared_finished_run, batch_q(shared_finished_run)


def test_a_blend_run_ranks_new_samples_by_the_blend(run, tmp_path):
    """Selected by q_ifd: the scorer's IFD, blend, percentile and selected agree with the batch path. (Before
    Serve starts: its replicas would hold the CPUs that select runs on.)"""
    config, _ = run
    out = select.run(load_config([f"out={tmp_path}", "use_gpu=false", f"selection.runs=[{config.out}]",
                                  "selection.direction=higher", "selection.score=q_ifd"]))
    batch = {row["id"]: row for row in pq.read_table(out / "scores.parquet").to_pylist()}
    threshold = json.loads((out / "selection_stats.json").read_text())["threshold"]
    scorer = CorpusScorer(**{**scorer_settings(config), "run_dir": str(tmp_path)})
    assert (scorer.score_name, scorer.score_direction, scorer.scorer.ifd) == ("q_ifd", "higher", True)
    corpus = np.sort([row["score"] for row in batch.values()])  # [N]
    n, compared = len(corpus), 0
    for r in scorer.score(corpus_rows()):
        want = batch[r["id"]]
        assert r["q"] == pytest.approx(want["q"], abs=1e-4) and r["ifd"] == pytest.approx(want["ifd"], abs=1e-4)
        assert abs(r["score"] - want["score"]) <= 1 / n + 1e-9  # a hair below its own reference value: 1/N lower
        assert r["percentile"] == pytest.approx(100.0 * np.searchsorted(corpus, r["score"]) / n)
        assert r["selected"] == (r["score"] >= threshold)
        if abs(want["score"] - threshold) > 1 / n:
            assert r["selected"] == want["selected"]
            compared += 1
    assert compared >= n // 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(run):
    """Serve on a free loopback port with the open app at `/` and the guarded one at `/guarded`."""
    config, _ = run
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    main = run_config(config.out, ["serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.2"])
    tight = run_config(config.out, ["serve.max_batch_size=1", "serve.max_ongoing_requests=1",
                                    "serve.max_queued_requests=1"])
    os.environ["QGATE_API_TOKEN"] = TOKEN
    try:
        guarded = app_from_config(tight)  # the token is read from the environment here
    finally:
        del os.environ["QGATE_API_TOKEN"]
    serve.run_many([serve.RunTarget(app_from_config(main, api_token=""), name="open", route_prefix="/"),
                    serve.RunTarget(guarded, name="guarded", route_prefix="/guarded")])
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture()
def client(url):
    with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        yield c


async def _post_all(url: str, bodies: list, headers: dict | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, headers=headers) as c:
        return await asyncio.gather(*(c.post("/v1/score", json=body) for body in bodies))


def post_concurrently(url: str, bodies: list, headers: dict | None = None) -> list[httpx.Response]:
    return asyncio.run(_post_all(url, bodies, headers))


# ---- scores --------------------------------------------------------------------------------------


def test_endpoint_q_equals_batch_q(run, url):
    _, expected = run
    rows = corpus_rows()
    responses = post_concurrently(url, [{"samples": rows[i:i + 6]} for i in range(0, len(rows), 6)])
    results = [r for resp in responses for r in resp.raise_for_status().json()["results"]]
    assert [r["id"] for r in results] == [row["id"] for row in rows]  # split back in order
    got = np.array([r["q"] for r in results])
    want = np.array([expected[row["id"]] for row in rows])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert got.std() > 1e-3  # the corpus spreads: the comparison means something


def test_percentile_selected_and_fields(run, client):
    _, expected = run
    corpus = np.sort(np.array(list(expected.values())))
    stats = json.loads((run_paths(run[0].out)["selection"] / "selection_stats.json").read_text())
    body = client.post("/v1/score", json={"samples": corpus_rows()[:8]}).raise_for_status().json()
    assert body["direction"] == stats["direction"] == "higher" and body["score"] == stats["score"] == "q"
    assert body["threshold"] == pytest.approx(stats["threshold"])
    for r in body["results"]:
        q = expected[r["id"]]
        assert r["score"] == r["q"] and r["ifd"] is None  # a run selected by q: no IFD pass
        assert r["percentile"] == pytest.approx(100.0 * np.searchsorted(corpus, r["q"]) / len(corpus))
        assert 0.0 <= r["percentile"] < 100.0
        if abs(q - stats["threshold"]) > 1e-4:
            assert r["selected"] == (q >= stats["threshold"])
        assert len(r["S"]) == 2 and r["ppl"] > 1 and r["n_tokens"] <= 48 and r["error"] is None
    assert any(r["truncated"] for r in body["results"])


def test_lower_direction_ranks_small_q_first():
    corpus = np.array([0.1, 0.2, 0.3, 0.4])  # ascending
    q = np.array([0.05, 0.25, 0.4, 0.5])
    np.testing.assert_allclose(rank_in_corpus(corpus, q, "higher"), [0, 50, 75, 100])
    np.testing.assert_allclose(rank_in_corpus(corpus, q, "lower"), [100, 50, 0, 0])
    assert is_selected(q, 0.3, "lower").tolist() == [True, True, False, False]
    assert is_selected(q, 0.3, "higher").tolist() == [False, False, True, True]
    assert rank_in_corpus(None, q, "higher") is None


def test_bad_sample_gets_its_own_error(client):
    good = corpus_rows()[0]
    samples = [good, {"id": "bad", "messages": []}, {"id": "odd", "text": "no known form"}]
    results = client.post("/v1/score", json={"samples": samples}).raise_for_status().json()["results"]
    assert results[0]["q"] is not None and results[0]["error"] is None
    assert results[1]["error"]["reason"] == "empty_messages" and results[1]["q"] is None
    assert results[2]["error"]["reason"] == "unknown_format"


def test_info_health_and_docs(run, client):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/info").raise_for_status().json()
    assert info["model"] == "tiny-qwen3" and info["gates"]["mode"] == "probe"  # the default gates
    assert info["corpus"]["N"] == 24 and info["corpus"]["direction"] == "higher"
    assert info["batching"]["max_batch_size"] == 8 and info["served"]["batches"] >= 0
    assert info["selfcheck"] is None
    assert client.get("/docs").status_code == 200
    assert "/v1/score" in client.get("/openapi.json").json()["paths"]


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b"{not json", b'{"samples": []}', b'{"samples": "text"}', b'{"samples": [1, 2]}', b'{"rows": [{}]}', b"[]",
])
def test_malformed_body_is_422(client, body):
    resp = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 422
    assert resp.json()["detail"]


def test_too_many_samples_is_413(client):
    resp = client.post("/v1/score", json={"samples": [{"prompt": "a", "completion": "b"}] * 65})
    assert resp.status_code == 413 and "65 samples" in resp.json()["detail"]


def test_too_many_characters_is_413(client):
    resp = client.post("/v1/score", json={"samples": [{"prompt": "a", "completion": "b" * 100_000}]})
    assert resp.status_code == 413 and "characters" in resp.json()["detail"]
    huge = client.post("/v1/score", json={"samples": [{"prompt": "a", "completion": "b" * 1_000_000}]})
    assert huge.status_code == 413 and "bytes" in huge.json()["detail"]


def test_token_is_required_when_set(client):
    sample = {"samples": [corpus_rows()[0]]}
    assert client.post("/guarded/v1/score", json=sample).status_code == 401
    wrong = client.post("/guarded/v1/score", json=sample, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert client.get("/guarded/v1/info").status_code == 401
    assert client.get("/guarded/healthz").status_code == 200
    right = client.post("/guarded/v1/score", json=sample, headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200 and right.json()["batch_size"] == 1


def test_full_queue_answers_503(url):
    heavy = {"samples": [{"prompt": corpus_text(i, 20), "completion": corpus_text(i + 1, 200)} for i in range(32)]}
    statuses: list[int] = []
    for _ in range(5):  # bursts until the queue overflows; a handful is plenty
        responses = post_concurrently(f"{url}/guarded", [heavy] * 12, {"Authorization": f"Bearer {TOKEN}"})
        statuses += [r.status_code for r in responses]
        if 503 in statuses:
            break
    assert set(statuses) <= {200, 503}
    assert 503 in statuses and 200 in statuses
    with httpx.Client(timeout=TIMEOUT) as c:
        assert c.get(f"{url}/guarded/healthz").status_code == 200  # the replica lives on


# ---- batching ------------------------------------------------------------------------------------


def test_concurrent_requests_share_a_batch(client, url):
    before = client.get("/v1/info").json()["served"]
    rows = corpus_rows()
    responses = post_concurrently(url, [{"samples": [rows[i]]} for i in range(8)])
    sizes = [r.raise_for_status().json()["batch_size"] for r in responses]
    assert max(sizes) > 1 and max(sizes) <= 8
    after = client.get("/v1/info").json()["served"]
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8


# ---- autoscaling ---------------------------------------------------------------------------------

AUTOSCALED = ["serve.min_replicas=1", "serve.max_replicas=2", "serve.max_batch_size=1", "serve.max_ongoing_requests=2",
              "serve.target_ongoing_requests=1", "serve.autoscaling.upscale_delay_s=1",
              "serve.autoscaling.downscale_delay_s=2", "serve.autoscaling.look_back_period_s=2"]


def running_replicas(app: str) -> int:
    deployments = serve.status().applications[app].deployments
    return sum(d.replica_states.get("RUNNING", 0) for d in deployments.values())


def wait_for(condition, timeout_s: float, every_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return condition()


class Load(threading.Thread):
    """`clients` loops posting one sample each, until stopped or `limit_s` passed; every status is kept."""

    def __init__(self, url: str, clients: int, limit_s: float = 180.0):
        super().__init__(daemon=True)
        self.url, self.clients, self.limit_s = url, clients, limit_s
        self.statuses: list[int] = []
        self.done = threading.Event()

    async def client(self, i: int) -> None:
        sample = {"samples": [{"prompt": corpus_text(i, 10), "completion": corpus_text(i + 1, 40)}]}
        deadline = time.monotonic() + self.limit_s
        async with httpx.AsyncClient(base_url=self.url, timeout=TIMEOUT) as c:
            while not self.done.is_set() and time.monotonic() < deadline:
                self.statuses.append((await c.post("/v1/score", json=sample)).status_code)

    def run(self) -> None:
        async def all_clients():
            await asyncio.gather(*(self.client(i) for i in range(self.clients)))

        asyncio.run(all_clients())


def test_sustained_load_adds_a_replica_and_it_goes_after(run, url):
    """min 1, max 2 replicas: four clients keep two requests per replica in flight, a second replica starts; the
    load drops to one client, it goes; no request fails in either change."""
    config, _ = run
    serve.run(app_from_config(run_config(config.out, AUTOSCALED), api_token=""), name="autoscaled",
              route_prefix="/autoscaled")
    try:
        assert running_replicas("autoscaled") == 1
        heavy = Load(f"{url}/autoscaled", clients=4)
        heavy.start()
        grew = wait_for(lambda: running_replicas("autoscaled") == 2, timeout_s=90)
        heavy.done.set()
        heavy.join()
        light = Load(f"{url}/autoscaled", clients=1)
        light.start()
        shrank = grew and wait_for(lambda: running_replicas("autoscaled") == 1, timeout_s=90)
        light.done.set()
        light.join()
        assert grew and shrank
        assert heavy.statuses and light.statuses
        assert set(heavy.statuses) == {200} and set(light.statuses) == {200}
    finally:
        serve.delete("autoscaled")


@pytest.mark.parametrize("override, message", [("serve.autoscaling.upscale_dely_s=2", "has no ['upscale_dely_s']"),
                                               ("serve.autoscaling.upscale_delay_s=-3", "greater than or equal")])
def test_a_bad_autoscaling_option_is_refused_before_serve_starts(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        deployment_options(load_config([override]).serve, gpu=False)


def test_serve_config_file_is_valid():
    from ray.serve.schema import ServeDeploySchema

    spec = yaml.safe_load((Path(__file__).parents[1] / "serve" / "serve_config.yaml").read_text())
    app = ServeDeploySchema.model_validate(spec).applications[0]
    assert app.import_path == "serve.app:build_app" and "run_dir" in app.args
    assert callable(build_app)

"""The scoring endpoint under hostile clients, over real HTTP on loopback: the token and the byte cap hold before
the body is read (200 MB chunked uploads), slow bodies are cut off, every malformed request is a 4xx with a message,
32 clients at once leave no 5xx and the replica's memory where it was; the endpoint is closed by default; Ctrl-C
stops `qgate serve`.

One module-scoped local Ray and Serve on a free loopback port hold one app on a tiny finished run, its token read
by the replica from `serve.token_file`. The replica's memory is read with psutil from the PID in Ray's actor table.

    .venv/bin/python -m pytest -q tests/test_serve_security.py
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import corpus_rows
from ray import serve

from serve.app import app_from_config, start
from serve.guard import TOKEN_ENV, check_exposure, is_loopback, read_token
from serve.scoring import run_config

pytestmark = pytest.mark.timeout(600)  # the first test also pays for collect, select and Serve (2 busy cores)

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY_TIMEOUT_S = 2.0  # serve.body_timeout_s of the app under test
HUGE_BODY = 200 * 2**20  # bytes a client tries to upload
RSS_GROWTH_LIMIT = 50 * 2**20
LOAD_CLIENTS, LOAD_SECONDS = 32, 15.0  # the concurrent-client test: clients, and how long they keep sending
TIMEOUT = httpx.Timeout(60.0, connect=10.0)


# ---- fixtures ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(shared_finished_run, ray_local) -> Path:
    return Path(shared_finished_run.out)


@pytest.fixture(scope="module")
def port(run_dir, tmp_path_factory):
    """Serve on a free loopback port; the replica reads its token from a file (not from this process)."""
    assert not os.environ.get(TOKEN_ENV)
    token_file = tmp_path_factory.mktemp("secret") / "api_token"
    token_file.write_text(TOKEN + "\n")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = run_config(run_dir, [f"serve.token_file={token_file}", f"serve.body_timeout_s={BODY_TIMEOUT_S}"])
    serve.run(app_from_config(config), name="secure", route_prefix="/")
    yield port
    serve.shutdown()


@pytest.fixture()
def client(port):
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as c:
        yield c


def actor_pid(class_prefix: str) -> int:
    """The PID of the one live actor whose class name starts with `class_prefix` (Ray's actor table)."""
    from ray._private import state

    pids = [a["Pid"] for a in state.actors().values()
            if a["ActorClassName"].startswith(class_prefix) and a["State"] == "ALIVE"]
    assert len(pids) == 1, pids
    return pids[0]


def replica_pid() -> int:
    return actor_pid("ServeReplica:secure:")


@contextmanager
def peak_rss(pid: int):
    """Samples `pid`'s RSS every 20 ms while the block runs: yields {"start", "peak"} in bytes."""
    process, seen, done = psutil.Process(pid), {}, threading.Event()
    seen["start"] = seen["peak"] = process.memory_info().rss

    def sample():
        while not done.is_set():
            seen["peak"] = max(seen["peak"], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        done.set()
        sampler.join()


# ---- raw HTTP: bodies that a normal client would not send ----------------------------------------


def read_response(sock: socket.socket, deadline: float) -> tuple[int, dict]:
    """(status, JSON body) of the response on `sock` (the server closes the connection after an error)."""
    sock.setblocking(True)
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        if length is not None and len(body) >= length:
            break
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), data[:200]
    return int(head.split()[1]), json.loads(body) if body else {}


def open_post(port: int, headers: dict[str, str]) -> socket.socket:
    """A connection with `POST /v1/score` and its headers sent, the body still to come."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = ["POST /v1/score HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             *(f"{key}: {value}" for key, value in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def upload_chunked(port: int, headers: dict, total: int, chunk: int = 2**20, limit_s: float = 60.0):
    """Push `total` bytes as a chunked body as fast as the server takes them, stopping once it answers:
    (status, JSON body, body bytes the server took)."""
    sock = open_post(port, {**headers, "Transfer-Encoding": "chunked"})
    sock.setblocking(False)
    piece = f"{chunk:x}\r\n".encode() + b"a" * chunk + b"\r\n"
    deadline, pending, taken, queued = time.monotonic() + limit_s, b"", 0, 0
    with sock:
        while time.monotonic() < deadline:
            if not pending and queued < total:
                pending, queued = piece, queued + chunk
            elif not pending:
                pending = b"0\r\n\r\n"
            readable, writable, _ = select.select([sock], [sock], [], 0.5)
            if readable:
                break
            if writable:
                try:
                    sent = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    break
                taken, pending = taken + sent, pending[sent:]
        status, body = read_response(sock, deadline)
    return status, body, taken


def test_a_200mb_chunked_body_without_a_token_is_401_before_it_is_read(port):
    with peak_rss(replica_pid()) as rss:
        status, body, taken = upload_chunked(port, {}, HUGE_BODY)
    assert status == 401 and "bearer token" in body["detail"]
    assert rss["peak"] - rss["start"] < RSS_GROWTH_LIMIT, rss
    assert taken < HUGE_BODY  # answered before the client was done (Serve's proxy reads ahead of the replica)


def test_a_200mb_chunked_body_with_the_token_is_413_once_past_the_cap(port, client):
    cap = client.get("/v1/info", headers=AUTH).raise_for_status().json()["limits"]["max_body_bytes"]
    with peak_rss(replica_pid()) as rss:
        status, body, taken = upload_chunked(port, AUTH, HUGE_BODY)
    assert status == 413 and f"limit of {cap} bytes" in body["detail"]
    assert rss["peak"] - rss["start"] < RSS_GROWTH_LIMIT, rss
    assert cap < taken < HUGE_BODY


def test_a_declared_200mb_body_is_413_before_any_of_it_is_sent(port):
    sock = open_post(port, {**AUTH, "Content-Length": str(HUGE_BODY)})
    with sock:
        status, body = read_response(sock, time.monotonic() + 30)
    assert status == 413 and f"{HUGE_BODY} bytes" in body["detail"]


def test_a_slow_loris_body_is_cut_off_after_the_body_timeout(port):
    """A client that sends a byte of chunked body every 0.2 s and never ends it."""
    sock = open_post(port, {**AUTH, "Transfer-Encoding": "chunked"})
    started = time.monotonic()
    with sock:
        sock.setblocking(False)
        while time.monotonic() - started < BODY_TIMEOUT_S + 20:
            if select.select([sock], [], [], 0.2)[0]:
                break
            sock.send(b"1\r\n{\r\n")
        status, body = read_response(sock, time.monotonic() + 10)
    elapsed = time.monotonic() - started
    assert status == 408 and "not complete" in body["detail"]
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 5


# ---- tokens --------------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", f"Basic {TOKEN}", f"Token {TOKEN}", "Bearer wrong", f"Bearer {TOKEN}x",
    f"Bearer {TOKEN[:-1]}", f"{TOKEN}", "Bearer \u00e9\u00e8".encode(),  # non-ASCII bytes in the header
])
def test_missing_or_wrong_tokens_are_401(client, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    for resp in (client.post("/v1/score", json={"samples": corpus_rows()[:1]}, headers=headers),
                 client.get("/v1/info", headers=headers)):
        assert resp.status_code == 401 and resp.json()["detail"]
        assert resp.headers["www-authenticate"] == "Bearer"


def test_the_token_opens_the_api_and_health_needs_none(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/openapi.json").status_code == 200
    info = client.get("/v1/info", headers={"Authorization": f"bearer   {TOKEN}"}).raise_for_status().json()
    assert info["auth"] == "bearer" and TOKEN not in json.dumps(info)
    resp = client.post("/v1/score", json={"samples": corpus_rows()[:2]}, headers=AUTH).raise_for_status()
    assert [r["error"] for r in resp.json()["results"]] == [None, None]


# ---- bad requests: each a 4xx with a message -----------------------------------------------------


def _nested(depth: int) -> bytes:
    return b'{"samples": [{"prompt": "a", "completion": "b", "x": ' + b"[" * depth + b"]" * depth + b"}]}"


SAMPLE = json.dumps(corpus_rows()[2]).encode()
BAD_BODIES = {
    "empty": b"", "not json": b"{not json", "truncated": b'{"samples": [' + SAMPLE, "null": b"null",
    "a list": b"[]", "a string": b'"samples"', "a number": b"1e999", "NaN samples": b'{"samples": NaN}',
    "no samples": b"{}", "empty samples": b'{"samples": []}', "samples a string": b'{"samples": "text"}',
    "samples an object": b'{"samples": {"prompt": "a"}}', "samples numbers": b'{"samples": [1, 2]}',
    "samples null": b'{"samples": null}', "samples of lists": b'{"samples": [[]]}',
    "samples of null": b'{"samples": [null]}', "extra key": b'{"samples": [' + SAMPLE + b'], "mode": "fast"}',
    "non-UTF-8": b'{"samples": [{"prompt": "\xff\xfe\xfa", "completion": "b"}]}',
    "latin-1 text": '{"samples": [{"prompt": "caf\u00e9", "completion": "b"}]}'.encode("latin-1"),
    "raw control character": b'{"samples": [{"prompt": "a\x01b", "completion": "b"}]}',
    "deep nesting": _nested(100_000), "infinity in samples": b'{"samples": [1e999]}',
    "10k samples": json.dumps({"samples": [{"prompt": "a", "completion": "b"}] * 10_000}).encode(),
    "huge string": json.dumps({"samples": [{"prompt": "a", "completion": "b" * 500_000}]}).encode(),
    "huge key": json.dumps({"samples": [{"k" * 200_000: 1, "prompt": "a", "completion": "b"}]}).encode(),
    "5 MB field": json.dumps({"samples": [{"prompt": "a", "completion": "b" * 5_000_000}]}).encode(),
}


def has_detail(resp: httpx.Response) -> bool:
    """A JSON error body with a non-empty `detail`."""
    try:
        return bool(resp.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return False


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_every_bad_request_is_a_4xx_with_a_message(client, name):
    resp = client.post("/v1/score", content=BAD_BODIES[name], headers={**AUTH, "content-type": "application/json"})
    assert 400 <= resp.status_code < 500, (name, resp.status_code, resp.text[:300])
    assert has_detail(resp) and len(resp.content) < 10_000, name  # a message, not the input echoed back


@pytest.mark.parametrize("depth", [50, 900])
def test_nesting_the_parser_accepts_is_no_5xx(client, depth):
    """Nested lists inside a sample, below the JSON parser's own depth limit: scored or refused, never a 500."""
    resp = client.post("/v1/score", content=_nested(depth), headers={**AUTH, "content-type": "application/json"})
    assert resp.status_code == 200 or (400 <= resp.status_code < 500 and has_detail(resp)), resp.text[:300]


BAD_SAMPLES = [  # wrong types in every field of every loader form; each is that sample's error, not the request's
    {"messages": "hi"}, {"messages": 1}, {"messages": [1]}, {"messages": [None]}, {"messages": [[]]},
    {"messages": [{"role": 1, "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ["y", 2]}]},
    {"messages": [{"role": "user"}, {"role": "assistant", "content": None}]},
    {"instruction": 1, "input": "", "output": "y"}, {"instruction": "x", "input": [], "output": "y"},
    {"instruction": "x", "input": "", "output": None}, {"instruction": "x", "output": {"y": 1}},
    {"prompt": 1.5, "completion": "y"}, {"prompt": "x", "completion": True}, {"prompt": None, "completion": None},
    {"prompt": "x", "completion": "y", "id": {"a": 1}}, {"prompt": "x", "completion": "y", "id": [1, 2]},
    {"prompt": "x", "completion": "y", "id": 1e308}, {"prompt": "x", "completion": "y", "dataset": []},
    {"prompt": "x", "completion": "y", "dataset": 7}, {"prompt": "x\ud800", "completion": "y"},
    {"prompt\udfff": "x", "completion": "y"}, {"prompt": "x", "completion": "y", "id": "\ud800"},
    {"prompt": "\u0000\u0001\u001b[31m\u007f", "completion": "\u200b\ufeff\ufffe"}, {"prompt": "", "completion": ""},
    {}, {"unknown": "form"},
]


def test_wrong_types_in_samples_never_fail_the_request(client):
    """A lone surrogate (`"\\ud800"`), control characters, wrong types: per-sample results, never a 5xx."""
    good = corpus_rows()[0]
    body = json.dumps({"samples": [good, *BAD_SAMPLES]}).encode()  # json.dumps writes surrogates as escapes
    resp = client.post("/v1/score", content=body, headers={**AUTH, "content-type": "application/json"})
    assert resp.status_code == 200, resp.text[:500]  # every sample is a JSON object: the request itself is fine
    results = resp.json()["results"]
    assert len(results) == 1 + len(BAD_SAMPLES) and results[0]["error"] is None
    surrogates = [results[1 + i] for i, s in enumerate(BAD_SAMPLES) if "\ud800" in json.dumps(s, ensure_ascii=False)
                  or "\udfff" in json.dumps(s, ensure_ascii=False)]
    assert surrogates and all(r["error"]["reason"] == "bad_unicode" for r in surrogates)
    for sample, result in zip(BAD_SAMPLES, results[1:]):
        assert result["error"] is not None or result["q"] is not None, (sample, result)


def test_each_sample_with_a_wrong_type_alone(client):
    """Alone, each of those samples still gives a 200 with its own error, or a 4xx with a message."""
    for sample in BAD_SAMPLES:
        resp = client.post("/v1/score", content=json.dumps({"samples": [sample]}).encode(),
                           headers={**AUTH, "content-type": "application/json"})
        assert resp.status_code < 500, (sample, resp.status_code, resp.text[:300])
        if resp.status_code >= 400:
            assert has_detail(resp), sample


# ---- many clients at once ------------------------------------------------------------------------


def _load_bodies() -> list[tuple[bytes, dict, int | None]]:
    """(body, headers, expected status or None for any 4xx) that the clients cycle through."""
    json_type = {"content-type": "application/json"}
    good = [(json.dumps({"samples": corpus_rows()[i:i + 2]}).encode(), {**AUTH, **json_type}, 200)
            for i in range(0, 24, 2)]
    bad = [(body, {**AUTH, **json_type}, None) for body in BAD_BODIES.values() if len(body) < 2**20]
    no_token = [(good[0][0], json_type, 401)]
    return good + bad + no_token


async def _client_loop(url: str, bodies: list, offset: int, stop_at: float, statuses: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as c:
        i = offset
        while time.monotonic() < stop_at:
            body, headers, expected = bodies[i % len(bodies)]
            resp = await c.post("/v1/score", content=body, headers=headers)
            ok = resp.status_code == expected if expected else 400 <= resp.status_code < 500
            statuses.append((resp.status_code, ok, resp.status_code < 400 or has_detail(resp)))
            i += 1


def test_concurrent_clients_get_no_5xx_and_leave_memory_where_it_was(port, client):
    url = f"http://127.0.0.1:{port}"
    pid = replica_pid()
    client.post("/v1/score", json={"samples": corpus_rows()[:4]}, headers=AUTH).raise_for_status()
    before = psutil.Process(pid).memory_info().rss
    bodies, statuses = _load_bodies(), []

    async def all_clients():
        stop_at = time.monotonic() + LOAD_SECONDS
        await asyncio.gather(*(_client_loop(url, bodies, k * 7, stop_at, statuses) for k in range(LOAD_CLIENTS)))

    asyncio.run(all_clients())
    codes = [code for code, _, _ in statuses]
    assert len(statuses) >= LOAD_CLIENTS and 200 in codes and 401 in codes
    assert not [code for code in codes if code >= 500]
    assert all(ok for _, ok, _ in statuses) and all(explained for _, _, explained in statuses)
    assert client.get("/healthz").json() == {"status": "ok"} and replica_pid() == pid  # the same replica lives
    after = psutil.Process(pid).memory_info().rss
    assert abs(after - before) < 0.2 * before, (before, after)


def test_the_token_is_never_logged(port):
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = [path.name for path in logs.rglob("*") if path.is_file() and TOKEN.encode() in path.read_bytes()]
    assert leaked == []


# ---- closed by default ---------------------------------------------------------------------------


def test_a_public_bind_needs_a_token_or_allow_open():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.com")
    check_exposure("127.0.0.1", None, allow_open=False)
    check_exposure("0.0.0.0", "t", allow_open=False)
    check_exposure("0.0.0.0", None, allow_open=True)
    with pytest.raises(PermissionError, match="allow_open"):
        check_exposure("0.0.0.0", None, allow_open=False)


def test_qgate_serve_refuses_0_0_0_0_without_a_token(run_dir, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(PermissionError, match="without an API token"):
        start(run_config(run_dir, ["serve.host=0.0.0.0"]))  # refused before Ray or the model start


def test_the_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert read_token(None, None) == "from-env" and read_token("", None) is None and read_token("x", None) == "x"
    (tmp_path / "token").write_text("from-file\n")
    assert read_token(None, str(tmp_path / "token")) == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token(None, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        read_token(None, str(tmp_path / "missing"))


# ---- Ctrl-C --------------------------------------------------------------------------------------


def test_ctrl_c_stops_qgate_serve_within_10_s(run_dir, tmp_path):
    """`qgate serve` in its own local Ray, as a user starts it; SIGINT once it says where it serves."""
    port, log = _free_port(), tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.cli", "serve", f"out={run_dir}", f"serve.port={port}",
                                 "serve.num_cpus=0.5"], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "RAY_ADDRESS": "", "RAY_raylet_start_wait_time_s": "180"},
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # Ray, Serve and the replica start: minutes on two busy cores
        while time.monotonic() < deadline and proc.poll() is None and b"qgate scoring at" not in log.read_bytes():
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert time.monotonic() - sent < 10 and proc.returncode == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

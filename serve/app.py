"""Ray Serve app: score new samples over HTTP against a finished run's corpus (a/b/μ, threshold, direction).

    python -m serve.app out=runs/demo                      # after `python -m ray_jobs.demo out=runs/demo`
    python -m ray_jobs.demo out=/tmp/demo model=tiny-qwen3 demo.rows=120 steps=3 && \
        python -m serve.app out=/tmp/demo serve.port=8001 serve.max_batch_size=8     # tiny CPU version
    serve deploy serve/serve_config.yaml                   # on a running Ray cluster
    curl -s localhost:8000/v1/score -H 'content-type: application/json' \
        -d '{"samples": [{"prompt": "Say hello.", "completion": "Hello!"}]}'

Routes: `POST /v1/score` {"samples": [...]} (1..serve.max_samples rows in any loader form), `GET /v1/info`,
`GET /healthz`, OpenAPI at `/docs`. Concurrent requests are batched into one forward pass (`@serve.batch`);
each response says in `batch_size` how many requests shared its batch.

Errors: a malformed body is 422 (400 when it cannot be decoded: not UTF-8, nested too deep); too many samples
or characters is 413; a body not complete within `serve.body_timeout_s` is 408; with a token set
(`serve.token_file` or `QGATE_API_TOKEN`), a missing or wrong `Authorization: Bearer <token>` is 401; a full
queue (`serve.max_queued_requests`) is 503. The token, the byte cap and the deadline are checked before the
body is read or parsed (`serve.guard`). A sample the loader or encoder rejects is not an HTTP error: its
result carries `error: {reason, detail}`.

Closed by default: a replica refuses to start on a non-loopback HTTP address without a token unless
`serve.allow_open=true` (see docs/security.md).
"""

# No `from __future__ import annotations` here: Serve's class-based view rebuilds the route signatures, and
# FastAPI then sees the body model as a string annotation and asks for a query parameter named `body`.
import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any

import ray
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.config import AutoscalingConfig
from omegaconf import OmegaConf
from ray.serve.metrics import Counter

from ray_jobs.common import gpus_available, init_ray, setup_logging
from serve.guard import TOKEN_ENV, GuardSettings, RequestGuard, check_exposure, read_token
from serve.scoring import CorpusScorer, run_config, scorer_settings

BODY_BYTES_PER_CHAR = 8  # generous bound on JSON bytes per text character (escapes, UTF-8), for the byte cap
EXAMPLES = [
    {"id": "ex-1", "messages": [{"role": "user", "content": "What is 2 + 2?"},
                                {"role": "assistant", "content": "2 + 2 = 4."}]},
    {"instruction": "Name a prime number.", "input": "", "output": "7 is prime."},
    {"prompt": "Say hello.", "completion": "Hello!"},
]

api = FastAPI(title="qgate scoring", version="1", description=__doc__.split("\n\n")[0])
api.add_middleware(RequestGuard, settings=lambda: _service().guard)


@api.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with where and why, without echoing the input: it may be huge, or a NaN that JSON cannot write."""
    errors = [{key: error[key] for key in ("loc", "msg", "type") if key in error} for error in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": errors})


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"samples": EXAMPLES}]})
    samples: list[dict[str, Any]] = Field(
        min_length=1, description="rows in any loader form: LESS `messages`, Alpaca `instruction/input/output`, "
                                  "or `prompt/completion`; optional `id` and `dataset`")


class SampleError(BaseModel):
    reason: str = Field(description="the short code the batch path writes to the rejects file")
    detail: str


class SampleScore(BaseModel):
    id: str
    dataset: str
    q: float | None = Field(description="quality score, mapped with the corpus's a/b/μ")
    score: float | None = Field(
        description="the score the run sorted on (the response's `score`): q itself, or the q + IFD (q + halves) "
                    "rank blend")
    S: list[float] | None = Field(description="per-layer score S_l for the run's α")
    ppl: float | None = Field(description="perplexity over the scored tokens")
    ifd: float | None = Field(default=None, description="IFD, computed when the run selected by q_ifd")
    halves: float | None = Field(default=None, description="the halves distance (lower = clean), computed when the "
                                                           "run's gates keep the halves read (gate.halves)")
    percentile: float | None = Field(
        description="percent of the corpus this sample outranks by `score` in the selection direction (0–100): "
                    "share of corpus scores below it when higher is selected, above it when lower q is; null "
                    "without the corpus's scores.parquet")
    selected: bool | None = Field(description="whether `score` passes the corpus's selection threshold")
    n_tokens: int
    truncated: bool
    error: SampleError | None = None


class ScoreResponse(BaseModel):
    results: list[SampleScore]
    batch_size: int = Field(description="how many requests shared this request's model batch")
    direction: str = Field(description="the q direction of the run: higher or lower q selected")
    score: str = Field(description="what percentile and selected rank by: q, or q_ifd (mean percentile rank of q "
                                   "and of −IFD, higher = clean), or q_halves (the same with the halves distance)")
    threshold: float = Field(description="the selection threshold, in units of `score`")


# ---- request guards ------------------------------------------------------------------------------
# (Defined before the deployment class: Serve pickles the class, with the globals it sees, where it is decorated.)


def _service() -> "ScoringService":
    return serve.get_replica_context().servable_object


def http_host() -> str:
    """The address Serve's HTTP proxies listen on, as the Serve controller holds it."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    return ray.get(controller.get_http_config.remote()).host


def max_body_bytes(max_chars: int) -> int:
    """The byte cap of a request body: far above any JSON body within `max_chars` characters of text."""
    return BODY_BYTES_PER_CHAR * max_chars + 65536


def strings_in(value):
    """Every string inside a JSON value, keys included."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def text_chars(value) -> int:
    """Characters of all strings inside a JSON value (keys too), without recursion: nesting depth is the client's."""
    return sum(len(text) for text in strings_in(value))


def check_limits(samples: list[dict], max_samples: int, max_chars: int) -> None:
    if len(samples) > max_samples:
        raise HTTPException(413, f"{len(samples)} samples in one request; the limit is {max_samples}")
    chars = text_chars(samples)
    if chars > max_chars:
        raise HTTPException(413, f"{chars} characters of text in one request; the limit is {max_chars}")


def split(items: list, sizes: list[int]) -> list[list]:
    """`items` cut into consecutive pieces of the given sizes."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [items[start:start + size] for start, size in zip(starts, sizes)]


# ---- the deployment ------------------------------------------------------------------------------


@serve.deployment(name="qgate")
@serve.ingress(api)
class ScoringService:
    """One replica: the run's model and gates loaded once; routes are thin adapters over `CorpusScorer`."""

    def __init__(self, scorer: dict, limits: dict, batching: dict, access: dict, api_token: str | None = None):
        token = read_token(api_token, access["token_file"])
        check_exposure(http_host(), token, access["allow_open"])
        self.guard = GuardSettings(token=token, max_body_bytes=max_body_bytes(limits["max_chars"]),
                                   body_timeout_s=access["body_timeout_s"])
        self.scorer = CorpusScorer(**scorer)
        self.limits, self.batching = limits, batching
        self.score_batch.set_max_batch_size(batching["max_batch_size"])
        self.score_batch.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])
        self.served = {"batches": 0, "requests": 0, "samples": 0}
        self.metrics = {key: Counter(f"qgate_{key}_served", description=f"{key} scored by this replica")
                        for key in self.served}
        self.started = time.time()

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/info")
    def info(self) -> dict:
        limits = {**self.limits, "max_body_bytes": self.guard.max_body_bytes,
                  "body_timeout_s": self.guard.body_timeout_s}
        return {**self.scorer.info(), "limits": limits, "batching": self.batching,
                "auth": "bearer" if self.guard.token else "open",
                "replica": serve.get_replica_context().replica_tag, "served": dict(self.served),
                "uptime_s": round(time.time() - self.started, 1)}

    @api.post("/v1/score", response_model=ScoreResponse)
    async def score(self, body: ScoreRequest) -> dict:
        check_limits(body.samples, **self.limits)
        results, batch_size = await self.score_batch(body.samples)
        return {"results": results, "batch_size": batch_size, "direction": self.scorer.direction,
                "score": self.scorer.score_name, "threshold": self.scorer.threshold}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score_batch(self, requests: list[list[dict]]) -> list[tuple[list[dict], int]]:
        """Requests waiting together share one `CorpusScorer.score` call (the forward runs off the event loop)."""
        flat = [sample for samples in requests for sample in samples]
        results = await asyncio.to_thread(self.scorer.score, flat)
        self._count(len(requests), len(flat))
        return [(part, len(requests)) for part in split(results, [len(r) for r in requests])]

    def _count(self, requests: int, samples: int) -> None:
        for key, n in (("batches", 1), ("requests", requests), ("samples", samples)):
            self.served[key] += n
            self.metrics[key].inc(n)


# ---- building and running ------------------------------------------------------------------------


def wants_gpu(config) -> bool:
    """`use_gpu: auto` means: when the connected Ray cluster has GPUs now (set true where GPU nodes start at 0)."""
    if str(config.use_gpu).lower() != "auto":
        return bool(config.use_gpu)
    return ray.is_initialized() and gpus_available() > 0


def deployment_options(cfg, gpu: bool) -> dict:
    """Serve options from the `serve:` config section."""
    max_ongoing = cfg.max_ongoing_requests or 2 * cfg.max_batch_size
    if max_ongoing < cfg.max_batch_size:
        raise ValueError(f"serve.max_ongoing_requests ({max_ongoing}) < serve.max_batch_size "
                         f"({cfg.max_batch_size}): a replica would never see a full batch")
    autoscaling = {"min_replicas": cfg.min_replicas, "max_replicas": max(cfg.max_replicas, cfg.min_replicas),
                   "target_ongoing_requests": cfg.target_ongoing_requests or cfg.max_batch_size,
                   **OmegaConf.to_container(cfg.autoscaling)}
    unknown = sorted(set(autoscaling) - set(AutoscalingConfig.model_fields))
    if unknown:
        raise ValueError(f"bad configuration: serve.autoscaling has no {unknown} (Ray Serve's AutoscalingConfig "
                         f"fields: {sorted(AutoscalingConfig.model_fields)})")
    try:
        AutoscalingConfig(**autoscaling)
    except ValidationError as err:
        raise ValueError(f"bad configuration: serve.autoscaling: {err}") from err
    actor = {"num_cpus": cfg.num_cpus, **({"num_gpus": 1} if gpu else {})}
    return {"max_ongoing_requests": max_ongoing, "max_queued_requests": cfg.max_queued_requests,
            "autoscaling_config": autoscaling, "ray_actor_options": actor}


def app_from_config(config, api_token: str | None = None):
    """The bound Serve application of a run config (see `serve.scoring.run_config`).

    The token: `api_token` if given ("" = open), else this process's `QGATE_API_TOKEN`; without either, each
    replica reads `serve.token_file` or its own `QGATE_API_TOKEN` (node environment or Ray runtime env).
    """
    gpu, cfg = wants_gpu(config), config.serve
    return ScoringService.options(**deployment_options(cfg, gpu)).bind(
        scorer={**scorer_settings(config), "device": "cuda" if gpu else "cpu"},
        limits={"max_samples": cfg.max_samples, "max_chars": cfg.max_chars},
        batching={"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s},
        access={"token_file": cfg.token_file, "allow_open": bool(cfg.allow_open),
                "body_timeout_s": float(cfg.body_timeout_s)},
        api_token=api_token if api_token is not None else os.environ.get(TOKEN_ENV) or None,
    )


def build_app(args: dict):
    """Application builder for `serve deploy` / `serve run serve.app:build_app run_dir=DIR [key=value ...]`.

    `args["run_dir"]` is the run directory; any other key is a config override, e.g. `serve.max_batch_size: 32`.
    """
    args = dict(args)
    run_dir = args.pop("run_dir")
    return app_from_config(run_config(run_dir, [f"{key}={value}" for key, value in args.items()]))


def start(config, name: str = "qgate", api_token: str | None = None) -> str:
    """Start Serve on `serve.host:serve.port` with the app of `config`; returns its URL."""
    cfg = config.serve
    token = read_token(api_token if api_token is not None else os.environ.get(TOKEN_ENV), cfg.token_file)
    check_exposure(cfg.host, token, bool(cfg.allow_open))  # fail before Ray and the model start
    init_ray(config)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app_from_config(config, api_token), name=name, route_prefix=cfg.route_prefix)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def main(argv: list[str] | None = None) -> None:
    """`python -m serve.app out=RUN_DIR [serve.port=8000 serve.host=127.0.0.1 serve.max_batch_size=16 ...]`"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return
    out = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("out=")), None)
    if not out:
        raise SystemExit("set the run directory: out=DIR")
    setup_logging()
    config = run_config(out, [arg for arg in argv if not arg.startswith("out=")])
    joined = bool(config.ray_address or os.environ.get("RAY_ADDRESS"))
    try:
        url = start(config)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `docker stop`, `kill`: like Ctrl-C
        print(f"qgate scoring at {url}/v1/score  (docs: {url}/docs)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("qgate serve: stopping", flush=True)
    except BaseException:
        stop(joined)
        raise
    stop(joined)
    os._exit(0)  # done: the interpreter's own teardown of Ray's native threads would take seconds more


def stop(joined: bool) -> None:
    """On a cluster this process joined, shut Serve down there; a Ray this process started goes whole, at once
    (Serve's graceful shutdown waits for every replica and proxy to drain: tens of seconds on a busy machine)."""
    if joined:
        serve.shutdown()
    ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    main()

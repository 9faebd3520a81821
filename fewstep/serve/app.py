"""The Ray Serve deployment: a FastAPI ingress whose replicas each own the model and an Engine per program.

``build_app(ServeOptions(...))`` is the application (``serve.run(build_app(o))``); ``app_builder`` is the
same from a Serve config file's ``args`` (``import_path: fewstep.serve.app:app_builder``, written by
``fewstep serve --print-config``).

Routes: ``POST /v1/sample`` (see :mod:`fewstep.serve.protocol`), ``GET /healthz``, ``GET /v1/models``.
Errors are one-line JSON objects ``{"error": "..."}``: 400 / 413 for a bad request, 500 for a failed plan
call, 504 when a sample is not ready ``timeout_s`` after the replica took the request.  Overload is Serve's:
beyond ``max_ongoing`` requests per replica and ``max_queued`` waiting, its proxy answers 503 with
``Retry-After``.
"""


import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import Job, JobResult, PlanRunner, bucket_sizes, job_rows, run_jobs
from .models import EngineCache, load_served_model
from .options import ServeOptions
from .protocol import FORMATS, RequestError, encode_npy, parse_sample_request, request_noise

__all__ = ["FewstepDeployment", "build_app", "app_builder", "deployment_options"]

_MAX_WAITING_BATCHES = 1024  # more than the requests a replica holds (max_ongoing): never the limit

api = FastAPI(title="fewstep", description="low-NFE diffusion sampling", docs_url=None, redoc_url=None)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - only a label in a header
        return "unknown"


@api.exception_handler(StarletteHTTPException)
async def _http_error(request, exc: StarletteHTTPException) -> JSONResponse:  # unknown route, wrong method
    return _error(exc.status_code, str(exc.detail), exc.headers)


@serve.deployment(name="fewstep")
@serve.ingress(api)
class FewstepDeployment:
    """A replica: the model, an Engine per (solver, nfe, guidance), and a ``@serve.batch`` queue that merges
    concurrent requests (at most ``max_batch`` rows a batch) into plan calls run on one worker thread."""

    def __init__(self, args: dict[str, Any]):
        t0 = time.perf_counter()
        self.options = o = ServeOptions.from_args(args)
        if o.device == "cpu":
            torch.set_num_threads(max(1, int(o.cpus_per_replica)))
        self.served = load_served_model(o)
        self.engines = EngineCache(self.served, o)
        self.solvers = self.engines.solvers
        self.formats = tuple(FORMATS) if self.served.can_png else ("npy",)
        run = functools.partial(run_jobs, max_batch=o.max_batch, device=self.served.device)
        self._runner = PlanRunner(run, capacity=o.max_batch * o.batch_calls, executor=ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="fewstep-plan"))
        self._sample_batch.set_max_batch_size(o.max_batch)  # rows (batch_size_fn=job_rows)
        self._sample_batch.set_batch_wait_timeout_s(o.batch_wait_ms / 1000.0)
        self.engines.warm(o.solver, o.nfe, o.guidance)  # the default program's buckets, before any request
        self.ready_seconds = time.perf_counter() - t0

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "replica": _replica_id()}

    @api.get("/v1/models")
    async def models(self) -> dict:
        o = self.options
        return {"models": [dict(
            self.served.describe(),
            solvers=list(self.solvers),
            tuned=None if self.engines.tuned is None else self.engines.tuned.summary(),
            defaults={"solver": o.solver, "nfe": o.nfe, "guidance_scale": o.guidance_scale, "format": "npy"},
            limits={"max_batch": o.max_batch, "max_nfe": o.max_nfe, "batch_wait_ms": o.batch_wait_ms,
                    "batch_calls": o.batch_calls,
                    "buckets": list(bucket_sizes(o.max_batch)), "max_engines": o.max_engines,
                    "max_ongoing_per_replica": o.max_ongoing, "max_queued": o.max_queued,
                    "timeout_s": o.timeout_s, "replicas": o.replicas},
            noise="torch.randn((len(labels), *sample_shape), generator=torch.Generator().manual_seed(seed))",
        )]}

    @api.post("/v1/sample")
    async def sample(self, request: Request) -> Response:
        try:
            return await self._sample(request)
        except Exception as e:  # noqa: BLE001 - a bug here is a one-line 500, and the replica serves on
            return _error(500, f"internal error: {type(e).__name__}: {e}")

    async def _sample(self, request: Request) -> Response:
        o = self.options
        try:
            body = await request.body()
            req = parse_sample_request(
                body, num_classes=self.served.num_classes, max_batch=o.max_batch, max_nfe=o.max_nfe,
                solvers=self.solvers, default_solver=o.solver, default_nfe=o.nfe, default_guidance=o.guidance,
                formats=self.formats)
            try:
                engine = self.engines.get(req.solver, req.nfe, req.guidance_scale)
            except ValueError as e:  # e.g. an nfe this solver's grid cannot take
                raise RequestError(f"{req.solver} with nfe={req.nfe}: {e}") from None
        except RequestError as e:
            return _error(e.status, str(e))
        job = Job(req, engine, request_noise(len(req.labels), self.served.sample_shape, req.seed),
                  torch.tensor(req.labels, dtype=torch.long))
        try:
            result = await asyncio.wait_for(self._sample_batch(job), o.timeout_s)
        except asyncio.TimeoutError:
            return _error(504, f"the sample was not ready within the server's timeout of {o.timeout_s:g} s")
        if isinstance(result, Exception):
            return _error(500, f"sampling failed: {type(result).__name__}: {result}")
        headers = {"X-Fewstep-Seed": str(req.seed), "X-Fewstep-Solver": req.solver,
                   "X-Fewstep-Nfe": str(req.nfe), "X-Fewstep-Guidance-Scale": f"{req.guidance_scale or 0:g}",
                   "X-Fewstep-Batch-Rows": str(result.batch_rows),
                   "X-Fewstep-Batch-Requests": str(result.batch_requests),
                   "X-Fewstep-Replica": _replica_id()}
        if req.format == "png":
            return Response(self.served.png(result.samples), media_type=FORMATS["png"], headers=headers)
        return Response(encode_npy(result.samples), media_type=FORMATS["npy"], headers=headers)

    # Serve's batches wait in the PlanRunner (which merges them into runs), not on Serve's own semaphore.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, batch_size_fn=job_rows,
                 max_concurrent_batches=_MAX_WAITING_BATCHES)
    async def _sample_batch(self, jobs: list[Job]) -> list[JobResult | Exception]:
        return await self._runner.submit(jobs)


def deployment_options(options: ServeOptions) -> dict[str, Any]:
    """The Serve deployment options of ``options``: replicas, the request bounds and the actor's resources
    (one GPU per replica on CUDA)."""
    return {
        "num_replicas": options.replicas,
        "max_ongoing_requests": options.max_ongoing,
        "max_queued_requests": options.max_queued,
        "backpressure_config": {"status_code": 503, "retry_after_s": options.retry_after_s},
        "ray_actor_options": {"num_cpus": options.cpus_per_replica,
                              "num_gpus": 1 if options.device == "cuda" else 0},
        # a replica that loads a large model and builds its plans may need longer than Serve's default
        "health_check_timeout_s": max(30.0, options.timeout_s),
        "graceful_shutdown_timeout_s": options.timeout_s,
        # a replica that cannot load its model (a broken directory) fails the deployment after a few tries
        "max_constructor_retry_count": 3,
    }


def build_app(options: ServeOptions):
    """The Serve application for ``options``."""
    return FewstepDeployment.options(**deployment_options(options)).bind(options.to_args())


def app_builder(args: dict[str, Any]):
    """The application from a Serve config's ``args`` (:meth:`ServeOptions.from_args`)."""
    return build_app(ServeOptions.from_args(args))

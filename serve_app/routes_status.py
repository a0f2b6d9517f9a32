"""`GET /health` (liveness), `GET /ready` (readiness) and `GET /v1/status` (what the app holds and
where its requests are). See docs/observability.md.

- `/health` answers from this ingress replica alone: no stage call, no store call, no thread, so
  it answers at once however busy the stages are. It says the process serves HTTP, no more.
- `/ready` asks every stage's `ready` (the denoiser also pings its worker group), each within
  `READY_TIMEOUT_S`: 200 when all answer, else 503 with each stage's state.
- `/v1/status`: Serve's replica counts per deployment of this application (`serve.status()`, in a
  thread), the job store's records by state and pending work (`counts_by_status`, `load`), and
  per-stage queue depths derived from the store: the `progress` each running record's stage last
  wrote (see `stage_of`), so they count every ingress's requests, not only this replica's.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Iterable, Literal, Mapping, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from deployments.job_store.base import STATUSES
from serve_app.app import STAGE_NAMES, stage_deployments
from serve_app.context import ApiContext, request_id_of
from serve_app.errors import error_response
from serve_app.openapi_docs import error_responses
from serve_app.pipeline import STAGES

READY_TIMEOUT_S = 10.0
SERVE_STATUS_TIMEOUT_S = 5.0
STAGE_DEPLOYMENTS = {stage: name for name, stage in STAGE_NAMES.items()}  # stage -> deployment
STARTING_STATES = ("STARTING", "RECOVERING")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    stages: dict[str, str] = Field(description="Per stage: ok, or why it is not ready.")


class Replicas(BaseModel):
    running: int = 0
    starting: int = Field(0, description="STARTING or RECOVERING.")
    by_state: dict[str, int] = Field(default_factory=dict, description="Serve's replica states.")


class DeploymentState(BaseModel):
    deployment: str
    status: str = Field("UNKNOWN", description="Serve's deployment status (HEALTHY, UPDATING, ...).")
    replicas: Replicas = Field(default_factory=Replicas)


class StageState(DeploymentState):
    queue_depth: int = Field(
        0, description="Running requests at this stage: waiting for its batch or in one (job store)."
    )


class JobCounts(BaseModel):
    by_state: dict[str, int] = Field(description="Records in the job store by status.")
    queued: int
    running: int
    pending_cost: float = Field(description="Summed cost (images x steps x megapixels) not yet done.")


class AppStatus(BaseModel):
    object: Literal["app.status"] = "app.status"
    application: str
    status: str = Field(description="Serve's application status (RUNNING, DEPLOYING, ...) or UNKNOWN.")
    message: str = ""
    ingress: list[DeploymentState] = Field(description="The app's deployments that are not stages.")
    stages: dict[str, StageState]
    queue_depths_from: Literal["job_store"] = "job_store"
    jobs: JobCounts


def stage_of(progress: Optional[dict]) -> Optional[str]:
    """Where a running request is, from its record's `progress` (deployments/events.py): at a
    stage while it is there (`running`), at the next stage once one `finished` (in flight to it or
    in its batch queue), at the text encoder before any report; None after the last stage (back at
    the ingress). A retried attempt shows the previous attempt's progress until its first report."""
    if not progress or progress.get("stage") not in STAGES:
        return STAGES[0]
    index = STAGES.index(progress["stage"])
    if progress.get("state") == "finished":
        index += 1
    return STAGES[index] if index < len(STAGES) else None


def stage_depths(progresses: Iterable[Optional[dict]], models: Sequence[str] = ()) -> dict[str, int]:
    """Running requests per stage, keyed `stage`; with several `models`, `model/stage` (the model
    a stage stamped on the progress; a request no stage has reported yet counts at the first
    model's text encoder)."""
    if len(models) < 2:
        depths = dict.fromkeys(STAGES, 0)
    else:
        depths = {f"{m}/{s}": 0 for m in models for s in STAGES}
    for progress in progresses:
        stage = stage_of(progress)
        if stage is None:
            continue
        if len(models) >= 2:
            model = (progress or {}).get("model")
            stage = f"{model if model in models else models[0]}/{stage}"
        depths[stage] += 1
    return depths


def stage_keys(config) -> dict[str, str]:
    """/v1/status `stages` key -> deployment: `stage` for one model, `model/stage` for several."""
    names = stage_deployments(config)
    if len(config.views()) == 1:
        return {stage: name for name, (_, stage) in names.items()}
    return {f"{model}/{stage}": name for name, (model, stage) in names.items()}


def _name(value) -> str:
    return value.value if isinstance(value, enum.Enum) else str(value)


def deployment_state(name: str, overview: Optional[Mapping]) -> DeploymentState:
    """From one deployment's entry of `serve_deployments` (None: Serve did not list it)."""
    if overview is None:
        return DeploymentState(deployment=name)
    by_state = {state: count for state, count in overview["replica_states"].items() if count}
    return DeploymentState(
        deployment=name,
        status=overview["status"],
        replicas=Replicas(
            running=by_state.get("RUNNING", 0),
            starting=sum(by_state.get(s, 0) for s in STARTING_STATES),
            by_state=by_state,
        ),
    )


def app_status(
    application: str,
    serve_app: Optional[Mapping],
    depths: Mapping[str, int],
    counts: Mapping[str, int],
    load,
    message: str = "",
    keys: Optional[Mapping[str, str]] = None,
) -> AppStatus:
    """Assemble the response. `serve_app`: this application's entry of `serve_deployments` (None:
    unknown); `load`: the store's `Load`; `keys`: stage key -> deployment (`stage_keys`)."""
    deployments = dict(serve_app["deployments"]) if serve_app else {}
    stages = {}
    for stage, name in (keys or STAGE_DEPLOYMENTS).items():
        state = deployment_state(name, deployments.pop(name, None))
        stages[stage] = StageState(**state.model_dump(), queue_depth=depths.get(stage, 0))
    return AppStatus(
        application=application,
        status=serve_app["status"] if serve_app else "UNKNOWN",
        message=message or (serve_app or {}).get("message", ""),
        ingress=[deployment_state(name, overview) for name, overview in sorted(deployments.items())],
        stages=stages,
        jobs=JobCounts(
            by_state={state: counts.get(state, 0) for state in dict.fromkeys((*STATUSES, *counts))},
            queued=load.queued,
            running=load.running,
            pending_cost=load.pending_cost,
        ),
    )


def serve_deployments(application: str) -> Optional[dict]:
    """This application's status from `serve.status()` as plain data (blocking: a controller
    call), or None if Serve does not list it."""
    from ray import serve

    app = serve.status().applications.get(application)
    if app is None:
        return None
    return {
        "status": _name(app.status),
        "message": app.message,
        "deployments": {
            name: {
                "status": _name(d.status),
                "replica_states": {_name(s): n for s, n in d.replica_states.items()},
            }
            for name, d in app.deployments.items()
        },
    }


async def readiness(ctx: ApiContext) -> tuple[bool, dict[str, str]]:
    """Ask every stage whether it can serve; (all ok, per-stage detail)."""

    async def probe(name: str, handle):
        try:
            await asyncio.wait_for(handle.ready.remote(), READY_TIMEOUT_S)
            return name, None
        except asyncio.TimeoutError:
            return name, f"no answer within {READY_TIMEOUT_S}s"
        except Exception as exc:  # noqa: BLE001 - reported as the stage's state
            return name, type(exc).__name__

    results = await asyncio.gather(*(probe(n, h) for n, h in ctx.pipeline.stages.items()))
    detail = {name: ("ok" if err is None else err) for name, err in results}
    return all(err is None for _, err in results), detail


def add_status_routes(app: FastAPI, ctx: ApiContext) -> None:
    @app.get("/health", response_model=Health)
    async def health():
        return JSONResponse({"status": "ok"})

    @app.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
    async def ready():
        ok, detail = await readiness(ctx)
        body = Readiness(status="ok" if ok else "unavailable", stages=detail)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get("/v1/status", response_model=AppStatus, responses=error_responses(ctx.config))
    async def status(request: Request):
        from ray import serve

        jobs = ctx.jobs
        application = serve.get_replica_context().app_name
        try:
            counts, load, progress = await asyncio.gather(
                jobs.call(jobs.store.counts_by_status),
                jobs.call(jobs.store.load),
                jobs.call(jobs.store.running_progress),
            )
        except Exception as exc:  # noqa: BLE001 - the store failed: a shaped 5xx
            return error_response(exc, request_id_of(request))
        serve_app, message = None, ""
        try:
            serve_app = await asyncio.wait_for(
                asyncio.to_thread(serve_deployments, application), SERVE_STATUS_TIMEOUT_S
            )
        except Exception as exc:  # noqa: BLE001 - report the rest without Serve's part
            message = f"serve.status() failed: {type(exc).__name__}"
        depths = stage_depths(progress, list(ctx.config.views()))
        body = app_status(
            application, serve_app, depths, counts, load, message, stage_keys(ctx.config)
        )
        return JSONResponse(body.model_dump())

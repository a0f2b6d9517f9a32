"""`/v1/status` without Ray: where a running request is from the progress its stages wrote, the
per-stage depths over a store's running records, the response assembled from Serve's status and
the store's counts, and its schema in /openapi.json."""

from __future__ import annotations

import types

import pytest
from fastapi import FastAPI

from deployments import events
from deployments.job_store import open_job_store
from deployments.job_store.base import CANCELLED, QUEUED, RUNNING, SUCCEEDED, JobRecord, Load
from serve_app.config import AppConfig
from serve_app.jobs import new_job_id
from serve_app.routes_status import AppStatus, add_status_routes, app_status, stage_depths, stage_of

J = "job_x"


@pytest.mark.parametrize(
    "progress, stage",
    [
        (None, "text_encoder"),  # dispatched: on its way to (or queued at) the text encoder
        (events.stage_started(J, "text_encoder", 2).progress, "text_encoder"),
        (events.stage_finished(J, "text_encoder", 2, 0.1).progress, "denoiser"),
        (events.stage_started(J, "denoiser", 4).progress, "denoiser"),
        (events.step_done(J, 3, 20, 0.05).progress, "denoiser"),
        (events.stage_finished(J, "denoiser", 4, 1.0).progress, "vae_decoder"),
        (events.stage_started(J, "vae_decoder", 4).progress, "vae_decoder"),
        (events.stage_finished(J, "vae_decoder", 4, 0.2).progress, None),  # back at the ingress
    ],
)
def test_a_running_request_is_at_the_stage_its_last_progress_says(progress, stage):
    assert stage_of(progress) == stage


def test_depths_count_every_running_record_of_the_store(tmp_path):
    store = open_job_store("sqlite", path=str(tmp_path / "jobs.db"))
    reports = [
        [],
        [events.stage_started],
        [events.stage_started, events.stage_finished],
        [events.stage_started, events.stage_finished, events.stage_started],
    ]
    for i, emitted in enumerate(reports):
        job = new_job_id()
        store.create(JobRecord(job, "sync", "anonymous", {}, status=RUNNING, lease_owner="w", lease_expires=1e12))
        for n, make in enumerate(emitted):
            stage = "text_encoder" if n < 2 else "denoiser"
            args = (job, stage, 1) if make is events.stage_started else (job, stage, 1, 0.1)
            store.append_events([make(*args)])
    store.create(JobRecord(new_job_id(), "job", "anonymous", {}, status=QUEUED))  # not at a stage
    assert stage_depths(store.running_progress()) == {"text_encoder": 2, "denoiser": 2, "vae_decoder": 0}


SERVE_APP = {
    "status": "RUNNING",
    "message": "",
    "deployments": {
        "ImagesAPI": {"status": "HEALTHY", "replica_states": {"RUNNING": 2}},
        "TextEncoder": {"status": "HEALTHY", "replica_states": {"RUNNING": 1, "STOPPING": 0}},
        "Denoiser": {"status": "UPSCALING", "replica_states": {"RUNNING": 1, "STARTING": 2, "RECOVERING": 1}},
        "VAEDecoder": {"status": "HEALTHY", "replica_states": {"RUNNING": 1}},
    },
}


def test_status_puts_serve_replicas_store_counts_and_depths_together():
    depths = {"text_encoder": 1, "denoiser": 5, "vae_decoder": 0}
    counts = {QUEUED: 3, RUNNING: 6, SUCCEEDED: 10}
    body = app_status("dit", SERVE_APP, depths, counts, Load(queued=3, running=6, pending_cost=12.5))
    assert body.application == "dit" and body.status == "RUNNING" and body.message == ""
    assert list(body.stages) == ["text_encoder", "denoiser", "vae_decoder"]
    denoiser = body.stages["denoiser"]
    assert (denoiser.deployment, denoiser.status, denoiser.queue_depth) == ("Denoiser", "UPSCALING", 5)
    assert (denoiser.replicas.running, denoiser.replicas.starting) == (1, 3)
    assert denoiser.replicas.by_state == {"RUNNING": 1, "STARTING": 2, "RECOVERING": 1}
    assert body.stages["text_encoder"].replicas.by_state == {"RUNNING": 1}  # zero counts left out
    assert [(d.deployment, d.replicas.running) for d in body.ingress] == [("ImagesAPI", 2)]
    assert body.jobs.by_state == {QUEUED: 3, RUNNING: 6, SUCCEEDED: 10, "failed": 0, CANCELLED: 0}
    assert (body.jobs.queued, body.jobs.running, body.jobs.pending_cost) == (3, 6, 12.5)
    assert body.queue_depths_from == "job_store"


def test_without_serve_the_rest_of_the_status_still_answers():
    body = app_status(
        "dit", None, {}, {}, Load(queued=0, running=0, pending_cost=0.0), "serve.status() failed: TimeoutError"
    )
    assert body.status == "UNKNOWN" and body.message.startswith("serve.status() failed")
    assert {s.deployment: (s.status, s.replicas.running, s.queue_depth) for s in body.stages.values()} == {
        "TextEncoder": ("UNKNOWN", 0, 0),
        "Denoiser": ("UNKNOWN", 0, 0),
        "VAEDecoder": ("UNKNOWN", 0, 0),
    }
    assert body.ingress == [] and set(body.jobs.by_state.values()) == {0}


KEY = {"name": "a", "sha256": "0" * 64}


def test_openapi_documents_health_ready_and_the_typed_status():
    app = FastAPI()
    add_status_routes(app, types.SimpleNamespace(config=AppConfig.model_validate({"auth": {"keys": [KEY]}})))
    spec = app.openapi()
    ref = spec["paths"]["/v1/status"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ref == {"$ref": "#/components/schemas/AppStatus"}
    schema = spec["components"]["schemas"]["AppStatus"]
    assert set(AppStatus.model_fields) <= set(schema["properties"])
    assert {"StageState", "JobCounts", "Replicas", "Readiness", "Health"} <= set(spec["components"]["schemas"])
    assert "503" in spec["paths"]["/ready"]["get"]["responses"]
    assert {"401", "500"} <= set(spec["paths"]["/v1/status"]["get"]["responses"])  # keys on: 401

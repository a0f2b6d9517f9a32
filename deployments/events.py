"""Every event a request's log can hold, defined once: what the stages and the dispatcher append
to the job store and what clients read from `GET /v1/images/jobs/{id}/events`.

  queued      {position}                       accepted (async jobs: place in the queue)
  dispatched  {attempt}                        a dispatcher started an attempt
  stage       {stage, state, batch_size, seconds?}   a stage started / finished the request
  step        {step, steps, seconds, rows?}    denoising step `step` of `steps` done (`rows`: how
                                               many rows its forward had; step-level batching)
  preview     {step, index, b64_json, size, output_format}   a cheap look at image 0
  retry       {attempt, reason, delay_s}       an attempt failed on the server side; tried again
  completed   {...result}                      succeeded (the result's image names and seeds)
  failed      {error}                          ended with an OpenAI-shaped error
  cancelled   {reason, stage?, steps_done?}    stopped by a cancel
"""

from __future__ import annotations

import base64
from typing import Optional

from deployments.job_store.base import NewEvent

TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})


def stage_started(job_id: str, stage: str, batch_size: int) -> NewEvent:
    return NewEvent(
        job_id,
        "stage",
        {"stage": stage, "state": "started", "batch_size": batch_size},
        progress={"stage": stage, "state": "running"},
    )


def stage_finished(job_id: str, stage: str, batch_size: int, seconds: float) -> NewEvent:
    return NewEvent(
        job_id,
        "stage",
        {"stage": stage, "state": "finished", "batch_size": batch_size, "seconds": round(seconds, 4)},
        progress={"stage": stage, "state": "finished"},
    )


def step_done(job_id: str, step: int, steps: int, seconds: float, rows: Optional[int] = None) -> NewEvent:
    data = {"step": step, "steps": steps, "seconds": round(seconds, 4)}
    if rows is not None:  # step-level batching: the rows (of any requests) the forward computed
        data["rows"] = rows
    return NewEvent(
        job_id,
        "step",
        data,
        progress={"stage": "denoiser", "state": "running", "step": step, "steps": steps},
    )


def preview(job_id: str, step: int, index: int, png: bytes, width: int, height: int) -> NewEvent:
    return NewEvent(
        job_id,
        "preview",
        {
            "step": step,
            "index": index,
            "b64_json": base64.b64encode(png).decode("ascii"),
            "size": f"{width}x{height}",
            "output_format": "png",
        },
    )


def cancelled(job_id: str, reason: str, stage: Optional[str] = None, steps_done: int = 0) -> NewEvent:
    data = {"reason": reason}
    if stage is not None:
        data.update(stage=stage, steps_done=steps_done)
    return NewEvent(job_id, "cancelled", data)

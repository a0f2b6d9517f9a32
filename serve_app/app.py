"""`build_app(args) -> Application`: the `import_path` of every config (`serve_app.app:build_app`).

It validates the args (`AppConfig`) and binds the graph ingress -> text encoder -> denoiser -> VAE
decoder, one such chain per served model; it never loads a model or runs anything. Each deployment module derives its Serve options
from the args (`deployment_options`); a config file's `deployments:` block may override them
(autoscaling, replicas, resources), except where that would break the app (`check_overrides`).
"""

from __future__ import annotations

from typing import Any, Optional

from ray.serve import Application

from serve_app.config import AppConfig


def build_graph(
    config: AppConfig, deployment_options: Optional[dict[str, dict[str, Any]]] = None
) -> Application:
    """Bind the DAG for a validated config: each served model gets its own text encoder, denoiser
    and VAE decoder deployments (named `TextEncoder`, ... for one model; `TextEncoder-<model>`, ...
    with `models:`), all behind one ingress. `deployment_options` maps a deployment name to Serve
    options laid over the defaults, as a config file's `deployments:` block would."""
    from deployments import denoiser, text_encoder, vae_decoder
    from serve_app import ingress

    extra = deployment_options or {}
    check_overrides(config, extra)

    def bound(module, deployment, view: AppConfig, name: str, *args):
        options = {
            **module.deployment_options(view),
            **stage_queue_options(view, deployment.name),
            **extra.get(name, {}),
        }
        return deployment.options(name=name, **options).bind(*args)

    chains = {}
    for model, view in config.views().items():
        suffix = config.deployment_suffix(model)
        chains[model] = [
            bound(module, deployment, view, deployment.name + suffix, view)
            for module, deployment in (
                (text_encoder, text_encoder.TextEncoder),
                (denoiser, denoiser.Denoiser),
                (vae_decoder, vae_decoder.VAEDecoder),
            )
        ]
    return bound(ingress, ingress.ImagesAPI, config, ingress.ImagesAPI.name, chains, config)


def stage_deployments(config: AppConfig) -> dict[str, tuple[str, str]]:
    """Deployment name -> (model, stage) for every stage deployment of the app."""
    return {
        name + config.deployment_suffix(model): (model, stage)
        for model in config.views()
        for name, stage in STAGE_NAMES.items()
    }


STAGE_NAMES = {"TextEncoder": "text_encoder", "Denoiser": "denoiser", "VAEDecoder": "vae_decoder"}


def stage_queue_options(config: AppConfig, deployment: str) -> dict[str, Any]:
    """A bounded queue in front of every stage (Serve's max_queued_requests; a full one raises
    BackPressureError in the caller, answered 429). Admission keeps at most `max_pending` requests
    in the app, each calling a stage once per attempt, so the default bound is never reached in
    normal operation: it is the safety net under admission, not the rule. `deployment`: the
    class's own name (TextEncoder, Denoiser, VAEDecoder, ImagesAPI)."""
    if deployment not in STAGE_NAMES:
        return {}
    admission = config.admission
    return {"max_queued_requests": admission.stage_max_queued_requests or 2 * admission.max_pending}


# The Denoiser's placement group is derived from the SP degree and worker resources in the args.
DENOISER_FIXED = ("placement_group_bundles", "placement_group_strategy")


def check_overrides(config: AppConfig, overrides: dict[str, dict[str, Any]]) -> None:
    """Refuse `deployments:` overrides that would break the app, with a message saying what to
    change instead. (A config deployed with `serve deploy` skips this; the Denoiser checks its
    placement group itself when it starts.)"""
    views = config.views()
    for name, (model, stage) in stage_deployments(config).items():
        view, options = views[model], overrides.get(name, {})
        if stage == "denoiser":
            _check_denoiser_overrides(view, name, options)
        limit = options.get("max_ongoing_requests")
        batch = getattr(view, stage).batching.max_batch_size
        if limit is not None and limit < batch:
            raise ValueError(
                f"deployments.{name}.max_ongoing_requests ({limit}) is below"
                f" {stage}.batching.max_batch_size ({batch}): its batches could never fill"
            )


def _check_denoiser_overrides(config: AppConfig, name: str, denoiser: dict[str, Any]) -> None:
    for key in DENOISER_FIXED:
        if key in denoiser:
            raise ValueError(
                f"deployments.{name}.{key} is derived from the app's args"
                " (denoiser.ulysses_degree, ring_degree, cfg_degree, worker_num_gpus,"
                " worker_num_cpus, replica_num_cpus); set those instead"
            )
    actor = denoiser.get("ray_actor_options", {})
    if actor.get("num_gpus"):
        raise ValueError(
            f"deployments.{name}.ray_actor_options.num_gpus: the replica holds no GPU itself;"
            " its workers do (denoiser.worker_num_gpus)"
        )
    if actor.get("num_cpus", config.denoiser.replica_num_cpus) > config.denoiser.replica_num_cpus:
        raise ValueError(
            f"deployments.{name}.ray_actor_options.num_cpus must fit its placement bundle:"
            " set denoiser.replica_num_cpus instead"
        )


def build_app(args: Optional[dict] = None) -> Application:
    """The import_path target: validate `args` (see AppConfig) and bind the DAG."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    return build_graph(config)

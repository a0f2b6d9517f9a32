"""`build_app(args) -> Application`: the `import_path` of every config (`serve_app.app:build_app`).

It validates the args (`AppConfig`) and binds the graph ingress -> text encoder -> denoiser -> VAE
decoder; it never loads a model or runs anything. Options set here are defaults derived from the
args: a config file's `deployments:` block overrides any of them (autoscaling, replicas, resources).
"""

from __future__ import annotations

from typing import Any, Optional

from ray.serve import Application

from serve_app.config import AppConfig


def stage_options(stage) -> dict[str, Any]:
    """A stage replica must accept a full batch while the previous one runs, or batches never
    fill (Serve caps a replica at max_ongoing_requests)."""
    return {"max_ongoing_requests": 2 * stage.batching.max_batch_size}


def denoiser_options(config: AppConfig) -> dict[str, Any]:
    """One placement bundle for the replica, one per worker (GPU) of its SP group, packed on one
    node; the replica actor itself needs exactly bundle 0."""
    from deployments.sp_group import bundle_resources

    dn = config.denoiser
    worker = bundle_resources(dn)
    return {
        **stage_options(dn),
        "ray_actor_options": {"num_cpus": dn.replica_num_cpus},
        "placement_group_bundles": [{"CPU": dn.replica_num_cpus}] + [worker] * dn.world_size,
        "placement_group_strategy": "STRICT_PACK",
    }


def build_graph(
    config: AppConfig, deployment_options: Optional[dict[str, dict[str, Any]]] = None
) -> Application:
    """Bind the DAG for a validated config. `deployment_options` maps a deployment name to Serve
    options laid over the defaults, as a config file's `deployments:` block would."""
    from deployments.denoiser import Denoiser
    from deployments.text_encoder import TextEncoder
    from deployments.vae_decoder import VAEDecoder
    from serve_app.ingress import ImagesAPI

    extra = deployment_options or {}

    def options(deployment, defaults: dict[str, Any]):
        return deployment.options(**{**defaults, **extra.get(deployment.name, {})})

    text_encoder = options(TextEncoder, stage_options(config.text_encoder)).bind(config)
    denoiser = options(Denoiser, denoiser_options(config)).bind(config)
    vae_decoder = options(VAEDecoder, stage_options(config.vae_decoder)).bind(config)
    return options(ImagesAPI, {}).bind(text_encoder, denoiser, vae_decoder, config)


def build_app(args: Optional[dict] = None) -> Application:
    """The import_path target: validate `args` (see AppConfig) and bind the DAG."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    return build_graph(config)

"""Where result images live (url-format images, async jobs' results): a folder of this node, or
an S3-compatible bucket that every node shares. Chosen by the `image_store` config block.

    store = open_image_store(config)
    name = store.save(data, "png", owner, expires_at)  # in a thread: calls block
    store.read(name, owner)  # (bytes, media type); None: malformed, missing, not owner's, expired
    store.delete(name); store.sweep(time.time()); store.close()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serve_app.image_store.base import NAME_RE, ImageStore, media_type_of
from serve_app.image_store.local import LocalImageStore
from serve_app.image_store.s3 import S3ImageStore

if TYPE_CHECKING:
    from serve_app.config import AppConfig

__all__ = [
    "NAME_RE",
    "ImageStore",
    "LocalImageStore",
    "S3ImageStore",
    "default_s3_prefix",
    "media_type_of",
    "open_image_store",
]


def default_s3_prefix(model_name: str) -> str:
    """`dit-serve/<model>/`: each model's images apart, as its job queue is."""
    from deployments.stage import store_namespace

    return f"dit-serve/{store_namespace(model_name)}/"


def open_image_store(config: "AppConfig") -> ImageStore:
    """This process's image store, as the config says (its S3 prefix filled in if unset)."""
    settings = config.image_store
    if settings.backend == "s3":
        s3 = settings.s3
        return S3ImageStore(
            bucket=s3.bucket,
            prefix=default_s3_prefix(config.store_key) if s3.prefix is None else s3.prefix,
            endpoint_url=s3.endpoint_url,
            region=s3.region,
            create_bucket=s3.create_bucket,
            addressing_style=s3.addressing_style,
        )
    return LocalImageStore(settings.directory)

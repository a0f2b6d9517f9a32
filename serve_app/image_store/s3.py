"""Images in an S3 bucket (AWS, or any S3-compatible server: MinIO, Ceph RGW), shared by every
node of a cluster.

Layout under the store's prefix:

- `images/<name>`: the encoded image, its media type as Content-Type, its owner (percent-encoded)
  and expiry (Unix time) as object metadata. Reads check both before a byte of the body is read.
- `expiry/<ms>.<name>`: an empty marker per image, `<ms>` its expiry in milliseconds, 15 digits.
  S3 lists keys in order, so `sweep` reads only the markers that are due (plus one page), instead
  of asking every object for its metadata. The marker is written before the image: an image never
  exists without its marker (a marker without an image is harmless: it goes at its time).

Credentials come from the standard AWS chain (environment, shared files, instance or pod roles),
never from the app config. boto3 is imported here only, when a store is made.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Optional
from urllib.parse import quote, unquote

from serve_app.image_store.base import (
    ImageStore,
    check_owner_and_expiry,
    media_type_of,
    new_name,
    servable,
)

logger = logging.getLogger("dit_serve")

STAMP_DIGITS = 15
BATCH = 1000  # S3's most keys per list page and per DeleteObjects call


def _stamp(expires_at: float) -> str:
    """Expiry in whole milliseconds, rounded up (a marker is never due before its image)."""
    return f"{math.ceil(expires_at * 1000):0{STAMP_DIGITS}d}"


def _status(exc) -> Optional[int]:
    """The HTTP status of a botocore ClientError."""
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


class S3ImageStore(ImageStore):
    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint_url: Optional[str] = None,
        region: Optional[str] = None,
        create_bucket: bool = False,
        addressing_style: Optional[str] = None,
        max_connections: int = 32,
        batch: int = BATCH,
    ):
        import boto3
        from botocore.config import Config

        if not 1 <= batch <= BATCH:
            raise ValueError(f"batch must be 1 to {BATCH} keys")
        self.bucket = bucket
        self.prefix = prefix
        self.batch = batch
        style = addressing_style or ("path" if endpoint_url else "auto")
        config = Config(
            s3={"addressing_style": style},
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=max_connections,  # callers run many calls at once in threads
            # Plain PutObject bodies: S3-compatible servers differ on the newer checksum trailers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()  # a session of its own: boto3's default is shared
        self._client = session.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self._errors = self._client.exceptions
        try:
            self._check_bucket(create_bucket)
        except BaseException:
            self._client.close()
            raise

    def _check_bucket(self, create: bool) -> None:
        """Fail at start, with the bucket's name, rather than on the first image."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except self._errors.ClientError as exc:
            status = _status(exc)
            if status != 404 or not create:
                why = "it does not exist (create it or set create_bucket)" if status == 404 else exc
                raise RuntimeError(f"image store bucket {self.bucket!r}: {why}") from exc
        args = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**args)
            logger.info("image store: created bucket %s", self.bucket)
        except self._errors.BucketAlreadyOwnedByYou:
            pass  # another replica made it first

    def _image_key(self, name: str) -> str:
        return f"{self.prefix}images/{name}"

    @property
    def _marker_prefix(self) -> str:
        return f"{self.prefix}expiry/"

    def save(self, data: bytes, fmt: str, owner: str, expires_at: float) -> str:
        name = new_name(fmt)
        check_owner_and_expiry(owner, expires_at)
        marker = f"{self._marker_prefix}{_stamp(expires_at)}.{name}"
        self._client.put_object(Bucket=self.bucket, Key=marker, Body=b"")
        self._client.put_object(
            Bucket=self.bucket,
            Key=self._image_key(name),
            Body=data,
            ContentType=media_type_of(name),
            Metadata={"owner": quote(owner, safe=""), "expires-at": repr(float(expires_at))},
        )
        return name

    def read(self, name: str, owner: str) -> Optional[tuple[bytes, str]]:
        media_type = media_type_of(name)
        if media_type is None:
            return None
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._image_key(name))
        except self._errors.ClientError as exc:
            if _status(exc) == 404:
                return None
            raise
        body = response["Body"]
        try:
            meta = response.get("Metadata", {})
            try:
                stored_owner, expires_at = unquote(meta["owner"]), float(meta["expires-at"])
            except (KeyError, ValueError):
                return None  # not written by an image store
            if not servable(stored_owner, expires_at, owner, time.time()):
                return None
            return body.read(), media_type
        finally:
            body.close()

    def delete(self, name: str) -> None:
        """Removes the image now; its marker goes when it falls due."""
        if media_type_of(name) is not None:
            self._client.delete_object(Bucket=self.bucket, Key=self._image_key(name))

    def sweep(self, now: float) -> int:
        """Delete every image (and marker) whose marker is due, oldest first. The count includes
        images that `delete` had already removed (S3 reports a missing key as deleted)."""
        due = f"{math.floor(now * 1000):0{STAMP_DIGITS}d}"
        batch: list[tuple[str, Optional[str]]] = []  # (marker, its image's key)
        removed = 0
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket,
            Prefix=self._marker_prefix,
            PaginationConfig={"PageSize": self.batch},
        )
        for page in pages:
            for item in page.get("Contents", ()):
                stamp, _, name = item["Key"][len(self._marker_prefix) :].partition(".")
                if stamp > due:  # fixed-width digits: string order is time order
                    return removed + self._delete(batch)
                image = self._image_key(name) if media_type_of(name) is not None else None
                batch.append((item["Key"], image))
                if len(batch) >= self.batch:
                    removed += self._delete(batch)
                    batch = []
        return removed + self._delete(batch)

    def _delete(self, batch: list[tuple[str, Optional[str]]]) -> int:
        """Delete the images, then the markers of those that went (a failed image keeps its
        marker, so a later sweep tries again); how many images went."""
        images = [image for _, image in batch if image is not None]
        failed = self._delete_keys(images)
        self._delete_keys([marker for marker, image in batch if image not in failed])
        return len(images) - len(failed)

    def _delete_keys(self, keys: list[str]) -> set[str]:
        """One DeleteObjects call; the keys it could not delete."""
        if not keys:
            return set()
        response = self._client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
        )
        errors = response.get("Errors", ())
        for error in errors:
            logger.warning("image store: cannot delete %s: %s", error["Key"], error.get("Message"))
        return {error["Key"] for error in errors}

    def close(self) -> None:
        self._client.close()

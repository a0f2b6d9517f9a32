"""Images in one folder of this node (or a shared file system): private to this user.

Each image is one file named by the image's name, written atomically (a temporary file, then a
rename): a header line `DITIMG1 {"owner": ..., "expires_at": ...}` followed by the encoded bytes.
Owner and expiry thus travel with the image in a single rename, never half-written. Several stores
(ingress replicas on one node) may share a folder: names never collide, and reads, deletes and
sweeps of one another's images are safe.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Optional

from serve_app.image_store.base import (
    ImageStore,
    check_owner_and_expiry,
    media_type_of,
    new_name,
    servable,
)

logger = logging.getLogger("dit_serve")

MAGIC = b"DITIMG1 "
MAX_HEADER = 4096
TMP_SUFFIX = ".tmp"
STALE_TMP_S = 3600.0  # a temporary file this old was left by a writer that died


def _header(owner: str, expires_at: float) -> bytes:
    meta = json.dumps({"owner": owner, "expires_at": float(expires_at)}, separators=(",", ":"))
    return MAGIC + meta.encode("utf-8") + b"\n"


def _parse_header(line: bytes) -> Optional[tuple[str, float]]:
    """(owner, expires_at) of a header line, or None when it is not one of ours."""
    if not line.startswith(MAGIC) or not line.endswith(b"\n"):
        return None
    try:
        meta = json.loads(line[len(MAGIC) :])
        owner, expires_at = meta["owner"], meta["expires_at"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(owner, str) or not isinstance(expires_at, (int, float)):
        return None
    return owner, float(expires_at)


class LocalImageStore(ImageStore):
    """One folder, 0700, its files 0600. Default: `images/` in the data folder."""

    def __init__(self, directory: Optional[str] = None):
        from deployments.stage import data_dir

        self.directory = Path(directory) if directory else data_dir() / "images"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)  # mkdir's mode is masked, and the folder may be older

    def save(self, data: bytes, fmt: str, owner: str, expires_at: float) -> str:
        name = new_name(fmt)
        check_owner_and_expiry(owner, expires_at)
        tmp = self.directory / f".{name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_header(owner, expires_at))
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.directory / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return name

    def read(self, name: str, owner: str) -> Optional[tuple[bytes, str]]:
        media_type = media_type_of(name)
        if media_type is None:
            return None
        try:
            with open(self.directory / name, "rb") as f:
                meta = _parse_header(f.readline(MAX_HEADER))
                if meta is None or not servable(*meta, owner, time.time()):
                    return None
                return f.read(), media_type
        except (FileNotFoundError, IsADirectoryError):
            return None

    def delete(self, name: str) -> None:
        if media_type_of(name) is not None:
            (self.directory / name).unlink(missing_ok=True)

    def sweep(self, now: float) -> int:
        """Scan the folder: delete expired images and files that are not images of ours (a
        broken header), and temporary files their writer left behind."""
        removed = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if media_type_of(entry.name) is not None:
                    if self._expired(entry.path, now):
                        removed += self._unlink(entry.path)
                elif entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX):
                    if self._stale(entry, now):
                        self._unlink(entry.path)
        return removed

    @staticmethod
    def _expired(path: str, now: float) -> bool:
        try:
            with open(path, "rb") as f:
                meta = _parse_header(f.readline(MAX_HEADER))
        except (FileNotFoundError, IsADirectoryError):
            return False
        if meta is None:
            logger.warning("image store: %s is not an image of ours; deleting it", path)
            return True
        return meta[1] <= now

    @staticmethod
    def _stale(entry: os.DirEntry, now: float) -> bool:
        try:
            return entry.stat(follow_symlinks=False).st_mtime < now - STALE_TMP_S
        except FileNotFoundError:
            return False

    @staticmethod
    def _unlink(path: str) -> int:
        try:
            os.unlink(path)
            return 1
        except FileNotFoundError:  # another replica's sweep got there first
            return 0

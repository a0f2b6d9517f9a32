"""A local store for `response_format=url` images: unguessable names, no path traversal.

A name is 32 random URL-safe characters plus the format's extension; lookups accept only names of
exactly that shape, so `..`, slashes or any other path never reach the file system.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Optional

from deployments.image_codec import MIME_TYPES

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{32}\.(png|jpeg|webp)$")


class LocalImageStore:
    """Images in one folder of this node, readable by this user only (0700)."""

    def __init__(self, directory: Optional[str] = None):
        from deployments.stage import data_dir

        self.directory = Path(directory) if directory else data_dir() / "images"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def save(self, data: bytes, fmt: str) -> str:
        """Write the image atomically and return its name."""
        name = f"{secrets.token_urlsafe(24)}.{fmt}"
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.directory / name)
        return name

    def read(self, name: str) -> Optional[bytes]:
        found = self.lookup(name)
        return None if found is None else found[0].read_bytes()

    def delete(self, name: str) -> None:
        if NAME_RE.match(name):
            (self.directory / name).unlink(missing_ok=True)

    def lookup(self, name: str) -> Optional[tuple[Path, str]]:
        """(path, media type) of a stored image, or None for any name that is not one."""
        match = NAME_RE.match(name)
        if not match:
            return None
        path = self.directory / name
        if not path.is_file():
            return None
        return path, MIME_TYPES[match[1]]

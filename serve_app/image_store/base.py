"""What every image store shares: the interface, the shape of a name, and the owner and expiry
checks.

A name is 32 random URL-safe characters, a dot and the format (`png`, `jpeg`, `webp`): it cannot be
guessed, and it is the only key a store accepts. Any other string (`../x`, `a/b.png`, a NUL, a
newline, 31 characters, another extension) is refused before a file system or a bucket is asked.
"""

from __future__ import annotations

import abc
import hmac
import math
import re
import secrets
from typing import Optional

from deployments.image_codec import MIME_TYPES

NAME_RE = re.compile(r"[A-Za-z0-9_-]{32}\.(png|jpeg|webp)")
MAX_OWNER_BYTES = 256


def media_type_of(name: str) -> Optional[str]:
    """The media type of a well-formed image name; None for anything else."""
    match = NAME_RE.fullmatch(name) if isinstance(name, str) else None
    return MIME_TYPES[match[1]] if match else None


def new_name(fmt: str) -> str:
    """A fresh, unguessable name (24 random bytes: 32 URL-safe characters)."""
    if fmt not in MIME_TYPES:
        raise ValueError(f"unknown image format {fmt!r}; known: {sorted(MIME_TYPES)}")
    return f"{secrets.token_urlsafe(24)}.{fmt}"


def check_owner_and_expiry(owner: str, expires_at: float) -> None:
    """What `save` refuses: an empty or oversized owner, an expiry that is not a finite time."""
    if not isinstance(owner, str) or not 0 < len(owner.encode("utf-8")) <= MAX_OWNER_BYTES:
        raise ValueError(f"an image owner must be 1 to {MAX_OWNER_BYTES} bytes of UTF-8")
    if not isinstance(expires_at, (int, float)) or not math.isfinite(expires_at):
        raise ValueError(f"expires_at must be a finite Unix time, got {expires_at!r}")


def same_owner(stored: str, asked: str) -> bool:
    """Constant-time owner comparison (on UTF-8 bytes: compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(stored.encode("utf-8"), asked.encode("utf-8"))


def servable(stored_owner: str, expires_at: float, owner: str, now: float) -> bool:
    """An image is served to its owner only, and never once its expiry has passed (even if no
    sweep has deleted it yet)."""
    return same_owner(stored_owner, owner) and now < expires_at


class ImageStore(abc.ABC):
    """Result images kept for a while, each owned by one tenant.

    Calls are synchronous and may block on disk or network: callers on an event loop run them in
    a thread (`asyncio.to_thread`). Every implementation is safe to call from several threads.
    """

    @abc.abstractmethod
    def save(self, data: bytes, fmt: str, owner: str, expires_at: float) -> str:
        """Store `data` (an encoded `fmt` image) for `owner` until `expires_at` (Unix time);
        returns its new name. Raises ValueError for an unknown format, owner or expiry."""

    @abc.abstractmethod
    def read(self, name: str, owner: str) -> Optional[tuple[bytes, str]]:
        """(bytes, media type) of an image, or None when the name is malformed, no image has it,
        it belongs to another owner, or it has expired."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove an image; a malformed or unknown name is a no-op."""

    @abc.abstractmethod
    def sweep(self, now: float) -> int:
        """Delete the images whose expiry is at or before `now`; how many were removed."""

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""

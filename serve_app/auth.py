"""API keys: who a request acts for.

Keys are configured only as SHA-256 hashes (in the config, an environment variable or a file), so
no config file or log ever holds a usable key. A presented key is hashed and compared with every
configured hash in constant time (`hmac.compare_digest`, no early exit), so timing tells nothing
about which bytes matched. Without configured keys authentication is off and every request acts
for one tenant, `anonymous`.

`AuthMiddleware` (pure ASGI) answers 401 for requests without a valid key, except on the open
paths (liveness, readiness, API docs, CORS preflights), and puts the tenant in the request's
`state` for the routes (`context.owner_of`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from serve_app.config import KEY_NAME_RE, AuthConfig

ANONYMOUS = "anonymous"
ENTRY_RE = re.compile(r"^([A-Za-z0-9._-]{1,64}):([0-9a-f]{64})$")
OPEN_PATHS = frozenset({"/health", "/ready", "/docs", "/openapi.json", "/docs/oauth2-redirect"})
OPEN_PREFIXES = ("/docs/static/",)


@dataclass(frozen=True)
class Tenant:
    name: str
    requests_per_minute: Optional[int] = None  # None: the app's default
    max_active: Optional[int] = None


class KeyRing:
    def __init__(self, entries: list[tuple[str, bytes, Tenant]]):
        self._entries = entries  # (name, sha256 digest, tenant)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    @classmethod
    def from_config(cls, config: AuthConfig) -> "KeyRing":
        """Every configured key; a named source that is missing or malformed fails loudly (an app
        that meant to require keys must not start open)."""
        entries = [
            (k.name, bytes.fromhex(k.sha256), Tenant(k.name, k.requests_per_minute, k.max_active))
            for k in config.keys
        ]
        if config.keys_env:
            text = os.environ.get(config.keys_env)
            if not text:
                raise ValueError(f"auth.keys_env: environment variable {config.keys_env} is not set")
            entries += _parse(text, f"${config.keys_env}")
        if config.keys_file:
            entries += _parse(Path(config.keys_file).read_text(), config.keys_file)
        if config.enabled and not entries:
            raise ValueError("auth is configured but no key was found")
        return cls(entries)

    def tenant(self, authorization: Optional[str]) -> Optional[Tenant]:
        """The tenant of an `Authorization: Bearer <key>` header, or None."""
        if not self.enabled:
            return Tenant(ANONYMOUS)
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        digest = hashlib.sha256(key.strip().encode("utf-8", "surrogatepass")).digest()
        found = None
        for _, expected, tenant in self._entries:  # no early exit: the same work for every key
            if hmac.compare_digest(digest, expected):
                found = tenant
        return found


def _parse(text: str, source: str) -> list[tuple[str, bytes, Tenant]]:
    entries = []
    for raw in re.split(r"[,\n]", text):
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        match = ENTRY_RE.match(item)
        if not match:
            raise ValueError(
                f"{source}: entries must be name:sha256 (name {KEY_NAME_RE}, 64 lowercase hex"
                " characters); got an entry that is not"
            )
        entries.append((match[1], bytes.fromhex(match[2]), Tenant(match[1])))
    return entries


def hash_key(key: str) -> str:
    """What goes in the config for `key`."""
    return hashlib.sha256(key.encode()).hexdigest()


class AuthMiddleware:
    """401 without a valid key (open paths excepted); the tenant goes to `scope["state"]`."""

    def __init__(self, app, keys: KeyRing):
        self.app = app
        self.keys = keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # the app mounted under a route prefix
            path = path[len(root):] or "/"
        headers = dict(scope.get("headers") or [])
        preflight = scope.get("method") == "OPTIONS" and b"access-control-request-method" in headers
        is_open = path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or preflight
        tenant = self.keys.tenant(headers.get(b"authorization", b"").decode("latin-1") or None)
        if tenant is None and not is_open:
            return await _unauthorized(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = tenant or Tenant(ANONYMOUS)
        return await self.app(scope, receive, send)


async def _unauthorized(scope, receive, send) -> None:
    """The 401, in the shape of every error (Serve's proxy adds X-Request-ID, as to every response)."""
    from deployments.errors import Unauthorized
    from serve_app.asgi import request_id
    from serve_app.errors import error_response

    error = Unauthorized("a valid API key is required: send `Authorization: Bearer <key>`", "Authorization")
    response = error_response(error, request_id(scope))
    response.headers["WWW-Authenticate"] = 'Bearer realm="dit-serve"'
    await response(scope, receive, send)

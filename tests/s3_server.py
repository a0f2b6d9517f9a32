"""A throwaway S3-compatible server for tests: moto's, on 127.0.0.1 at a free port, in a thread
of the test process. Clients reach it over real HTTP, as they would MinIO or AWS.

moto accepts any credentials; `TEST_CREDENTIALS` are the AWS environment variables a test sets
(with monkeypatch) so the standard credential chain finds them and never a developer's own.
"""

from __future__ import annotations

import logging
from typing import Optional

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "dit-serve-test",
    "AWS_SECRET_ACCESS_KEY": "dit-serve-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/dit-serve-test/config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/dit-serve-test/credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL")


class S3Server:
    """`start()` serves on a port the OS picks (no race for it); `stop()` shuts it down."""

    def __init__(self) -> None:
        self._server = None
        self.url: Optional[str] = None

    def start(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

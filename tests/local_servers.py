"""Servers on 127.0.0.1 for the remote-store tests: S3 (moto), GCS (an emulator), HTTPS."""

from __future__ import annotations

import functools
import http.server
import logging
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

#: Credentials moto accepts (any, until its authentication is switched on).
S3_KEY, S3_SECRET = "AKIAGPUPATCHINGTEST0", "gpu-patching-test-secret-value-0123456789"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_s3_server() -> tuple[Any, str]:
    """Start moto's S3 server on a free port; return it (``.stop()`` ends it) and its endpoint."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def s3_options(endpoint: str, key: str = S3_KEY, secret: str = S3_SECRET) -> dict[str, str]:
    """The storage_options of an ``s3://`` URL served by ``endpoint``."""
    return {"endpoint_url": endpoint, "key": key, "secret": secret}


def start_gcs_server(bucket: str) -> tuple[Any, str]:
    """Start gcp-storage-emulator (in memory, with ``bucket``) on a free port: it and its URL.

    The emulator is a thread of this process serving Google Cloud Storage's
    JSON API over HTTP; ``.stop()`` ends it.
    """
    from gcp_storage_emulator.server import create_server

    # It logs an error for every object it does not have: zarr asks for several.
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    return server, f"http://127.0.0.1:{port}"


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    """Serves a folder's files, without a log line per request."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _CountingServer(http.server.ThreadingHTTPServer):
    """An HTTP server that counts the connections it accepts (``.connections``).

    Over TLS a connection is counted before its handshake, so a client that
    refuses the server's certificate is counted too.
    """

    connections = 0

    def get_request(self) -> Any:
        self.connections += 1
        return super().get_request()


def start_https_server(folder: Path, certificate: Any, port: int = 0) -> tuple[Any, str]:
    """Serve ``folder`` over HTTPS on 127.0.0.1; return the server and its URL.

    ``certificate`` is a ``trustme`` leaf certificate for ``127.0.0.1``;
    ``port`` 0 takes a free one. The server answers from a thread of this
    process and counts the connections it accepts (``.connections``);
    ``.shutdown()`` and ``.server_close()`` end it.
    """
    handler = functools.partial(_QuietFiles, directory=str(folder))
    server = _CountingServer(("127.0.0.1", port), handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="https_server", daemon=True).start()
    return server, f"https://127.0.0.1:{server.server_address[1]}"

"""A network tripwire for tests: an HTTP(S) proxy on loopback that forwards nothing and
records every attempt, with an environment that routes every proxy-aware client (and the
Hugging Face Hub's endpoint) to it."""

import os
import socketserver
import threading

import pytest

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class _Tripwire(socketserver.ThreadingTCPServer):
    """An HTTP(S) proxy on loopback that forwards nothing and records every attempt."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.attempts: list[bytes] = []

        class Handler(socketserver.StreamRequestHandler):
            def handle(handler) -> None:  # noqa: N805
                self.attempts.append(handler.rfile.readline(4096))
                handler.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def tripwire():
    server = _Tripwire()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    env = dict(os.environ)
    env.update({name: url for name in PROXY_VARIABLES})
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"  # the consortium itself is on loopback
    env["HF_ENDPOINT"] = url  # a Hub call, were one attempted, lands here too
    env.pop("HF_HUB_OFFLINE", None)  # fedgen must switch the Hub off itself
    try:
        yield server, env
    finally:
        server.shutdown()
        server.server_close()

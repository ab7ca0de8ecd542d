"""The aggregator's SuperLink with mutual TLS: the one module that touches Flower internals.

Flower 1.41 serves its whole SuperLink (Fleet, Control and Runtime APIs) as one FastAPI
app behind uvicorn, with server-side TLS only (no client certificates; upstream
flwrlabs/flower#6896). fedgen builds the stock app with Flower's own config parser and
``flwr.superlink.main.create_app``, then serves that one app object twice:

* a public listener that requires a client certificate issued by the consortium CA and
  not on its CRL (checked in the TLS handshake), serves the Fleet API only, and binds
  each request to its certificate: the SuperNode's signing key (Flower's node identity)
  must be the key of the certificate it presented, so site A cannot act as site B;
* a loopback-only listener for the Control and Runtime APIs, which have no
  authentication in open-source Flower and must never face the network.

Pinned to Flower 1.41; ``check_flower_version`` and the tests in
``tests/integration/test_flower_internals.py`` fail loudly when Flower changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import sys
import time
from base64 import b64decode
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flwr
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER
from uvicorn.protocols.http.h11_impl import H11Protocol

FLOWER_SERIES = "1.41."
FLEET_PREFIX = "/v1/fleet/"
# The header in which a SuperNode sends the public key that signs its requests.
NODE_PUBLIC_KEY_HEADER = FLEET_HTTP_PUBLIC_KEY_HEADER.encode("ascii")
PEER_CERT_SCOPE_KEY = "fedgen.peer_certificate"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def check_flower_version() -> None:
    """Refuse to start against a Flower release this glue was not written for."""
    if not flwr.__version__.startswith(FLOWER_SERIES):
        raise RuntimeError(
            f"fedgen's mutual-TLS SuperLink glue is written for Flower {FLOWER_SERIES}x; "
            f"found {flwr.__version__}. Install flwr>=1.41,<1.42."
        )


def build_superlink_app(*, runtime_port: int, database: Path) -> Any:
    """Build the stock SuperLink FastAPI app, its APIs bound to loopback ``runtime_port``.

    Flower's own argument parser builds the configuration, so every default (SuperExec
    isolation, state factories, plugins) is the stock one. Runtime dependency
    installation is off: a sovereign aggregator never runs ``uv sync``.
    """
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    argv = [
        "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(runtime_port),
        "--database", str(database), "--disable-runtime-dependency-installation",
    ]
    saved, sys.argv = sys.argv, argv
    try:
        config = _parse_superlink_lifespan_config()
    finally:
        sys.argv = saved
    return create_app(config, SuperLinkLifespan)


def public_key_pem(certificate: x509.Certificate) -> bytes:
    """The certificate's public key as Flower encodes node keys (PEM SubjectPublicKeyInfo)."""
    return certificate.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class PeerCertificateProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol that hands the TLS peer certificate to the app.

    uvicorn does not expose it; the certificate is read once per connection and put
    into every request's scope.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        inner = self.app

        async def with_peer(scope: Scope, receive: Receive, send: Send) -> None:
            scope[PEER_CERT_SCOPE_KEY] = der
            await inner(scope, receive, send)

        self.app = with_peer


async def _reject(send: Send, status: int, detail: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": detail})


def fleet_gate(app: ASGIApp) -> ASGIApp:
    """Serve only the Fleet API, and only to the holder of the signing key's certificate.

    401, not 403, on an identity mismatch: a Flower SuperNode shuts down on 401 and
    would retry forever on 403.
    """

    async def gate(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await app(scope, receive, send)
            return
        if scope["type"] != "http" or not scope["path"].startswith(FLEET_PREFIX):
            await _reject(send, 404, b"not found")
            return
        der = scope.get(PEER_CERT_SCOPE_KEY)
        claimed = dict(scope["headers"]).get(NODE_PUBLIC_KEY_HEADER)
        if der is None or claimed is None:
            await _reject(send, 401, b"client certificate and node key required")
            return
        try:
            presented = public_key_pem(x509.load_der_x509_certificate(der))
            matches = b64decode(claimed, validate=True) == presented
        except ValueError:
            matches = False
        if not matches:
            await _reject(send, 401, b"node key does not belong to the client certificate")
            return
        await app(scope, receive, send)

    return gate


@dataclass(frozen=True)
class FleetTLS:
    """Files of the public Fleet listener's mutual TLS."""

    certificate: Path  # the aggregator's server certificate
    private_key: Path
    ca_certificate: Path  # the consortium CA: the only issuer of client certificates
    crl: Path  # revoked site certificates


def fleet_ssl_context(tls: FleetTLS) -> ssl.SSLContext:
    """TLS 1.2+ server context: client certificate required, issued by the CA, not revoked."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    context.load_verify_locations(cafile=str(tls.ca_certificate))
    context.load_verify_locations(cafile=str(tls.crl))
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
    return context


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `serve`: two servers in one process must
    stop together, and uvicorn would re-raise the signal (killing the process) before
    the cleanup after them ran."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def superlink_servers(app: Any, *, public_host: str, fleet_port: int, runtime_port: int,
                      tls: FleetTLS, log_level: str = "warning") -> tuple[uvicorn.Server, uvicorn.Server]:
    """The two uvicorn servers over one app: (loopback Control+Runtime, public Fleet).

    Only the loopback server runs the app's lifespan (which starts Flower's SuperExec),
    so it runs once.
    """
    local = _Server(uvicorn.Config(
        app, host="127.0.0.1", port=runtime_port, lifespan="on", log_level=log_level,
        access_log=False, workers=1,
    ))
    public = _Server(uvicorn.Config(
        fleet_gate(app), host=public_host, port=fleet_port, lifespan="off", log_level=log_level,
        access_log=False, workers=1, http=PeerCertificateProtocol,
        ssl_certfile=str(tls.certificate),  # uvicorn needs it set; the factory builds the context
        ssl_context_factory=lambda config, default: fleet_ssl_context(tls),
    ))
    return local, public


def _superexec_pid(app: Any) -> int | None:
    """Process id of the SuperExec that Flower's lifespan started (it starts ServerApps)."""
    lifespan = getattr(app.state, "superlink_lifespan", None)
    process = getattr(lifespan, "superexec_process", None)
    return None if process is None else process.pid


def _stop_session(leader: int) -> None:
    """Stop a detached process session: Flower starts SuperExec in its own, and a stopped
    SuperExec leaves its running ServerApp behind for a few seconds otherwise."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(leader, sig)
        except ProcessLookupError:
            return
        time.sleep(1.0)


async def serve(app: Any, local: uvicorn.Server, public: uvicorn.Server) -> None:
    """Run both servers until either stops or SIGINT/SIGTERM arrives; the public one starts
    only once state is up. Flower's SuperExec and its ServerApps are stopped last."""

    def stop(signum: int, frame: object) -> None:
        if local.should_exit and signum == signal.SIGINT:
            local.force_exit = public.force_exit = True  # a second Ctrl-C
        local.should_exit = public.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    local_task = asyncio.create_task(local.serve())
    while not local.started:
        if local_task.done():
            await local_task  # re-raise why the loopback server could not start
            return
        await asyncio.sleep(0.05)
    superexec = _superexec_pid(app)
    public_task = asyncio.create_task(public.serve())
    try:
        done, _ = await asyncio.wait({local_task, public_task}, return_when=asyncio.FIRST_COMPLETED)
        local.should_exit = public.should_exit = True
        await asyncio.gather(local_task, public_task, return_exceptions=True)
        for task in done:
            task.result()
    finally:
        if superexec is not None:
            _stop_session(superexec)

"""The aggregator's SuperLink with mutual TLS: the one module that touches Flower internals.

Flower 1.41 serves its whole SuperLink (Fleet, Control and Runtime APIs) as one FastAPI
app behind uvicorn, with server-side TLS only (no client certificates; upstream
flwrlabs/flower#6896). fedgen builds the stock app with Flower's own config parser and
``flwr.superlink.main.create_app``, then serves that one app object twice:

* a public listener whose TLS handshake (`server.door`) requires a client certificate
  issued by the consortium CA and within its validity, that serves the Fleet API only,
  and lets a request through only if the certificate is not on the CRL in force (re-read
  when it changes) and the SuperNode's signing key (Flower's node identity) is the key of
  that certificate, so site A cannot act as site B and a revoked site gets nothing;
* a loopback-only listener for the Control and Runtime APIs, which have no
  authentication in open-source Flower and must never face the network.

A site's node lasts as long as its certificate: the listener never lets a node
unregister (Flower 1.41 then refuses that key for good) and lets a site that restarts
after a crash replace its stale session, so a site rejoins as itself after a crash, a
clean stop or an aggregator restart.

The ServerApp that Flower's SuperExec starts for a run waits for the sites' replies by
polling the SuperLink every 3 s (``HttpGrid.send_and_receive``); `prompt_replies` makes
its grid poll every `REPLY_POLL_SECONDS` instead, through Flower's public ``Grid`` API,
and the aggregator's SuperExec looks for runs at fedgen's pace
(`fedgen.flower_pin.prompt_superexec_polling`). ``FEDGEN_STOCK_FLOWER_POLLING=1`` keeps
Flower's pace (the round-overhead benchmark's baseline).

Pinned to `fedgen.flower_pin.FLOWER_SERIES`; ``check_flower_version`` and the tests in
``tests/integration/test_flower_internals.py`` fail loudly when Flower changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from base64 import b64decode
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER

from fedgen.config import AggregatorTLSConfig
from fedgen.flower_pin import check_flower_version as check_flower_series
from fedgen.flower_pin import stock_polling
from fedgen.pki import PKIError, load_certificate, site_id_of

from .door import (
    BAD_CERTIFICATE,
    IDENTITY_MISMATCH,
    NO_CERTIFICATE,
    PEER_CERT_SCOPE_KEY,
    REVOKED,
    RefusalLog,
    RevocationList,
    door_protocol,
    door_ssl_context,
)
from .fleet_registry import FleetRegistry

log = logging.getLogger(__name__)
FLEET_PREFIX = "/v1/fleet/"
# The header in which a SuperNode sends the public key that signs its requests.
NODE_PUBLIC_KEY_HEADER = FLEET_HTTP_PUBLIC_KEY_HEADER.encode("ascii")
ACTIVATE_PATH = FLEET_PREFIX + "activate-node"
UNREGISTER_PATH = FLEET_PREFIX + "unregister-node"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# The ServerApp asks its SuperLink, over loopback, for replies this often (Flower: every 3 s).
REPLY_POLL_SECONDS = 0.1


def prompt_replies(grid: Any, poll_seconds: float = REPLY_POLL_SECONDS) -> None:
    """Make ``grid`` (a ServerApp's ``flwr.serverapp.Grid``) look for replies every
    ``poll_seconds`` in ``send_and_receive``, unless ``FEDGEN_STOCK_FLOWER_POLLING=1``.

    The replacement keeps the contract of ``Grid.send_and_receive``: push with
    ``push_messages`` at once, pull with ``pull_messages`` until every message has its
    reply or ``timeout`` (seconds, None: no limit) has passed, and give the replies
    received. It gives them as they arrive, one pulled at a time, so a strategy that
    accumulates (`fedgen.strategies.recorder`) holds one reply at once, not all of them:
    Flower's own ``pull_messages`` inflates every reply it is asked for into one list.
    """
    if stock_polling():
        return

    def send_and_receive(messages: Iterable[Any], *, timeout: float | None = None) -> Iterator[Any]:
        pending = [message_id for message_id in grid.push_messages(messages) if message_id]
        deadline = None if timeout is None else time.monotonic() + timeout

        def replies() -> Iterator[Any]:
            while pending:
                arrived = False
                for message_id in list(pending):
                    received = list(grid.pull_messages([message_id]))
                    while received:
                        reply = received.pop()
                        arrived = True
                        if reply.metadata.reply_to_message_id in pending:
                            pending.remove(reply.metadata.reply_to_message_id)
                        yield reply
                        del reply  # held here no longer than by the caller
                left = None if deadline is None else deadline - time.monotonic()
                if not pending or (left is not None and left <= 0):
                    return
                if not arrived:
                    time.sleep(poll_seconds if left is None else min(poll_seconds, left))

        return replies()

    grid.send_and_receive = send_and_receive


def check_flower_version() -> None:
    """Refuse to start against a Flower release this glue was not written for."""
    check_flower_series("mutual-TLS SuperLink glue")


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
        "flower-superlink",
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        "--database",
        str(database),
        "--disable-runtime-dependency-installation",
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


async def _reject(send: Send, status: int, detail: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": detail})


class FleetDoor:
    """What the public listener decides per request, and the Flower node state it touches.

    It binds each Flower node to the certificate that holds the node's key (written to
    the fleet registry, so the ServerApp names sites by site id), cuts off the node of a
    revoked certificate at once (Flower's ``deactivate_node``: the node is no longer
    sampled and a message already waiting for it is answered "node unavailable"), and
    lets a site that restarts after a crash replace its own stale session instead of
    waiting a minute for Flower to notice the old one is gone.
    """

    def __init__(self, app: Any, tls: AggregatorTLSConfig, registry: FleetRegistry) -> None:
        self.registry = registry
        self.refusals = RefusalLog(registry)
        self.revocations = RevocationList(tls.crl, load_certificate(tls.ca_certificate))
        self.context = door_ssl_context(tls)
        self._linkstate = app.state.linkstate_factory
        self._node_of_key: dict[bytes, int] = {}
        self._holder_of_node: dict[int, tuple[x509.Certificate, str]] = {}
        self._cut_off: set[int] = set()

    async def node_of(self, key: bytes) -> int | None:
        """The Flower node registered under ``key`` (a PEM public key), if any."""
        if key in self._node_of_key:
            return self._node_of_key[key]
        node = await asyncio.to_thread(self._linkstate.state().get_node_id_by_public_key, key)
        if node is not None:
            self._node_of_key[key] = node
        return node

    async def bind(self, key: bytes, certificate: x509.Certificate, site: str) -> None:
        """Remember which site holds the node of ``key`` (once Flower registered it)."""
        node = await self.node_of(key)
        if node is None:
            return
        self._holder_of_node[node] = (certificate, site)
        if self.registry.bind(node, site):
            log.info("site %s is Flower node %d", site, node)

    async def replace_stale_session(self, key: bytes, site: str) -> None:
        """Before a site activates its node: end a session of that node still marked online.

        Only the holder of the certificate's key gets here, and on one host a second
        SuperNode of a site cannot start (its runtime port is taken), so an online
        session of the same node is the remains of a crash or kill.
        """
        node = await self.node_of(key)
        if node is not None and await asyncio.to_thread(self._linkstate.state().deactivate_node, node):
            log.info("site %s reconnected: its previous session of node %d (a crash or kill) ends here", site, node)

    async def cut_off(self, node: int, site: str | None) -> None:
        """Take a revoked site's node offline, once."""
        if node in self._cut_off:
            return
        self._cut_off.add(node)
        await asyncio.to_thread(self._linkstate.state().deactivate_node, node)
        log.warning(
            "site %s (node %d): certificate revoked; the node is cut off and receives nothing", site or "?", node
        )

    async def cut_off_revoked(self) -> None:
        """Cut off every known node whose certificate the CRL in force revokes."""
        for node, (certificate, site) in list(self._holder_of_node.items()):
            if self.revocations.is_revoked(certificate):
                await self.cut_off(node, site)

    async def watch_revocations(self, interval: float = 1.0) -> None:
        """Re-read the CRL every ``interval`` seconds; cut off newly revoked sites at once,
        without waiting for their next request (a request may have re-read it first)."""
        acted_on = self.revocations.generation
        while True:
            self.revocations.refresh()
            if self.revocations.generation != acted_on:
                acted_on = self.revocations.generation
                await self.cut_off_revoked()
            await asyncio.sleep(interval)


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown peer"


def fleet_gate(app: ASGIApp, door: FleetDoor) -> ASGIApp:
    """Serve only the Fleet API, only to an unrevoked certificate, only for its own node key.

    401, not 403, on a refusal: a Flower SuperNode shuts down on 401 (and fedgen's site
    then exits non-zero, saying why) but would retry forever on 403.
    """

    async def gate(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await app(scope, receive, send)
            return
        if scope["type"] != "http" or not scope["path"].startswith(FLEET_PREFIX):
            await _reject(send, 404, b"not found")
            return
        der = scope.get(PEER_CERT_SCOPE_KEY)
        try:
            certificate = x509.load_der_x509_certificate(der) if der else None
        except ValueError:
            certificate = None
        if certificate is None:
            door.refusals.refused(_peer(scope), NO_CERTIFICATE)
            await _reject(send, 401, b"client certificate required")
            return
        try:
            site = site_id_of(certificate)
        except PKIError:
            site = None
        presented = public_key_pem(certificate)
        if door.revocations.is_revoked(certificate):
            door.refusals.refused(
                _peer(scope),
                REVOKED,
                site=site,
                detail=f"certificate serial {certificate.serial_number:x} is on the CRL",
            )
            node = await door.node_of(presented)
            if node is not None:
                await door.cut_off(node, site)
            await _reject(send, 401, b"certificate revoked: the consortium revoked this site's certificate")
            return
        claimed = dict(scope["headers"]).get(NODE_PUBLIC_KEY_HEADER)
        try:
            matches = claimed is not None and b64decode(claimed, validate=True) == presented
        except ValueError:
            matches = False
        if not matches:
            door.refusals.refused(
                _peer(scope),
                IDENTITY_MISMATCH,
                site=site,
                detail="the node key is not the key of the client certificate",
            )
            await _reject(send, 401, b"identity mismatch: node key does not belong to the client certificate")
            return
        if site is None:
            door.refusals.refused(_peer(scope), BAD_CERTIFICATE, detail="its CN is not a site id")
            await _reject(send, 401, b"the client certificate names no site")
            return
        if scope["path"] == UNREGISTER_PATH:
            # A site's node lasts as long as its certificate: an unregistered key can never
            # register again in Flower 1.41, which would lock the site out.
            await _reject(send, 403, b"a site's node stays registered under its certificate")
            return
        if scope["path"] == ACTIVATE_PATH:
            await door.replace_stale_session(presented, site)
        await door.bind(presented, certificate, site)
        await app(scope, receive, send)

    return gate


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `serve`: two servers in one process must
    stop together, and uvicorn would re-raise the signal (killing the process) before
    the cleanup after them ran."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def superlink_servers(
    app: Any, door: FleetDoor, *, public_host: str, fleet_port: int, runtime_port: int, log_level: str = "warning"
) -> tuple[uvicorn.Server, uvicorn.Server]:
    """The two uvicorn servers over one app: (loopback Control+Runtime, public Fleet).

    Only the loopback server runs the app's lifespan (which starts Flower's SuperExec),
    so it runs once. The public one is configured without TLS: `door_protocol` runs each
    handshake itself, so that refusals are logged with their cause.
    """
    local = _Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=runtime_port,
            lifespan="on",
            log_level=log_level,
            access_log=False,
            workers=1,
        )
    )
    public = _Server(
        uvicorn.Config(
            fleet_gate(app, door),
            host=public_host,
            port=fleet_port,
            lifespan="off",
            log_level=log_level,
            access_log=False,
            workers=1,
            http=door_protocol(door.context, door.refusals),
        )
    )
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


async def serve(app: Any, door: FleetDoor, local: uvicorn.Server, public: uvicorn.Server) -> None:
    """Run both servers until either stops or SIGINT/SIGTERM arrives; the public one starts
    only once state is up, with the CRL watch. Flower's SuperExec and its ServerApps are
    stopped last."""

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
    watch = asyncio.create_task(door.watch_revocations())
    try:
        done, _ = await asyncio.wait({local_task, public_task}, return_when=asyncio.FIRST_COMPLETED)
        local.should_exit = public.should_exit = True
        await asyncio.gather(local_task, public_task, return_exceptions=True)
        for task in done:
            task.result()
    finally:
        watch.cancel()
        if superexec is not None:
            _stop_session(superexec)

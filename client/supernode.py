"""The site's SuperNode with mutual TLS: the one module on the site that touches Flower internals.

Flower 1.41's SuperNode verifies the SuperLink but presents no client certificate
(upstream flwrlabs/flower#6896). fedgen runs the stock SuperNode with two substitutions
in ``flwr.supernode.fleet_http_connection``:

* its Fleet HTTP client gets an ``ssl.SSLContext`` that trusts only the consortium CA,
  checks the aggregator's host name and presents the site's certificate chain;
* its node signing key is the site certificate's key instead of a throwaway one, so the
  identity the SuperLink registers is the certificate's (the aggregator checks that the
  two match on every request).

The certificate key is the site's lasting identity: the client never unregisters its node
(Flower 1.41 refuses an unregistered key for good), so a site rejoins as itself after a
crash, a clean stop or an aggregator restart. A refusal it cannot get past (the
aggregator rejects its certificate or its requests, or the aggregator's certificate fails
verification) stops the SuperNode with the reason, instead of Flower's silent retries, and
`fedgen site start` exits non-zero with it.

It also takes away Flower's polling floor on the site (`install_prompt_polling`): the
SuperNode sleeps 3 s after each empty poll of the aggregator and 0.5 s between looks for
its ClientApp's reply (``time.sleep`` in ``flwr.supernode.start_client_internal``), and
its SuperExec looks for new tasks every second (Flower's own setting,
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``). Setting ``FEDGEN_STOCK_FLOWER_POLLING=1`` keeps
Flower's pace (the round-overhead benchmark's baseline).

Pinned to Flower 1.41; tests fail loudly when these names change.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import httpx

from fedgen.config import ConfigError, SiteConfig, SiteTLSConfig, load_toml
from fedgen.errors import OperationFailed
from fedgen.flower_pin import check_flower_version, prompt_superexec_polling, stock_polling
from fedgen.hf.checkpoint import CheckpointError, read_checkpoint
from fedgen.pki import PKIError, check_key_pair, check_tls_identity, site_id_of
from fedgen.sovereignty import apply_sovereign_environment

from .refusals import refusal_cause

log = logging.getLogger(__name__)


class SiteStopped(OperationFailed, RuntimeError):
    """The site's SuperNode stopped without being asked to; the message says why."""


def client_ssl_context(tls: SiteTLSConfig) -> ssl.SSLContext:
    """TLS client context: verify the aggregator against the CA only, present the site cert."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_certificate))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context


# Flower gives up on a transport error whose message has one of these words; one that is
# no refusal (the aggregator closing connections while it restarts) must be retried.
_FLOWER_GIVES_UP_ON = ("certificate", "ssl", "tls")


def as_retryable(error: httpx.TransportError) -> httpx.TransportError | None:
    """The same transport error in words Flower retries, if its own words would make Flower
    give up although nothing was refused; None if Flower retries it as it is."""
    if not any(word in str(error).lower() for word in _FLOWER_GIVES_UP_ON):
        return None
    retryable = type(error)(
        f"the connection to the aggregator broke ({type(error).__name__}); retrying", request=error.request
    )
    retryable.__cause__ = error
    return retryable


class StopReason:
    """The first refusal that stops this SuperNode (thread-safe: the heartbeat thread
    and the main loop both talk to the aggregator)."""

    def __init__(self) -> None:
        self.cause: str | None = None
        self._lock = threading.Lock()

    def refused(self, cause: str, *, interrupt: bool) -> None:
        """Record ``cause`` if it is the first; with ``interrupt``, shut the SuperNode down
        the way Flower itself does on a 401 (SIGINT to its own process)."""
        with self._lock:
            if self.cause is not None:
                return
            self.cause = cause
        log.error("stopping: %s", cause)
        if interrupt:
            os.kill(os.getpid(), signal.SIGINT)


class PollPace:
    """How long the SuperNode waits where Flower 1.41 hard-codes its sleeps.

    Flower's connection loop sleeps ``FLOWER_IDLE_SLEEP`` (3 s) after every poll of the
    aggregator that brought no message, and ``FLOWER_REPLY_SLEEP`` (0.5 s) between looks
    at its own state for the ClientApp's reply. A site in a run (it replied within
    ``active_window`` seconds) polls the aggregator every ``active_seconds``, so the next
    round's message is picked up within a fraction of a second; a site idle for longer
    polls every ``idle_seconds``, a request a second, so idle sites do not load the
    aggregator. The reply is looked for every ``reply_seconds``, a look at local memory.
    """

    FLOWER_IDLE_SLEEP = 3
    FLOWER_REPLY_SLEEP = 0.5

    def __init__(
        self,
        active_seconds: float = 0.2,
        idle_seconds: float = 1.0,
        active_window: float = 120.0,
        reply_seconds: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.active_seconds = active_seconds
        self.idle_seconds = idle_seconds
        self.active_window = active_window
        self.reply_seconds = reply_seconds
        self._clock = clock
        self._last_reply: float | None = None

    def replied(self) -> None:
        """The site just sent a reply: a run is on, its next message comes soon."""
        self._last_reply = self._clock()

    def interval(self, flower_seconds: float) -> float:
        """The wait fedgen uses where Flower asked for ``flower_seconds``."""
        if flower_seconds == self.FLOWER_IDLE_SLEEP:
            active = self._last_reply is not None and self._clock() - self._last_reply < self.active_window
            return self.active_seconds if active else self.idle_seconds
        if flower_seconds == self.FLOWER_REPLY_SLEEP:
            return self.reply_seconds
        return flower_seconds


class _PacedTime(ModuleType):
    """The ``time`` module as ``flwr.supernode.start_client_internal`` sees it: every
    attribute is the real one, except that ``sleep`` waits as `PollPace` says."""

    def __init__(self, pace: PollPace) -> None:
        super().__init__("time")
        self.pace = pace

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(self.pace.interval(seconds))


def install_prompt_polling(pace: PollPace | None = None) -> PollPace | None:
    """Take away Flower's polling floor on this site, unless ``FEDGEN_STOCK_FLOWER_POLLING=1``.

    Sets Flower's SuperExec task poll (read by the SuperExec the SuperNode starts, which
    inherits this environment) and paces the SuperNode's hard-coded sleeps with ``pace``.
    Returns the pace installed, or None with stock polling.
    """
    if stock_polling():
        return None
    from flwr.supernode import start_client_internal

    prompt_superexec_polling()
    pace = pace or PollPace()
    start_client_internal.time = _PacedTime(pace)
    return pace


def install_mutual_tls(tls: SiteTLSConfig, pace: PollPace | None = None) -> StopReason:
    """Make Flower's SuperNode connect with the site's certificate and certificate key.

    ``pace``, if given, learns when the site sends a reply (`PollPace.replied`).

    Returns
    -------
    StopReason
        Where the reason the aggregator refused this site, if it does, is kept.
    """
    check_flower_version("mutual-TLS SuperNode glue")
    from flwr.proto.fleet_pb2 import RegisterNodeFleetResponse, UnregisterNodeFleetResponse
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.supernode import fleet_http_connection

    _, private_key = check_key_pair(tls.certificate, tls.private_key)
    context = client_ssl_context(tls)
    stop = StopReason()

    class MutualTLSFleetClient(fleet_http_connection.FleetHttpClient):  # type: ignore[misc, name-defined]
        @classmethod
        def from_server_address(cls, server_address, insecure, root_certificates, interceptors, *, retry_invoker=None):  # noqa: ANN001, ANN206 - Flower's signature
            return cls(
                f"https://{server_address}", interceptors=interceptors, verify=context, retry_invoker=retry_invoker
            )

        def _unary_unary(self, **request):  # noqa: ANN003, ANN202 - Flower's one call for every RPC
            try:
                return super()._unary_unary(**request)
            except (httpx.HTTPStatusError, httpx.TransportError) as exc:
                if (cause := refusal_cause(exc)) is not None:
                    # Flower shuts down on a 401 by itself, not on a refused handshake.
                    stop.refused(cause, interrupt=not isinstance(exc, httpx.HTTPStatusError))
                elif isinstance(exc, httpx.TransportError) and (retryable := as_retryable(exc)) is not None:
                    raise retryable
                raise

        def PushMessages(self, request):  # noqa: N802, ANN001, ANN201 - Flower's method
            response = super().PushMessages(request)
            if pace is not None:
                pace.replied()
            return response

        def RegisterNode(self, request):  # noqa: N802, ANN001, ANN201 - Flower's method
            # A site that stopped (crash, kill or a clean stop) rejoins as the node it already is.
            try:
                return super().RegisterNode(request)
            except httpx.HTTPStatusError as exc:
                error = FlowerError.from_json(exc.response.text)
                if error is None or error.code != ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE:
                    raise
                return RegisterNodeFleetResponse()

        def UnregisterNode(self, request):  # noqa: N802, ANN001, ANN201 - Flower's method
            # Never: the node lasts as long as the certificate (an unregistered key is refused
            # for good by Flower 1.41, so the site could not rejoin after a clean stop).
            return UnregisterNodeFleetResponse()

    fleet_http_connection.FleetHttpClient = MutualTLSFleetClient
    fleet_http_connection.generate_key_pairs = lambda: (private_key, private_key.public_key())
    return stop


def run_supernode(*, tls: SiteTLSConfig, aggregator: str, site_config: Path, runtime_port: int) -> None:
    """Run Flower's SuperNode (blocking) for the site described by ``site_config``.

    ``runtime_port`` is the SuperNode's own loopback Runtime API, which its ClientApp
    processes connect to.

    Raises
    ------
    SiteStopped
        If the aggregator refused this site, or the connection ended on an error.
    """
    stop = install_mutual_tls(tls, install_prompt_polling())
    from flwr.supercore.exit import ExitCode, flwr_exit
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = [
        "flower-supernode",
        "--superlink",
        aggregator,
        "--root-certificates",
        str(tls.ca_certificate),
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        "--node-config",
        f'site-config="{site_config}"',
    ]  # SuperNodes install no runtime dependencies unless asked to (1.41 default)
    try:
        flower_supernode()
    except (SystemExit, KeyboardInterrupt):  # Flower's graceful exit, also after a refusal
        if stop.cause is not None:
            raise SiteStopped(stop.cause) from None
        raise
    if stop.cause is not None:
        raise SiteStopped(stop.cause)
    # Flower returns only when its connection loop broke on an error it logged, with its
    # Runtime API thread still running: leave through its exit path, non-zero.
    flwr_exit(
        ExitCode.SUPERNODE_CONNECTION_ERROR, "the connection to the aggregator broke (see above)", emit_telemetry=False
    )


def check_site(site: SiteConfig, source: str) -> SiteTLSConfig:
    """Check what joining a deployment needs, before anything starts.

    Raises
    ------
    ConfigError
        Naming the file and field at fault.
    """
    if site.aggregator is None:
        raise ConfigError(f"{source}: aggregator: missing; set it to the aggregator's host:port")
    if site.tls is None:
        raise ConfigError(f"{source}: tls: missing [tls] table with certificate, private_key, ca_certificate")
    for field in ("certificate", "private_key", "ca_certificate"):
        path = getattr(site.tls, field)
        if not path.is_file():
            raise ConfigError(f"{source}: tls.{field}: file {path} not found")
    if not Path(site.data).exists():
        raise ConfigError(f"{source}: data: {site.data} not found")
    if site.base_model is not None:
        try:  # the folder's shape now; its digest against the run's, in each round
            read_checkpoint(site.base_model)
        except CheckpointError as exc:
            raise ConfigError(f"{source}: base_model: {exc}") from None
    try:  # what the aggregator will check, checked here first, with the fix in the message
        certificate = check_tls_identity(site.tls.certificate, site.tls.private_key, site.tls.ca_certificate, "client")
    except PKIError as exc:
        raise ConfigError(f"{source}: tls: {exc}") from None
    if site_id_of(certificate) != site.site_id:
        raise ConfigError(
            f"{source}: site_id {site.site_id!r} differs from the certificate's "
            f"{site_id_of(certificate)!r}; use the certificate issued for this site"
        )
    return site.tls


def start_site(site_toml: Path) -> None:
    """`fedgen site start`: check the site's config, start its warm worker, then run its
    SuperNode (blocking); the worker stops with it (`fedgen.client.worker.SiteWorker`).

    Raises
    ------
    WorkerStartFailed
        If the worker exits or does not get ready (the SuperNode does not start).
    """
    from .worker import SiteWorker

    site = load_toml(site_toml, SiteConfig)
    tls = check_site(site, str(site_toml))
    apply_sovereign_environment()
    site_config = Path(site_toml).resolve()
    worker = SiteWorker(site_config)
    worker.start()
    try:
        run_supernode(tls=tls, aggregator=site.aggregator, site_config=site_config, runtime_port=site.runtime_port)
    finally:
        worker.stop()

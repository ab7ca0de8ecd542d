"""The site's SuperNode with mutual TLS: the one module on the site that touches Flower internals.

Flower 1.41's SuperNode verifies the SuperLink but presents no client certificate
(upstream flwrlabs/flower#6896). fedgen runs the stock SuperNode with two substitutions
in ``flwr.supernode.fleet_http_connection``:

* its Fleet HTTP client gets an ``ssl.SSLContext`` that trusts only the consortium CA,
  checks the aggregator's host name and presents the site's certificate chain;
* its node signing key is the site certificate's key instead of a throwaway one, so the
  identity the SuperLink registers is the certificate's (the aggregator checks that the
  two match on every request).

Pinned to Flower 1.41; tests fail loudly when these names change.
"""

from __future__ import annotations

import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

import flwr
import httpx

from fedgen.config import ConfigError, SiteConfig, load_toml
from fedgen.pki import PKIError, check_key_pair, load_certificate, site_id_of
from fedgen.sovereignty import apply_sovereign_environment

FLOWER_SERIES = "1.41."


@dataclass(frozen=True)
class SiteTLS:
    """A site's credentials: its certificate and key, and the consortium CA it trusts."""

    certificate: Path
    private_key: Path
    ca_certificate: Path


def client_ssl_context(tls: SiteTLS) -> ssl.SSLContext:
    """TLS client context: verify the aggregator against the CA only, present the site cert."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_certificate))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context


def install_mutual_tls(tls: SiteTLS) -> None:
    """Make Flower's SuperNode connect with the site's certificate and certificate key."""
    if not flwr.__version__.startswith(FLOWER_SERIES):
        raise RuntimeError(
            f"fedgen's mutual-TLS SuperNode glue is written for Flower {FLOWER_SERIES}x; "
            f"found {flwr.__version__}. Install flwr>=1.41,<1.42."
        )
    from flwr.proto.fleet_pb2 import RegisterNodeFleetResponse
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.supernode import fleet_http_connection

    _, private_key = check_key_pair(tls.certificate, tls.private_key)
    context = client_ssl_context(tls)

    class MutualTLSFleetClient(fleet_http_connection.FleetHttpClient):  # type: ignore[misc, name-defined]
        @classmethod
        def from_server_address(cls, server_address, insecure, root_certificates, interceptors, *,
                                retry_invoker=None):  # noqa: ANN001, ANN206 - Flower's signature
            return cls(f"https://{server_address}", interceptors=interceptors, verify=context,
                       retry_invoker=retry_invoker)

        def RegisterNode(self, request):  # noqa: N802, ANN001, ANN201 - Flower's method
            # The certificate key is the site's lasting identity: a site that stopped
            # without unregistering (crash, SIGKILL) rejoins as the node it already is.
            try:
                return super().RegisterNode(request)
            except httpx.HTTPStatusError as exc:
                error = FlowerError.from_json(exc.response.text)
                if error is None or error.code != ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE:
                    raise
                return RegisterNodeFleetResponse()

    fleet_http_connection.FleetHttpClient = MutualTLSFleetClient
    fleet_http_connection.generate_key_pairs = lambda: (private_key, private_key.public_key())


def run_supernode(*, tls: SiteTLS, aggregator: str, site_config: Path, runtime_port: int) -> None:
    """Run Flower's SuperNode (blocking) for the site described by ``site_config``.

    ``runtime_port`` is the SuperNode's own loopback Runtime API, which its ClientApp
    processes connect to.
    """
    install_mutual_tls(tls)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = [
        "flower-supernode", "--superlink", aggregator,
        "--root-certificates", str(tls.ca_certificate),
        "--host", "127.0.0.1", "--port", str(runtime_port),
        "--node-config", f'site-config="{site_config}"',
    ]  # SuperNodes install no runtime dependencies unless asked to (1.41 default)
    flower_supernode()


def check_site(site: SiteConfig, source: str) -> SiteTLS:
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
    try:
        certificate, _ = check_key_pair(site.tls.certificate, site.tls.private_key)
        load_certificate(site.tls.ca_certificate)
    except PKIError as exc:
        raise ConfigError(f"{source}: tls: {exc}") from None
    if site_id_of(certificate) != site.site_id:
        raise ConfigError(f"{source}: site_id {site.site_id!r} differs from the certificate's "
                          f"{site_id_of(certificate)!r}; use the certificate issued for this site")
    return SiteTLS(certificate=site.tls.certificate, private_key=site.tls.private_key,
                   ca_certificate=site.tls.ca_certificate)


def start_site(site_toml: Path) -> None:
    """`fedgen site start`: check the site's config, then run its SuperNode (blocking)."""
    site = load_toml(site_toml, SiteConfig)
    tls = check_site(site, str(site_toml))
    apply_sovereign_environment()
    run_supernode(tls=tls, aggregator=site.aggregator, site_config=Path(site_toml).resolve(),
                  runtime_port=site.runtime_port)

"""`fedgen aggregator start`: the consortium's SuperLink behind mutual TLS."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fedgen.config import AggregatorConfig, AggregatorTLSConfig, ConfigError
from fedgen.flower_pin import prompt_superexec_polling
from fedgen.pki import (
    PKIError,
    check_crl_signature,
    check_key_pair,
    check_lineage_signer,
    check_tls_identity,
    crl_is_overdue,
    load_certificate,
    load_crl,
)
from fedgen.sovereignty import apply_sovereign_environment
from fedgen.state_files import FLEET_REGISTRY_FILE, FLOWER_DATABASE

from .fleet_registry import FleetRegistry
from .superlink import FleetDoor, build_superlink_app, check_flower_version, serve, superlink_servers

log = logging.getLogger(__name__)


def check_aggregator(config: AggregatorConfig, source: str) -> AggregatorTLSConfig:
    """Check every file the aggregator needs before anything starts.

    The server certificate must pair with its 0600 key, be issued by the consortium CA,
    be valid now and allow TLS serverAuth; the CRL must be signed by that CA (a CRL past
    its next update is only warned about: see `crl_warning`).

    Raises
    ------
    ConfigError
        Naming the file and field at fault.
    """
    tls = config.tls
    for field in ("certificate", "private_key", "ca_certificate", "crl"):
        path = getattr(tls, field)
        if not path.is_file():
            raise ConfigError(f"{source}: tls.{field}: file {path} not found")
    try:
        check_tls_identity(tls.certificate, tls.private_key, tls.ca_certificate, "server")
        ca_certificate = load_certificate(tls.ca_certificate)
        try:
            check_crl_signature(load_crl(tls.crl), ca_certificate)
        except PKIError as exc:
            raise PKIError(f"{tls.crl}: {exc}") from None
    except PKIError as exc:
        raise ConfigError(f"{source}: tls: {exc}") from None
    try:  # the ledger is signed by its own certificate, never the TLS one
        check_lineage_signer(check_key_pair(config.lineage.certificate, config.lineage.private_key)[0])
    except PKIError as exc:
        raise ConfigError(f"{source}: lineage: {exc}") from None
    if config.fleet_port == config.control_port:
        raise ConfigError(f"{source}: control_port must differ from fleet_port ({config.fleet_port})")
    return tls


def crl_warning(tls: AggregatorTLSConfig) -> str | None:
    """A warning if the CRL is past its next update (still enforced, but maybe incomplete)."""
    crl = load_crl(tls.crl)
    if not crl_is_overdue(crl):
        return None
    return (
        f"{tls.crl} is past its next update ({crl.next_update_utc}); it is still enforced, but "
        "revocations made since may be missing: run `fedgen certs refresh-crl` on the CA machine "
        "and copy the new crl.pem here (the aggregator picks it up without a restart)"
    )


def start_aggregator(config: AggregatorConfig, source: str = "aggregator config") -> None:
    """Run the SuperLink until interrupted: Fleet API public with mTLS, the rest on loopback."""
    check_flower_version()
    tls = check_aggregator(config, source)
    apply_sovereign_environment()
    prompt_superexec_polling()  # inherited by the SuperExec that Flower's lifespan starts
    state_dir = Path(config.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    app = build_superlink_app(runtime_port=config.control_port, database=state_dir / FLOWER_DATABASE)
    door = FleetDoor(app, tls, FleetRegistry(state_dir / FLEET_REGISTRY_FILE))
    local, public = superlink_servers(
        app, door, public_host=config.fleet_host, fleet_port=config.fleet_port, runtime_port=config.control_port
    )
    log.info(
        "Fleet API (mutual TLS) on %s:%d; Control and Runtime APIs on 127.0.0.1:%d",
        config.fleet_host,
        config.fleet_port,
        config.control_port,
    )
    asyncio.run(serve(app, door, local, public))

"""Fail loudly when Flower changes what fedgen's mutual-TLS glue relies on (pinned to 1.41).

server/superlink.py and client/supernode.py are the only modules that touch Flower
internals; every name and behaviour they use is checked here.
"""

import inspect
from pathlib import Path

import flwr
import uvicorn
from fastapi.routing import iter_route_contexts
from uvicorn.protocols.http.h11_impl import H11Protocol


def test_flower_is_the_pinned_series():
    assert flwr.__version__.startswith("1.41."), flwr.__version__


def test_superlink_is_built_from_flowers_parser_and_create_app(tmp_path):
    from fedgen.server.superlink import FLEET_PREFIX, build_superlink_app

    app = build_superlink_app(runtime_port=1, database=tmp_path / "flower.db")
    paths = {getattr(c.route, "path", "") for c in iter_route_contexts(app.routes)}
    assert any(p.startswith(FLEET_PREFIX) for p in paths)
    assert "/v1/control/start-run" in paths  # the Control API shares the app: hence two listeners
    lifespan = app.state.superlink_lifespan
    assert lifespan.config.host == "127.0.0.1" and lifespan.config.port == 1
    assert lifespan.config.runtime_dependency_install is False
    assert hasattr(lifespan, "superexec_process")  # stopped with its session at shutdown


def test_node_identity_travels_in_the_header_fedgen_checks(tmp_path):
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    from fedgen import pki
    from fedgen.server.superlink import NODE_PUBLIC_KEY_HEADER, public_key_pem

    assert NODE_PUBLIC_KEY_HEADER == FLEET_HTTP_PUBLIC_KEY_HEADER.encode() == b"flwr-public-key"
    assert "FLEET_HTTP_PUBLIC_KEY_HEADER" in inspect.getsource(NodeAuthHttpInterceptor.intercept)
    # The aggregator compares the header with the certificate's key, encoded as Flower encodes it.
    pki.init_consortium(tmp_path, "t")
    pki.issue_site(tmp_path, "site-a")
    cert = pki.load_certificate(pki.layout(tmp_path).site_cert("site-a"))
    key = pki.load_private_key(pki.layout(tmp_path).site_key("site-a"))
    assert public_key_to_bytes(key.public_key()) == public_key_pem(cert)


def test_supernode_fleet_client_hooks_exist_with_the_expected_signatures():
    from flwr.supernode import fleet_http_connection

    params = list(inspect.signature(fleet_http_connection.FleetHttpClient.from_server_address).parameters)
    assert params[:4] == ["server_address", "insecure", "root_certificates", "interceptors"]
    assert "retry_invoker" in params
    constructor = inspect.signature(fleet_http_connection.FleetHttpClient.__init__).parameters
    assert {"interceptors", "verify", "retry_invoker"} <= set(constructor)
    source = inspect.getsource(fleet_http_connection.http_request_response)
    assert "FleetHttpClient.from_server_address(" in source
    assert "authentication_keys = generate_key_pairs()" in source


def test_mutual_tls_substitution_is_used_by_the_supernode(tmp_path):
    from flwr.supernode import fleet_http_connection

    from fedgen import pki
    from fedgen.client.supernode import SiteTLS, install_mutual_tls

    pki.init_consortium(tmp_path, "t")
    pki.issue_site(tmp_path, "site-a")
    layout = pki.layout(tmp_path)
    original = (fleet_http_connection.FleetHttpClient, fleet_http_connection.generate_key_pairs)
    try:
        install_mutual_tls(SiteTLS(layout.site_cert("site-a"), layout.site_key("site-a"), layout.ca_cert))
        private, public = fleet_http_connection.generate_key_pairs()
        cert = pki.load_certificate(layout.site_cert("site-a"))
        assert pki.certificate_matches_key(cert, private)
        client = fleet_http_connection.FleetHttpClient.from_server_address(
            "127.0.0.1:1", True, None, interceptors=[])
        assert client._base_url.startswith("https://")  # TLS even if Flower asked for insecure
        client.close()
    finally:
        fleet_http_connection.FleetHttpClient, fleet_http_connection.generate_key_pairs = original


def test_uvicorn_hooks_used_by_the_public_listener():
    assert "ssl_context_factory" in inspect.signature(uvicorn.Config.__init__).parameters
    assert "connection_made" in H11Protocol.__dict__
    source = inspect.getsource(H11Protocol)
    assert "self.app = config.loaded_app" in source and "app = self.app" in source
    assert "capture_signals" in uvicorn.Server.__dict__


def test_flower_internals_stay_in_the_glue_modules():
    root = Path(__file__).resolve().parents[2]
    internal = ("flwr.superlink", "flwr.supernode", "flwr.supercore", "flwr.server.superlink")
    offenders = []
    for path in [*root.glob("fedgen/*.py"), *root.glob("client/*.py"), *root.glob("server/*.py"),
                 *root.glob("strategies/*.py")]:
        if path.relative_to(root).as_posix() in ("server/superlink.py", "client/supernode.py"):
            continue
        if any(name in path.read_text() for name in internal):
            offenders.append(str(path.relative_to(root)))
    assert offenders == [], "Flower internals outside server/superlink.py and client/supernode.py"

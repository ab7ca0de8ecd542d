"""Fail loudly when Flower changes what fedgen's mutual-TLS glue relies on (pinned to 1.41).

server/superlink.py and client/supernode.py are the only modules that touch Flower
internals; every name and behaviour they use is checked here.
"""

import gc
import inspect
import os
import re
import time
import weakref
from pathlib import Path

import flwr
import httpx
import pytest
import uvicorn
from fastapi.routing import iter_route_contexts
from uvicorn.protocols.http.h11_impl import H11Protocol


def test_flower_is_the_pinned_series():
    from fedgen.flower_pin import FLOWER_SERIES, check_flower_version

    assert tuple(int(part) for part in flwr.__version__.split(".")[:2]) == FLOWER_SERIES, flwr.__version__
    check_flower_version("glue")  # does not raise on the installed Flower


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
    from fedgen.client.supernode import install_mutual_tls
    from fedgen.config import SiteTLSConfig

    pki.init_consortium(tmp_path, "t")
    pki.issue_site(tmp_path, "site-a")
    layout = pki.layout(tmp_path)
    original = (fleet_http_connection.FleetHttpClient, fleet_http_connection.generate_key_pairs)
    try:
        install_mutual_tls(
            SiteTLSConfig(
                certificate=layout.site_cert("site-a"),
                private_key=layout.site_key("site-a"),
                ca_certificate=layout.ca_cert,
            )
        )
        private, public = fleet_http_connection.generate_key_pairs()
        cert = pki.load_certificate(layout.site_cert("site-a"))
        assert pki.certificate_matches_key(cert, private)
        client = fleet_http_connection.FleetHttpClient.from_server_address("127.0.0.1:1", True, None, interceptors=[])
        assert client._base_url.startswith("https://")  # TLS even if Flower asked for insecure
        # Nothing listens on port 1: unregistering sends nothing, any other call would fail.
        from flwr.proto.fleet_pb2 import ActivateNodeRequest, UnregisterNodeFleetRequest

        client.UnregisterNode(UnregisterNodeFleetRequest(node_id=1))
        with pytest.raises(httpx.ConnectError):
            client.ActivateNode(ActivateNodeRequest(public_key=b"k", heartbeat_interval=30))
        client.close()
    finally:
        fleet_http_connection.FleetHttpClient, fleet_http_connection.generate_key_pairs = original


def test_uvicorn_hooks_used_by_the_public_listener():
    assert {"connection_made", "connection_lost", "data_received"} <= set(H11Protocol.__dict__)
    source = inspect.getsource(H11Protocol)
    assert "self.app = config.loaded_app" in source and "app = self.app" in source
    # connection_lost before the TLS handshake finished must be skipped: uvicorn needs a transport.
    assert "self.transport: asyncio.Transport = None" in source
    assert "self.transport = transport" in inspect.getsource(H11Protocol.connection_made)
    assert "self.transport.close()" in inspect.getsource(H11Protocol.connection_lost)
    assert "capture_signals" in uvicorn.Server.__dict__


def test_asyncio_tls_hooks_used_by_the_fleet_door():
    """The door runs server handshakes with loop.start_tls and a custom TLS object class."""
    import asyncio.sslproto
    import ssl

    assert "self.sslobject_class._create(" in inspect.getsource(ssl.SSLContext.wrap_bio)
    handshake = inspect.getsource(asyncio.sslproto.SSLProtocol._do_handshake)
    # A "wants more data" error flushes pending output (the alert) instead of dropping it.
    assert "except SSLAgainErrors:\n            self._process_outgoing()" in handshake
    # The TLS object is made inside start_tls, so in the context of the task that awaits it.
    assert "self._sslobj = self._sslcontext.wrap_bio(" in inspect.getsource(asyncio.sslproto.SSLProtocol.__init__)
    start_tls = inspect.getsource(asyncio.base_events.BaseEventLoop.start_tls)
    assert "sslproto.SSLProtocol(" in start_tls and "call_connection_made=False" in start_tls


def test_linkstate_calls_the_fleet_door_makes(tmp_path):
    """Why the door never unregisters a node and ends a stale session before activation."""
    from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID

    from fedgen.server.superlink import build_superlink_app

    state = build_superlink_app(runtime_port=1, database=tmp_path / "flower.db").state.linkstate_factory.state()
    key = b"-----BEGIN PUBLIC KEY-----\nfedgen-test\n-----END PUBLIC KEY-----\n"
    node = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, key, 0)
    assert state.get_node_id_by_public_key(key) == node
    assert state.activate_node(node, 30)
    assert not state.activate_node(node, 30)  # online: a restarted site could not activate it
    assert state.deactivate_node(node) and not state.deactivate_node(node)
    assert state.activate_node(node, 30)  # offline again: it can
    state.delete_node(NOOP_FLWR_AID, node)  # what Flower's UnregisterNode does
    assert state.get_node_id_by_public_key(key) is None
    try:
        state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, key, 0)
    except ValueError as exc:  # an unregistered key can never register again
        assert "already in use" in str(exc)
    else:
        raise AssertionError("Flower now lets an unregistered key register again; revisit the door")


def test_supernode_behaviours_the_site_glue_relies_on():
    from flwr.supercore.exit import ExitCode, flwr_exit
    from flwr.supercore.protobuf.client import ProtobufClient
    from flwr.supercore.retry import http_retry
    from flwr.supernode import fleet_http_client, fleet_http_connection

    # Every Fleet RPC goes through _unary_unary, where the site glue reads refusals.
    unary = inspect.signature(ProtobufClient._unary_unary).parameters
    assert {"path", "rpc_method", "request", "response_type", "timeout"} <= set(unary)
    client_source = inspect.getsource(fleet_http_client.FleetHttpClient)
    assert client_source.count("self._unary_unary(") == len(
        [name for name in vars(fleet_http_client.FleetHttpClient) if name[0].isupper()]
    )
    # A 401 makes Flower interrupt its own process; fedgen only adds the reason and exit code.
    giveup = inspect.getsource(http_retry.make_simple_http_retry_invoker)
    assert "httpx.codes.UNAUTHORIZED" in giveup and "os.kill(os.getpid(), signal.SIGINT)" in giveup
    # Flower gives up on any transport error that mentions TLS: the site rewords the ones
    # that are no refusal (fedgen.client.supernode.as_retryable).
    assert 'for term in ("certificate", "ssl", "tls")' in giveup
    connection = inspect.getsource(fleet_http_connection.http_request_response)
    assert "client.UnregisterNode(" in connection  # on every stop: fedgen's client skips it
    assert "except Exception as exc" in connection and "log(ERROR, exc)" in connection  # then returns
    assert "emit_telemetry" in inspect.signature(flwr_exit).parameters
    assert ExitCode.SUPERNODE_CONNECTION_ERROR >= 100  # an error code: the process exits 1


def test_flower_internals_stay_in_the_glue_modules():
    root = Path(__file__).resolve().parents[2]
    internal = ("flwr.superlink", "flwr.supernode", "flwr.supercore", "flwr.server.superlink", "flwr.proto")
    offenders = []
    for path in [
        *root.glob("fedgen/*.py"),
        *root.glob("client/*.py"),
        *root.glob("server/*.py"),
        *root.glob("strategies/*.py"),
    ]:
        if path.relative_to(root).as_posix() in ("server/superlink.py", "client/supernode.py"):
            continue
        if any(name in path.read_text() for name in internal):
            offenders.append(str(path.relative_to(root)))
    assert offenders == [], "Flower internals outside server/superlink.py and client/supernode.py"


def test_supernode_sleeps_the_site_pace_replaces():
    """Flower's SuperNode waits with hard-coded ``time.sleep`` calls: 3 s after an empty
    poll, 0.5 s between looks for the ClientApp's reply. fedgen paces exactly those."""
    from flwr.supernode import start_client_internal as sci

    from fedgen.client.supernode import PollPace

    module = inspect.getsource(sci)
    assert "\nimport time\n" in module and "from time import" not in module  # sleeps go through sci.time
    loop = inspect.getsource(sci.start_client_internal)
    assert "if run_id is None:" in loop and f"time.sleep({PollPace.FLOWER_IDLE_SLEEP})" in loop
    push = inspect.getsource(sci._push_messages)
    assert push.count(f"time.sleep({PollPace.FLOWER_REPLY_SLEEP})") == 2
    # No other sleep in the module that the pace would pass through unchanged by surprise.
    assert module.count("time.sleep(") == 3
    # The SuperExec the SuperNode starts inherits its environment (Flower's poll setting).
    assert "subprocess.Popen(command)" in loop and '"flower-superexec"' in loop


def test_site_pace_is_installed_where_the_supernode_sleeps(monkeypatch):
    from flwr.supernode import start_client_internal as sci

    from fedgen.client.supernode import PollPace, install_prompt_polling
    from fedgen.flower_pin import STOCK_POLLING_ENV, SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS

    monkeypatch.delenv(STOCK_POLLING_ENV, raising=False)
    monkeypatch.delenv(SUPEREXEC_POLL_ENV, raising=False)
    monkeypatch.setattr(sci, "time", sci.time)  # restored after the test
    now = [100.0]
    pace = install_prompt_polling(PollPace(clock=lambda: now[0]))
    assert pace is not None and os.environ[SUPEREXEC_POLL_ENV] == str(SUPEREXEC_POLL_SECONDS)
    assert sci.time.time is time.time and sci.time.monotonic is time.monotonic  # the rest is the real module
    started = time.monotonic()
    sci.time.sleep(PollPace.FLOWER_IDLE_SLEEP)  # idle site: 1 s, not 3 s
    assert 0.9 <= time.monotonic() - started < 2.5
    pace.replied()  # in a run: 0.2 s
    started = time.monotonic()
    sci.time.sleep(PollPace.FLOWER_IDLE_SLEEP)
    sci.time.sleep(PollPace.FLOWER_REPLY_SLEEP)
    assert time.monotonic() - started < 1.0


def test_stock_polling_switch_leaves_flower_alone(monkeypatch):
    from flwr.supernode import start_client_internal as sci

    from fedgen.client.supernode import install_prompt_polling
    from fedgen.flower_pin import STOCK_POLLING_ENV, SUPEREXEC_POLL_ENV
    from fedgen.server.superlink import prompt_replies

    monkeypatch.setenv(STOCK_POLLING_ENV, "1")
    monkeypatch.delenv(SUPEREXEC_POLL_ENV, raising=False)
    monkeypatch.setattr(sci, "time", time)
    assert install_prompt_polling() is None and sci.time is time and SUPEREXEC_POLL_ENV not in os.environ
    grid = _FakeGrid(replies_after=1)
    prompt_replies(grid)
    assert "send_and_receive" not in vars(grid)


def test_site_marks_its_reply_through_the_push_flower_calls():
    from flwr.supernode import fleet_http_client, fleet_http_connection

    assert "PushMessages" in vars(fleet_http_client.FleetHttpClient)
    assert "client.PushMessages," in inspect.getsource(fleet_http_connection.http_request_response)


def test_superexec_poll_is_flowers_own_setting(monkeypatch):
    """Flower's SuperExec reads its task poll interval from the environment fedgen sets."""
    from flwr.supercore.superexec import run_superexec
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan

    from fedgen.flower_pin import SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS

    assert run_superexec._TASK_POLL_INTERVAL_ENV == SUPEREXEC_POLL_ENV
    monkeypatch.setenv(SUPEREXEC_POLL_ENV, str(SUPEREXEC_POLL_SECONDS))
    assert run_superexec._get_task_poll_interval() == SUPEREXEC_POLL_SECONDS
    loop = inspect.getsource(run_superexec.run_superexec)
    assert "_get_task_poll_interval()" in loop and "time.sleep(task_poll_interval)" in loop
    # The aggregator's SuperExec is started by the lifespan without an env of its own.
    starts = inspect.getsource(SuperLinkLifespan)
    assert "subprocess.Popen(command, **get_popen_detach_kwargs())" in starts


def test_serverapp_grid_is_the_one_fedgen_makes_prompt():
    """A deployed ServerApp gets an HttpGrid polling every 3 s; Flower's strategies wait
    for replies through ``grid.send_and_receive``, which fedgen replaces on that grid."""
    from flwr.serverapp.strategy import Strategy
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.superlink.runtime.run_serverapp import run_serverapp

    assert "grid = HttpGrid(" in inspect.getsource(run_serverapp)
    stock = inspect.getsource(HttpGrid.send_and_receive)
    assert "self.push_messages(messages)" in stock and "self.pull_messages(msg_ids)" in stock
    assert "time.sleep(3)" in stock
    start = inspect.getsource(Strategy.start)
    assert start.count("grid.send_and_receive(") == 2  # train and evaluate
    # The train replies go to aggregate_train as given, not gathered into a list first:
    # fedgen's recorder accumulates them as they arrive.
    assert re.search(r"train_replies = grid\.send_and_receive\(", start)
    assert re.search(r"self\.aggregate_train\(\s*current_round,\s*train_replies,\s*\)", start)
    params = inspect.signature(HttpGrid.send_and_receive).parameters
    assert list(params) == ["self", "messages", "timeout"] and params["timeout"].kind is params["timeout"].KEYWORD_ONLY


class _Reply:
    def __init__(self, message_id: str) -> None:
        self.metadata = type("Metadata", (), {"reply_to_message_id": message_id})()


class _FakeGrid:
    """Push gives ids m0, m1, ...; each message's reply shows up after ``replies_after`` pulls."""

    def __init__(self, replies_after: int) -> None:
        self.replies_after = replies_after
        self.pulls: list[list[str]] = []  # the ids each pull asked for

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls.append(list(message_ids))
        return [_Reply(m) for m in message_ids] if len(self.pulls) >= self.replies_after else []


def test_prompt_replies_keeps_the_send_and_receive_contract(monkeypatch):
    from fedgen.flower_pin import STOCK_POLLING_ENV
    from fedgen.server.superlink import prompt_replies

    monkeypatch.delenv(STOCK_POLLING_ENV, raising=False)
    grid = _FakeGrid(replies_after=5)
    prompt_replies(grid, poll_seconds=0.05)
    started = time.monotonic()
    replies = grid.send_and_receive(["a", "b", "c"], timeout=None)
    first = next(replies)  # pushed at the call; replies come as they are pulled
    pulls_for_first = len(grid.pulls)
    rest = list(replies)
    assert sorted(r.metadata.reply_to_message_id for r in [first, *rest]) == ["m0", "m1", "m2"]
    assert all(len(ids) == 1 for ids in grid.pulls)  # one reply inflated at a time
    assert pulls_for_first < len(grid.pulls)  # the first reply was handed over before the others were pulled
    assert time.monotonic() - started < 1.0  # 0.05 s waits between sweeps, not 3 s ones
    # A reply the caller has let go of is not kept alive by the loop while it pulls the next.
    kept = _FakeGrid(replies_after=1)
    prompt_replies(kept, poll_seconds=0.05)
    alive_at_pull = []
    pull = kept.pull_messages

    def pull_and_count(message_ids):
        gc.collect()
        alive_at_pull.append(sum(ref() is not None for ref in handed))
        return pull(message_ids)

    kept.pull_messages = pull_and_count
    handed = []
    for reply in kept.send_and_receive(["a", "b", "c"], timeout=None):
        handed.append(weakref.ref(reply))
        del reply
    assert len(handed) == 3 and alive_at_pull == [0, 0, 0]
    late = _FakeGrid(replies_after=10**6)
    prompt_replies(late, poll_seconds=0.05)
    started = time.monotonic()
    assert list(late.send_and_receive(["a"], timeout=0.3)) == []  # the timeout still ends the wait
    assert 0.3 <= time.monotonic() - started < 1.0 and len(late.pulls) >= 5

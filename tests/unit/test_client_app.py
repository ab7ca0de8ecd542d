"""The ClientApp object itself, called as Flower calls it, for each kind of reply."""

from flwr.app import Context, Message, MessageType, Metadata, RecordDict

from fedgen.client.app import make_client_app
from fedgen.client.ledger import LEDGER_FILE
from fedgen.config import SiteConfig, load_toml
from fedgen.protocol import BUDGET_REFUSED, METRICS_KEY, SITE_DATA_ERROR, SITE_ERROR, TrainReport

from ..conftest import train_message, write_site


def _call(site_toml, content: RecordDict) -> Message:
    app = make_client_app(lambda context: load_toml(site_toml, SiteConfig))
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=5, reply_to_message_id="",
                        group_id="1", created_at=0.0, ttl=600.0, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    return app(Message(metadata=metadata, content=content), context)


def test_train_reply(flower_task, site_toml):
    reply = _call(site_toml, train_message())
    assert not reply.has_error()
    assert TrainReport.from_record(reply.content[METRICS_KEY]).num_examples == 120


def test_budget_refusal_reply(flower_task, tmp_path):
    site_toml = write_site(tmp_path / "site-r", epsilon=0.01, noise_multiplier=1.0)
    reply = _call(site_toml, train_message())
    assert reply.has_error() and reply.error.code == BUDGET_REFUSED
    assert reply.error.reason.startswith("site site-r: refusing round") and "ceiling 0.01" in reply.error.reason


def test_data_error_reply_names_the_line_not_the_path(flower_task, tmp_path):
    site_toml = write_site(tmp_path / "site-d")
    data = site_toml.parent / "data.csv"
    lines = data.read_text().splitlines()
    lines[5] = "ACGTXACGT,1"
    data.write_text("\n".join(lines) + "\n")
    reply = _call(site_toml, train_message())
    assert reply.has_error() and reply.error.code == SITE_DATA_ERROR
    assert "line 6" in reply.error.reason and "'X'" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason and "data.csv" not in reply.error.reason


def test_unexpected_failure_reply_carries_no_detail(flower_task, tmp_path):
    site_toml = write_site(tmp_path / "site-x")
    state = site_toml.parent / "state"
    state.mkdir()
    (state / LEDGER_FILE).write_text("not json")
    reply = _call(site_toml, train_message())
    assert reply.has_error() and reply.error.code == SITE_ERROR
    assert reply.error.reason == "site site-x: LedgerError (details in the site's log)"


def test_a_round_without_a_ledger_head_is_refused_by_a_deployed_site_naming_no_path(flower_task, tmp_path):
    from fedgen import pki

    certs = tmp_path / "certs"
    pki.init_consortium(certs, "t")
    pki.issue_site(certs, "site-w")
    layout = pki.layout(certs)
    site_toml = write_site(tmp_path / "site-w")
    site_toml.write_text(site_toml.read_text() + f'[tls]\ncertificate = "{layout.site_cert("site-w")}"\n'
                         f'private_key = "{layout.site_key("site-w")}"\nca_certificate = "{layout.ca_cert}"\n')
    reply = _call(site_toml, train_message())
    assert reply.has_error() and reply.error.code == SITE_ERROR
    assert reply.error.reason.startswith("site site-w: refused to witness the round: the aggregator sent no "
                                         "lineage ledger head")
    assert str(tmp_path) not in reply.error.reason

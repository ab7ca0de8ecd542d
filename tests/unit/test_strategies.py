import gc
import re
import threading
import time
import weakref

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, Metadata, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum

from fedgen import pki
from fedgen.config import STRATEGY_NAMES
from fedgen.lineage import LedgerHead, LineageWriter, witness_statement
from fedgen.lineage.records import HeadRef, LeftOut, Strategy
from fedgen.params import arrays_to_record, digest, record_to_arrays
from fedgen.protocol import (
    ARRAYS_KEY,
    BUDGET_REFUSED,
    CONFIG_KEY,
    METRICS_KEY,
    SITE_KEY,
    TrainReport,
    site_record,
)
from fedgen.server.lineage_records import round_records
from fedgen.strategies.recorder import QuorumNotMet, RecordingStrategy, SitesMissing, SiteTrust
from fedgen.strategies.registry import STRATEGIES, make_strategy
from fedgen.strategies.validation import UpdatePolicy


class _Grid:
    """Just enough of a Grid for configure_train: ``nodes`` connected nodes (1, 2, ...)."""

    def __init__(self, nodes: int = 3) -> None:
        self.nodes = nodes

    def get_node_ids(self):
        return list(range(1, self.nodes + 1))


def _metadata(node: int) -> Metadata:
    return Metadata(
        run_id=1,
        message_id="",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="m",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )


def _reply(
    node: int,
    value: float,
    examples: int,
    *,
    claimed_digest: str | None = None,
    signer=None,
    site: str | None = None,
    head: LedgerHead | None = None,
    ledger_round: int = 1,
) -> Message:
    """A train reply in run 1; ``signer`` = (private key, certificate PEM) signs its digest with
    the ledger ``head`` it saw and the round's number in the ledger, as a site does."""
    report = TrainReport(
        num_examples=examples,
        train_loss=0.5,
        steps=3,
        sample_rate=0.1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        epsilon=0.1 * node,
        delta=1e-5,
        dp=True,
    )
    arrays = {"w": np.full(4, value, dtype=np.float32)}
    update_digest = claimed_digest or digest(arrays)
    identity = site_record(site or f"site-{node}", update_digest)
    if signer is not None:
        key, certificate_pem = signer
        statement = witness_statement(
            "1", ledger_round, head.seq if head else None, head.hash if head else None, update_digest
        )
        identity = site_record(site or f"site-{node}", update_digest, pki.sign_message(key, statement), certificate_pem)
    content = RecordDict({ARRAYS_KEY: arrays_to_record(arrays), METRICS_KEY: report.to_record(), SITE_KEY: identity})
    return Message(metadata=_metadata(node), content=content)


def test_every_configured_name_is_a_flower_strategy():
    assert tuple(STRATEGIES) == STRATEGY_NAMES
    expected = {
        "fedavg": FedAvg,
        "fedprox": FedProx,
        "fedadam": FedAdam,
        "fedtrimmedavg": FedTrimmedAvg,
        "krum": Krum,
        "median": FedMedian,
    }
    for name, cls in expected.items():
        assert type(make_strategy(name, min_sites=3)) is cls


def test_strategy_options_are_checked():
    assert make_strategy("fedprox", min_sites=2, options={"proximal_mu": 0.5}).proximal_mu == 0.5
    with pytest.raises(ValueError, match="takes no option \\['beta'\\]"):
        make_strategy("fedavg", min_sites=2, options={"beta": 0.1})
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("fedsgd", min_sites=2)


def _first_adam_step(delta: float, *, eta: float, beta_1: float, beta_2: float, tau: float) -> float:
    """FedAdam's round-1 move from the global model, by hand: one bias-corrected Adam step
    (Reddi et al. 2021, Kingma & Ba 2014) on the pseudo-gradient ``delta`` = FedAvg - global."""
    m = (1 - beta_1) * delta
    v = (1 - beta_2) * delta**2
    eta_t = eta * (1 - beta_2**2) ** 0.5 / (1 - beta_1**2)  # Flower counts from round + 1
    return eta_t * m / (v**0.5 + tau)


FEDAVG_OF_REPLIES = (1 * 100 + 2 * 100 + 9 * 200) / 400  # 5.25, weighted by examples


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fedavg", FEDAVG_OF_REPLIES),
        ("median", 2.0),
        ("krum", None),  # one of the honest updates
        ("fedtrimmedavg", (1 + 2 + 9) / 3),  # unweighted; beta 0.2 of 3 updates trims none
        ("fedprox", FEDAVG_OF_REPLIES),
        # Server-side Adam from the zero model towards the FedAvg of the replies, with fedgen's defaults.
        ("fedadam", _first_adam_step(FEDAVG_OF_REPLIES, eta=1e-2, beta_1=0.9, beta_2=0.99, tau=1e-3)),
    ],
)
def test_each_strategy_aggregates_fedgen_replies(flower_task, name, expected):
    strategy = RecordingStrategy(make_strategy(name, min_sites=3))
    initial = arrays_to_record({"w": np.zeros(4, dtype=np.float32)})
    messages = list(strategy.configure_train(1, initial, ConfigRecord({"lr": 0.1}), _Grid()))
    assert len(messages) == 3
    arrays, _ = strategy.aggregate_train(1, [_reply(1, 1.0, 100), _reply(2, 2.0, 100), _reply(3, 9.0, 200)])
    w = record_to_arrays(arrays)["w"]
    assert np.all(np.isfinite(w)) and w.shape == (4,) and w.dtype == np.float32  # the global model's dtype
    if expected is not None:
        np.testing.assert_allclose(w, expected, rtol=1e-6)
        assert np.all(w > 0)  # every strategy moves the zero model towards the sites' updates
    if name == "krum":
        assert w[0] in (1.0, 2.0)
    log = strategy.rounds[1]
    assert [o.site for o in log.outcomes] == ["site-1", "site-2", "site-3"]
    assert [o.report.epsilon for o in log.outcomes] == pytest.approx([0.1, 0.2, 0.3])


def test_fedadam_takes_adam_steps_from_the_global_model_round_after_round(flower_task):
    strategy = RecordingStrategy(make_strategy("fedadam", min_sites=2))
    hyper = dict(eta=1e-2, beta_1=0.9, beta_2=0.99, tau=1e-3)
    global_model = arrays_to_record({"w": np.zeros(4, dtype=np.float32)})
    strategy.configure_train(1, global_model, ConfigRecord(), _Grid(2))
    arrays, _ = strategy.aggregate_train(1, [_reply(1, 1.0, 10), _reply(2, 3.0, 10)])
    first = record_to_arrays(arrays)["w"]
    step_1 = _first_adam_step(2.0, **hyper)
    np.testing.assert_allclose(first, step_1, rtol=1e-6)
    assert 0 < step_1 < 2.0  # towards the sites' mean of 2, by a server learning-rate step, not all the way
    # Round 2: the sites move below the new global model; Adam's momentum still points up.
    strategy.configure_train(2, arrays, ConfigRecord(), _Grid(2))
    arrays, _ = strategy.aggregate_train(2, [_reply(1, -1.0, 10), _reply(2, -1.0, 10)])
    delta_2 = -1.0 - step_1
    m = 0.9 * (0.1 * 2.0) + 0.1 * delta_2
    v = 0.99 * (0.01 * 2.0**2) + 0.01 * delta_2**2
    eta_t = 1e-2 * (1 - 0.99**3) ** 0.5 / (1 - 0.9**3)
    np.testing.assert_allclose(record_to_arrays(arrays)["w"], step_1 + eta_t * m / (v**0.5 + 1e-3), rtol=1e-5)


def test_fedtrimmedavg_drops_the_extreme_updates(flower_task):
    strategy = RecordingStrategy(make_strategy("fedtrimmedavg", min_sites=5))
    strategy.configure_train(1, arrays_to_record({"w": np.zeros(4, dtype=np.float32)}), ConfigRecord(), _Grid(5))
    replies = [_reply(node, value, 10) for node, value in zip(range(1, 6), (2.0, -50.0, 3.0, 100.0, 4.0))]
    arrays, _ = strategy.aggregate_train(1, replies)
    # beta 0.2 of 5 updates trims one from each end (-50 and 100): the mean of 2, 3, 4.
    np.testing.assert_allclose(record_to_arrays(arrays)["w"], 3.0, rtol=1e-6)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "median", "krum", "fedtrimmedavg"])
def test_mean_based_strategies_let_go_of_each_reply_as_it_arrives(flower_task, name):
    """FedAvg, FedProx and FedAdam aggregate through a running mean: a reply is released
    before the next one is taken, so the aggregator never holds K updates. The robust
    strategies need all of them, and keep them. The result is the same either way."""
    kept: list[weakref.ref] = []

    def arriving(values):  # each reply made as it "arrives", referenced from here only weakly
        for node, value in enumerate(values, 1):
            reply = _reply(node, value, 10 * node)
            kept.append(weakref.ref(reply))
            yield reply
            del reply
            gc.collect()
            held.append(sum(ref() is not None for ref in kept))

    held: list[int] = []
    strategy = RecordingStrategy(make_strategy(name, min_sites=3))
    strategy.configure_train(1, arrays_to_record({"w": np.zeros(4, dtype=np.float32)}), ConfigRecord(), _Grid(5))
    values = (1.0, 2.0, 3.0, 4.0, 5.0)
    streamed, _ = strategy.aggregate_train(1, arriving(values))
    if name in ("fedavg", "fedprox", "fedadam"):
        assert held == [0, 0, 0, 0, 0]
    else:
        assert held == [1, 2, 3, 4, 5]
    gathered = RecordingStrategy(make_strategy(name, min_sites=3))
    gathered.configure_train(1, arrays_to_record({"w": np.zeros(4, dtype=np.float32)}), ConfigRecord(), _Grid(5))
    expected, _ = gathered.inner.aggregate_train(1, [_reply(n, v, 10 * n) for n, v in enumerate(values, 1)])
    np.testing.assert_allclose(
        record_to_arrays(streamed)["w"], record_to_arrays(expected)["w"].astype(np.float32), rtol=1e-6
    )


def test_a_trained_reply_without_examples_is_rejected(flower_task):
    strategy = _recording()
    arrays, _ = strategy.aggregate_train(1, [_reply(1, 1.0, 10), _reply(2, 5.0, 0), _reply(3, 3.0, 10)])
    np.testing.assert_allclose(record_to_arrays(arrays)["w"], 2.0)
    empty = strategy.rounds[1].outcomes[1]
    assert (empty.site, empty.status, empty.reason) == (
        "site-2",
        "rejected",
        "reports no training examples: nothing to weigh its update by",
    )


def _recording(name="fedavg", **kwargs) -> RecordingStrategy:
    """A recording strategy that has sent round 1's global model (zeros) to three nodes."""
    strategy = RecordingStrategy(make_strategy(name, min_sites=2), **kwargs)
    strategy.configure_train(1, arrays_to_record({"w": np.zeros(4, dtype=np.float32)}), ConfigRecord(), _Grid())
    return strategy


def test_recorder_keeps_refusals_and_failures_with_the_site_name(flower_task):
    strategy = _recording()
    strategy.aggregate_train(1, [_reply(1, 1.0, 10), _reply(2, 1.0, 10)])
    strategy.configure_train(2, arrays_to_record({"w": np.ones(4, dtype=np.float32)}), ConfigRecord(), _Grid())
    refused = Message(metadata=_metadata(1), error=Error(code=BUDGET_REFUSED, reason="site-1: budget"))
    crashed = Message(metadata=_metadata(2), error=Error(code=2, reason="boom"))
    valid = _reply(3, 2.0, 10)
    arrays, _ = strategy.aggregate_train(2, [refused, crashed, valid])
    np.testing.assert_allclose(record_to_arrays(arrays)["w"], 2.0)  # the round goes on without them
    first, second, third = strategy.rounds[2].outcomes
    assert (first.site, first.status, first.reason) == ("site-1", "refused", "site-1: budget")
    assert (second.site, second.status, second.reason) == ("site-2", "failed", "boom")
    assert third.contributed


def test_a_round_below_quorum_fails_with_the_reasons(flower_task):
    strategy = _recording(policy=UpdatePolicy(min_updates=2))
    refused = Message(metadata=_metadata(1), error=Error(code=BUDGET_REFUSED, reason="ε ceiling reached"))
    with pytest.raises(
        QuorumNotMet,
        match=r"round 1 has 1 valid update\(s\), fewer than the quorum of 2; "
        r"left out: node-1: ε ceiling reached",
    ):
        strategy.aggregate_train(1, [refused, _reply(2, 1.0, 10)])


@pytest.mark.parametrize(
    "arrays, policy, reason",
    [
        ({"v": np.zeros(4, np.float32)}, UpdatePolicy(), r"names differ.*missing \['w'\], unexpected \['v'\]"),
        ({"w": np.zeros(5, np.float32)}, UpdatePolicy(), r"shape \(5,\), the global model \(4,\)"),
        ({"w": np.zeros(4, np.float64)}, UpdatePolicy(), "dtype float64, the global model float32"),
        ({"w": np.array([0, np.nan, 0, 0], np.float32)}, UpdatePolicy(), "NaN or infinite"),
        ({"w": np.array([0, np.inf, 0, 0], np.float32)}, UpdatePolicy(), "NaN or infinite"),
        ({"w": np.full(4, 3.0, np.float32)}, UpdatePolicy(max_update_norm=5.0), "norm 6 exceeds the bound 5"),
        (
            {"w": np.zeros(4000, np.float32)},
            UpdatePolicy(max_update_bytes=1000),
            r"update of \d+ bytes exceeds the limit of 1000",
        ),
    ],
)
def test_bad_updates_are_rejected_with_the_reason(flower_task, arrays, policy, reason):
    strategy = _recording(policy=policy)
    good = _reply(1, 0.5, 10)
    bad = _reply(2, 0.0, 10)
    bad.content[ARRAYS_KEY] = arrays_to_record(arrays)
    bad.content[SITE_KEY] = site_record("site-2", digest(arrays))
    aggregated, _ = strategy.aggregate_train(1, [good, bad])
    assert strategy.rounds[1].outcomes[0].status == "trained"
    assert re.search(reason, _rejection(strategy.rounds[1].outcomes[1]))
    np.testing.assert_allclose(record_to_arrays(aggregated)["w"], 0.5)  # only the good update counts


def test_sampling_waits_for_sites_only_as_long_as_allowed(flower_task):
    strategy = RecordingStrategy(make_strategy("fedavg", min_sites=5), wait_for_sites=(5, 0.6))
    started = time.monotonic()
    with pytest.raises(SitesMissing, match="only 3 of 5 sites connected after waiting 0.6 s"):
        strategy.configure_train(1, arrays_to_record({"w": np.zeros(4, np.float32)}), ConfigRecord(), _Grid())
    assert time.monotonic() - started < 5


class _LosingGrid:
    """Two nodes connected the first two times it is asked, then one: a site cut off
    (revoked, crashed) between Flower counting the nodes and sampling them."""

    def __init__(self) -> None:
        self.asked = 0

    def get_node_ids(self):
        self.asked += 1
        return [1, 2] if self.asked <= 2 else [1]


def test_a_site_lost_while_the_round_is_configured_does_not_stall_the_run(flower_task):
    """Flower's sampling counts the nodes, then waits without bound for that many: the
    recorder has it sample from the nodes its own bounded wait saw."""
    strategy = RecordingStrategy(make_strategy("fedavg", min_sites=1), wait_for_sites=(1, 5.0))
    grid, done = _LosingGrid(), []
    initial = arrays_to_record({"w": np.zeros(4, np.float32)})
    worker = threading.Thread(target=lambda: done.append(strategy.configure_train(1, initial, ConfigRecord(), grid)))
    worker.daemon = True
    worker.start()
    worker.join(10)
    assert done, "configure_train is still waiting for a node that is gone"
    assert sorted(m.metadata.dst_node_id for m in done[0]) == [1, 2]  # node 2's reply will say it is gone
    arrays, _ = strategy.aggregate_train(1, [_reply(1, 1.0, 10)])  # node 2 never answers
    assert [(o.site, o.status) for o in strategy.rounds[1].outcomes] == [("site-1", "trained"), ("node-2", "failed")]


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    pki.init_consortium(folder, "t")
    pki.issue_lineage(folder)
    for site in ("site-1", "site-2", "site-3"):
        pki.issue_site(folder, site)
    pki.revoke_site(folder, "site-3")
    layout = pki.layout(folder)
    trust = SiteTrust(pki.load_certificate(layout.ca_cert), pki.load_crl(layout.crl))

    def signer(site: str):
        return pki.load_private_key(layout.site_key(site)), layout.site_cert(site).read_text()

    return trust, signer, layout


def _rejection(outcome):
    """Why the update was rejected; None if it was not."""
    return outcome.reason if outcome.status == "rejected" else None


def _rejections(strategy, replies):
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays, {o.site: _rejection(o) for o in strategy.rounds[1].outcomes}


def test_update_whose_digest_does_not_match_is_left_out(flower_task):
    strategy = _recording()
    arrays, rejected = _rejections(strategy, [_reply(1, 1.0, 10), _reply(2, 9.0, 10, claimed_digest="0" * 64)])
    assert rejected == {"site-1": None, "site-2": "update digest does not match the tensors sent", "node-3": None}
    np.testing.assert_allclose(record_to_arrays(arrays)["w"], 1.0)  # only site-1 was aggregated


def test_a_sampled_site_that_never_replies_is_reported(flower_task):
    strategy = _recording()
    strategy.aggregate_train(1, [_reply(1, 1.0, 10), _reply(2, 1.0, 10)])  # node 3 sampled, silent
    silent = strategy.rounds[1].outcomes[-1]
    assert (silent.site, silent.status, silent.reason) == ("node-3", "failed", "no reply within the round timeout")
    strategy.configure_train(2, arrays_to_record({"w": np.ones(4, np.float32)}), ConfigRecord(), _Grid())
    strategy.aggregate_train(2, [_reply(3, 1.0, 10)])  # it came back: known by name from now on
    strategy.configure_train(3, arrays_to_record({"w": np.ones(4, np.float32)}), ConfigRecord(), _Grid())
    strategy.aggregate_train(3, [_reply(1, 1.0, 10), _reply(2, 1.0, 10)])
    assert strategy.rounds[3].outcomes[-1].site == "site-3"


def test_signed_updates_are_checked_against_the_consortium(flower_task, consortium):
    trust, signer, _ = consortium
    strategy = _recording(trust=trust)
    arrays, _ = _rejections(
        strategy,
        [
            _reply(1, 1.0, 10, signer=signer("site-1")),
            _reply(2, 5.0, 10),  # unsigned
            _reply(4, 6.0, 10, signer=signer("site-2"), site="site-4"),  # site-2's certificate, posing as site-4
            _reply(3, 7.0, 10, signer=signer("site-3")),  # revoked
            _reply(5, 8.0, 10, signer=(signer("site-1")[0], signer("site-2")[1]), site="site-2"),  # forged
        ],
    )
    assert [_rejection(o) for o in strategy.rounds[1].outcomes] == [
        None,
        "update is not signed by the site",
        "certificate belongs to 'site-2', not 'site-4'",
        "site certificate is revoked",
        "site signature over the update digest and the ledger head sent does not verify",
    ]
    np.testing.assert_allclose(record_to_arrays(arrays)["w"], 1.0)
    accepted = strategy.rounds[1].outcomes[0]
    assert accepted.fingerprint and accepted.certificate.startswith("-----BEGIN CERTIFICATE")


def test_instructions_carry_the_ledger_head_and_site_signatures_must_cover_it(flower_task, consortium, tmp_path):
    """Round 1 of a run resuming another after its round 2: the ledger and the sites call it round 3."""
    trust, signer, layout = consortium
    certificate, key = pki.check_key_pair(layout.lineage_cert, layout.lineage_key)
    with LineageWriter.open(tmp_path / "lineage.jsonl", key, certificate) as writer:
        first = writer.append("run_started", {}, "1")
        strategy = RecordingStrategy(make_strategy("fedavg", min_sites=1), trust=trust, ledger=writer, round_offset=2)
        messages = list(
            strategy.configure_train(
                1, arrays_to_record({"w": np.zeros(4, np.float32)}), ConfigRecord({"model-config": "{}"}), _Grid()
            )
        )
        writer.append("site_refused", {"round": 1, "site": "site-9", "reason": "budget"}, "1")  # the head moves on
    sent = LedgerHead(0, first["hash"], first["signature"])
    for message in messages:
        config = message.content[CONFIG_KEY]
        assert (config["ledger-seq"], config["ledger-head"]) == (0, first["hash"])
        assert config["ledger-head-signature"] == first["signature"]
        assert config["ledger-signer"] == layout.lineage_cert.read_text()
        assert (config["ledger-round"], config["server-round"]) == (3, 1)
    assert strategy.rounds[1].head == sent and strategy.rounds[1].server_round == 3
    moved_on = LedgerHead(1, "ab" * 32, "")
    arrays, _ = _rejections(
        strategy,
        [
            _reply(1, 1.0, 10, signer=signer("site-1"), head=sent, ledger_round=3),
            _reply(2, 5.0, 10, signer=signer("site-2"), head=moved_on, ledger_round=3),  # a head it was not sent
            _reply(3, 6.0, 10, signer=signer("site-1"), site="site-1", head=None, ledger_round=3),  # no head
            _reply(4, 7.0, 10, signer=signer("site-2"), site="site-2", head=sent, ledger_round=1),  # Flower's round
        ],
    )
    outcomes = strategy.rounds[1].outcomes
    assert [_rejection(o) for o in outcomes] == [None] + 3 * [
        "site signature over the update digest and the ledger head sent does not verify"
    ]
    np.testing.assert_allclose(record_to_arrays(arrays)["w"], 1.0)
    *rejected, committed = round_records(
        strategy.rounds[1],
        server_round=3,
        model_in="0" * 64,
        model_out="1" * 64,
        checkpoint=tmp_path / "c.safetensors",
        strategy=Strategy(name="fedavg", options={}),
        metrics={},
    )
    assert [(body.TYPE, body.round) for body in rejected] == 3 * [("update_rejected", 3)]
    assert committed.TYPE == "round_committed"
    assert committed.ledger_head == HeadRef(seq=0, hash=first["hash"])


def test_every_status_reaches_the_run_report_and_the_round_record_with_its_reason(flower_task, tmp_path):
    from fedgen.server.commit import site_rounds

    strategy = _recording(policy=UpdatePolicy(min_updates=1))
    strategy.configure_train(1, arrays_to_record({"w": np.zeros(4, np.float32)}), ConfigRecord(), _Grid(4))
    bad = _reply(4, 1.0, 10, claimed_digest="0" * 64)
    strategy.aggregate_train(
        1,
        [
            _reply(1, 1.0, 10),
            Message(metadata=_metadata(2), error=Error(code=BUDGET_REFUSED, reason="budget spent")),
            Message(metadata=_metadata(3), error=Error(code=2, reason="out of memory")),
            bad,
        ],
    )
    rows = {row.site: (row.status, row.reason) for row in site_rounds(strategy.rounds[1])}
    assert rows == {
        "site-1": ("trained", None),
        "node-2": ("refused", "budget spent"),
        "node-3": ("failed", "out of memory"),
        "site-4": ("rejected", "update digest does not match the tensors sent"),
    }
    *left_out, body = round_records(
        strategy.rounds[1],
        server_round=1,
        model_in="0" * 64,
        model_out="1" * 64,
        checkpoint=tmp_path / "c.safetensors",
        strategy=Strategy(name="fedavg", options={}),
        metrics={},
    )
    assert [(record.TYPE, record.reason) for record in left_out] == [
        ("site_refused", "budget spent"),
        ("update_rejected", "update digest does not match the tensors sent"),
    ]
    assert [c.site for c in body.contributions] == ["site-1"]
    assert (body.rejected, body.refused, body.failed) == (
        [LeftOut(site="site-4", reason="update digest does not match the tensors sent")],
        [LeftOut(site="node-2", reason="budget spent")],
        [LeftOut(site="node-3", reason="out of memory")],
    )

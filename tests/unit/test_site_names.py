"""The aggregator names sites by site id, never by Flower node number, also a site that
never replied: from the fleet registry the Fleet listener writes."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, Metadata

from fedgen.params import arrays_to_record
from fedgen.server.fleet_registry import FleetRegistry
from fedgen.strategies.recorder import QuorumNotMet, RecordingStrategy, SitesMissing
from fedgen.strategies.registry import make_strategy


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


@pytest.fixture
def registry(tmp_path):
    writer = FleetRegistry(tmp_path / "fleet-registry.json")  # as the Fleet listener writes it
    writer.bind(11, "hospital-a")
    writer.bind(22, "hospital-b")
    return FleetRegistry(writer.path)  # as the ServerApp reads it


def _arrays():
    return arrays_to_record({"w": np.zeros(4, np.float32)})


def test_missing_sites_are_reported_with_the_ids_of_those_connected(flower_task, registry):
    strategy = RecordingStrategy(
        make_strategy("fedavg", min_sites=2), wait_for_sites=(2, 0.3), site_names=registry.site_of
    )
    with pytest.raises(SitesMissing, match=r"only 1 of 2 sites connected after waiting 0.3 s \(hospital-a\); "):
        strategy.configure_train(1, _arrays(), ConfigRecord(), _Grid([11]))


def test_a_site_that_died_before_replying_is_named_by_its_site_id(flower_task, registry):
    strategy = RecordingStrategy(make_strategy("fedavg", min_sites=1), site_names=registry.site_of)
    strategy.configure_train(1, _arrays(), ConfigRecord(), _Grid([11, 22, 33]))
    lost = Message(
        metadata=Metadata(
            run_id=1,
            message_id="",
            src_node_id=22,
            dst_node_id=0,
            reply_to_message_id="m",
            group_id="1",
            created_at=0.0,
            ttl=60.0,
            message_type=MessageType.TRAIN,
        ),
        error=Error(code=0, reason="node unavailable"),
    )
    with pytest.raises(QuorumNotMet, match="hospital-a: no reply.*hospital-b: node unavailable"):
        strategy.aggregate_train(1, [lost])
    outcomes = {o.site: o.reason for o in strategy.rounds[1].outcomes if o.status == "failed"}
    assert outcomes == {
        "hospital-a": "no reply within the round timeout",
        "hospital-b": "node unavailable",
        "node-33": "no reply within the round timeout",
    }  # 33: never seen at the door

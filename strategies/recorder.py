"""A strategy wrapper that keeps what every site replied, round by round.

A wrapper rather than a subclass, so it sits around any strategy, Flower's DP wrappers
included, and sees each reply before the inner strategy aggregates it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgen.protocol import BUDGET_REFUSED, METRICS_KEY, SITE_KEY, ProtocolError, TrainReport


@dataclass
class SiteOutcome:
    """One site's answer in one round: a report, or why it did not contribute."""

    site: str
    report: TrainReport | None = None
    refused: str | None = None
    failed: str | None = None


@dataclass
class RoundLog:
    server_round: int
    outcomes: list[SiteOutcome] = field(default_factory=list)


class RecordingStrategy(Strategy):
    """Delegate everything to ``inner``; remember each train reply per round."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.rounds: dict[int, RoundLog] = {}
        self._site_of_node: dict[int, str] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        log = self.rounds.setdefault(server_round, RoundLog(server_round))
        for reply in replies:
            log.outcomes.append(self._outcome(reply))
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def _outcome(self, reply: Message) -> SiteOutcome:
        node = reply.metadata.src_node_id
        if reply.has_error():
            site = self._site_of_node.get(node, f"node-{node}")
            reason = reply.error.reason or f"error code {reply.error.code}"
            if reply.error.code == BUDGET_REFUSED:
                return SiteOutcome(site, refused=reason)
            return SiteOutcome(site, failed=reason)
        content = reply.content
        site = str(content[SITE_KEY]["site-id"]) if SITE_KEY in content else f"node-{node}"
        self._site_of_node[node] = site
        try:
            report = TrainReport.from_record(content[METRICS_KEY])
        except (KeyError, ProtocolError) as exc:
            return SiteOutcome(site, failed=f"malformed reply: {exc}")
        return SiteOutcome(site, report=report)

"""A strategy wrapper that checks and keeps what every site replied, round by round.

A wrapper rather than a subclass, so it sits around any strategy, Flower's DP wrappers
included, and sees each reply before the inner strategy aggregates it. For a strategy
whose aggregate starts from the weighted mean of the updates (FedAvg, FedProx, FedAdam),
each admitted update is added to a running mean as it arrives and its reply dropped, so
the aggregator holds one update and the accumulator whatever the number of sites; the
inner strategy then aggregates one reply that carries that mean and the total weight.
The robust strategies (median, trimmed mean, Krum) need every update at once. Each round's
instructions get the lineage ledger's head, for the sites to witness. An update whose
digest or site signature (over the update and that head) does not hold is rejected here
and never reaches aggregation; what each site sent (or why not) is kept for the round's
lineage record.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

import numpy as np
from cryptography import x509
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgen import pki
from fedgen.lineage import LedgerHead, witness_statement
from fedgen.params import arrays_to_record, digest, record_to_arrays
from fedgen.protocol import (
    ARRAYS_KEY,
    BUDGET_REFUSED,
    METRICS_KEY,
    MODEL_REFUSED,
    SITE_KEY,
    WEIGHT_KEY,
    LedgerNotice,
    ProtocolError,
    TrainReport,
    put_ledger_notice,
)
from fedgen.results import SiteStatus

from .accumulate import RunningMean
from .registry import aggregates_by_mean, mean_is_aggregate
from .validation import UpdatePolicy, update_problem


@dataclass(frozen=True)
class SiteTrust:
    """What a site's signature is checked against: the consortium CA and its CRL."""

    ca_certificate: x509.Certificate
    crl: x509.CertificateRevocationList


class LedgerHeadSource(Protocol):
    """Where the current ledger head comes from (a `fedgen.lineage.LineageWriter`)."""

    @property
    def head(self) -> LedgerHead | None: ...

    @property
    def certificate_pem(self) -> str: ...


@dataclass
class SiteOutcome:
    """One site's answer in one round: a report, or why (``reason``) it did not contribute."""

    site: str
    status: SiteStatus = "trained"
    reason: str | None = None
    report: TrainReport | None = None
    update_digest: str | None = None
    signature: str | None = None  # base64
    certificate: str | None = None  # PEM
    fingerprint: str | None = None

    @property
    def contributed(self) -> bool:
        return self.status == "trained"

    def reject(self, reason: str) -> None:
        """Keep the report, but leave the update out of aggregation for ``reason``."""
        self.status, self.reason = "rejected", reason


@dataclass
class RoundLog:
    server_round: int  # as the lineage numbers it: a resumed run numbers its rounds on
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    started: float = field(default_factory=time.monotonic)  # for the round's wall time
    sampled: list[int] = field(default_factory=list)  # node ids the round was sent to
    outcomes: list[SiteOutcome] = field(default_factory=list)
    head: LedgerHead | None = None  # the ledger head the round's instructions carried


class QuorumNotMet(RuntimeError):
    """Too few valid updates for a round to commit."""

    def __init__(self, log: RoundLog, quorum: int) -> None:
        self.log = log
        valid = sum(o.contributed for o in log.outcomes)
        left_out = sorted(f"{o.site}: {o.reason}" for o in log.outcomes if not o.contributed)
        super().__init__(
            f"round {log.server_round} has {valid} valid update(s), fewer than the quorum of "
            f"{quorum}; left out: " + ("; ".join(left_out) or "no site replied")
        )


class SitesMissing(RuntimeError):
    """Fewer sites connected than a round needs, for longer than the wait allows."""


class _NodeSnapshot:
    """``grid`` with its connected nodes fixed to ``nodes``: what a strategy samples from."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)


class RecordingStrategy(Strategy):
    """Delegate to ``inner``; check each train reply and remember it per round.

    Parameters
    ----------
    inner : Strategy
        The aggregation strategy.
    trust : SiteTrust, optional
        In deployment, every update must carry a valid signature by a certificate the
        consortium CA issued to the site named in the reply, not revoked. Without it
        (simulation), only the update digest is checked.
    policy : UpdatePolicy
        Shape, value and norm checks, the payload limit and the round's quorum.
    wait_for_sites : tuple (sites, seconds), optional
        Before the first round, wait at most ``seconds`` for ``sites`` connected sites;
        before later rounds, for the quorum (a site that dropped out may rejoin later).
        Flower's own wait is unbounded.
    ledger : LedgerHeadSource, optional
        The lineage ledger being written: each round's instructions carry its head then,
        and site signatures must cover that head.
    site_names : callable, optional
        In deployment, the site id whose certificate holds a node id (the aggregator's
        fleet registry), so a site that never replied is still named by its site id.
    round_offset : int
        Rounds the lineage holds before this run's first (a resumed run's): Flower counts
        this run's rounds from 1, `RoundLog` and the sites' signatures number them on.
    """

    def __init__(
        self,
        inner: Strategy,
        trust: SiteTrust | None = None,
        policy: UpdatePolicy = UpdatePolicy(),
        wait_for_sites: tuple[int, float] | None = None,
        ledger: LedgerHeadSource | None = None,
        site_names: Callable[[int], str | None] | None = None,
        round_offset: int = 0,
    ) -> None:
        self.inner = inner
        self.trust = trust
        self.policy = policy
        self.wait_for_sites = wait_for_sites
        self.ledger = ledger
        self.site_names = site_names
        self.round_offset = round_offset
        self.rounds: dict[int, RoundLog] = {}
        self._site_of_node: dict[int, str] = {}
        self._global: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        log = self.rounds[server_round] = RoundLog(server_round + self.round_offset)
        self._global = record_to_arrays(arrays)
        log.head = self.ledger.head if self.ledger is not None else None
        if log.head is not None:
            put_ledger_notice(config, LedgerNotice(log.head, self.ledger.certificate_pem, log.server_round))
        if self.wait_for_sites is not None:
            sites, seconds = self.wait_for_sites
            nodes = self._wait(grid, sites if not self._site_of_node else self.policy.min_updates, seconds)
            # Flower's sampling counts the nodes, then waits without bound until that many
            # are connected: a site cut off in between would stall the run for good. It
            # samples from the nodes that satisfied the wait; a node gone by then is
            # reported failed by its round's replies.
            grid = _NodeSnapshot(grid, nodes)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        log.sampled = [message.metadata.dst_node_id for message in messages]
        return messages

    def _name(self, node: int) -> str:
        """A node's site id: from its replies, else from the aggregator's certificate binding."""
        known = self._site_of_node.get(node) or (self.site_names(node) if self.site_names else None)
        return known or f"node-{node}"

    def _wait(self, grid: Grid, sites: int, seconds: float) -> list[int]:
        """The connected nodes, once there are at least ``sites`` of them.

        Raises
        ------
        SitesMissing
            After ``seconds`` with fewer.
        """
        deadline = time.monotonic() + seconds
        while len(nodes := list(grid.get_node_ids())) < sites:
            if time.monotonic() >= deadline:
                names = f" ({', '.join(sorted(self._name(node) for node in nodes))})" if nodes else ""
                raise SitesMissing(
                    f"only {len(nodes)} of {sites} sites connected after waiting {seconds:g} s"
                    f"{names}; check that every site runs `fedgen site start`"
                )
            time.sleep(0.5)
        return nodes

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        log = self.rounds.setdefault(server_round, RoundLog(server_round + self.round_offset))
        streaming = RunningMean() if aggregates_by_mean(self.inner) else None
        admitted, replied, unattributed = [], set(), []
        for reply in replies:
            node = reply.metadata.src_node_id
            outcome, update = self._outcome(reply, log)
            if reply.has_error() and log.sampled and node not in log.sampled:
                unattributed.append(outcome)  # Flower's own error reply for a lost node
            else:
                replied.add(node)
                log.outcomes.append(outcome)
            if streaming is None:
                if outcome.status != "rejected":
                    admitted.append(reply)
            elif outcome.contributed:
                streaming.add(update, outcome.report.num_examples)
            # Let go of this reply before the next one is pulled: only the accumulator stays.
            del reply, update
        for node in (n for n in log.sampled if n not in replied):  # e.g. a site that died mid-round
            outcome = (
                unattributed.pop(0) if unattributed else SiteOutcome("", "failed", "no reply within the round timeout")
            )
            outcome.site = self._name(node)
            log.outcomes.append(outcome)
        log.outcomes.extend(unattributed)
        valid = sum(outcome.contributed for outcome in log.outcomes)
        if valid < self.policy.min_updates:
            raise QuorumNotMet(log, self.policy.min_updates)
        if valid == 0:
            return None, None
        if streaming is not None:
            total = streaming.total_weight
            mean = arrays_to_record(streaming.take())
            if mean_is_aggregate(self.inner):  # in the updates' dtypes, which are the global model's
                return mean, None
            admitted = [self._mean_reply(mean, total)]
            del mean
        arrays, metrics = self.inner.aggregate_train(server_round, admitted)
        if arrays is None:
            return None, metrics
        # Server-side optimisers (FedAdam) compute in float64; the global model keeps its dtypes,
        # or every site's next update would be rejected as the wrong dtype.
        return arrays_to_record(
            {
                name: tensor.astype(self._global[name].dtype, copy=False)
                for name, tensor in record_to_arrays(arrays).items()
            }
        ), metrics

    @staticmethod
    def _mean_reply(mean: ArrayRecord, total_weight: float) -> Message:
        """One reply holding the weighted mean of the admitted updates and their total
        weight: what a strategy that steps from the mean starts its aggregate from."""
        content = RecordDict({ARRAYS_KEY: mean, METRICS_KEY: MetricRecord({WEIGHT_KEY: total_weight})})
        return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def _outcome(self, reply: Message, log: RoundLog) -> tuple[SiteOutcome, dict[str, np.ndarray] | None]:
        """What ``reply`` says for its site, and its decoded update (None for an error reply
        or one that could not be read)."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            site = self._name(node)
            reason = reply.error.reason or f"error code {reply.error.code}"
            status: SiteStatus = "refused" if reply.error.code in (BUDGET_REFUSED, MODEL_REFUSED) else "failed"
            return SiteOutcome(site, status, reason), None
        content = reply.content
        identity = content[SITE_KEY] if SITE_KEY in content else ConfigRecord()
        site = str(identity.get("site-id", f"node-{node}"))
        self._site_of_node[node] = site
        try:
            report = TrainReport.from_record(content[METRICS_KEY])
            payload = content[ARRAYS_KEY]
            if payload.count_bytes() > self.policy.max_update_bytes:
                reason = f"update of {payload.count_bytes()} bytes exceeds the limit of {self.policy.max_update_bytes}"
                return SiteOutcome(site, "rejected", reason, report=report), None
            update = record_to_arrays(payload, copy=False)  # read here, never written
        except (KeyError, ValueError, ProtocolError) as exc:
            return SiteOutcome(site, "rejected", f"malformed reply: {exc}"), None
        outcome = SiteOutcome(site, report=report, update_digest=digest(update))
        statement = witness_statement(
            str(reply.metadata.run_id),
            log.server_round,
            log.head.seq if log.head else None,
            log.head.hash if log.head else None,
            outcome.update_digest,
        )
        problem = (
            self._check_identity(outcome, identity, statement)
            or update_problem(update, self._global, self.policy)
            or (None if report.num_examples > 0 else "reports no training examples: nothing to weigh its update by")
        )
        if problem is not None:
            outcome.reject(problem)
        return outcome, update

    def _check_identity(self, outcome: SiteOutcome, identity: ConfigRecord, statement: bytes) -> str | None:
        """Why the update's claimed digest or signature (over ``statement``) does not hold, or None."""
        if identity.get("update-digest") != outcome.update_digest:
            return "update digest does not match the tensors sent"
        signature, certificate_pem = identity.get("signature"), identity.get("certificate")
        if self.trust is None:
            return None
        if not isinstance(signature, bytes) or not isinstance(certificate_pem, str):
            return "update is not signed by the site"
        try:
            certificate = x509.load_pem_x509_certificate(certificate_pem.encode("ascii"))
            pki.verify_issued_by(certificate, self.trust.ca_certificate)
            owner = pki.site_id_of(certificate)
        except (ValueError, pki.PKIError) as exc:
            return f"site certificate not trusted: {exc}"
        if pki.is_revoked(certificate, self.trust.crl):
            return "site certificate is revoked"
        if owner != outcome.site:
            return f"certificate belongs to {owner!r}, not {outcome.site!r}"
        if not pki.verify_message_signature(certificate, statement, signature):
            return "site signature over the update digest and the ledger head sent does not verify"
        outcome.signature = base64.b64encode(signature).decode("ascii")
        outcome.certificate = certificate_pem
        outcome.fingerprint = pki.fingerprint(certificate)
        return None

"""The record bodies fedgen writes: one type per record type, for writing and reading alike.

The aggregator builds them (`fedgen.server.lineage_records`; an approval,
`fedgen.model_release`) and appends them with `LineageWriter.append_body`; `fedgen lineage
show`, model approval and export and resuming a run read them back with `parse_record` and
`records_of`. A body is the JSON object `Body.dump` returns: every member present, null
where it has no value, each of the kind its type says (a float is always written as one).

The file format (`fedgen.lineage.format`) does not require these bodies: `verify` and
`export_prov` read only the members its *Bodies* section names, so a ledger whose bodies
hold no more than those still verifies and exports. Reading one here fails, naming the
record and the member.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Generic, TypeVar

from pydantic import ConfigDict, Field, ValidationError, field_serializer

from fedgen.config import StrictModel, TrainingConfig, describe_validation_error

from .format import HEX64, LineageError, StrPath

Digest = Annotated[str, Field(pattern=f"^{HEX64.pattern}$")]
"""A SHA-256 hex digest: of a model (`fedgen.params.model_digest`), an update or a record."""


# ---------------------------------------------------------------------------- parts of bodies


class Part(StrictModel):
    """Strict, complete and immutable, as configs are; members may be called ``model_…``."""

    model_config = ConfigDict(protected_namespaces=())


class Strategy(Part):
    """The aggregation strategy of a run: its registry name and options."""

    name: str
    options: dict[str, float]


class Resumes(Part):
    """The interrupted run a run continues, after that run's last committed round."""

    run_id: str
    after_round: int
    model_digest: Digest


class HeadRef(Part):
    """The ledger head a round's instructions carried (the record's ``seq`` and ``hash``)."""

    seq: int
    hash: Digest


class ModelIn(Part):
    """The global model a round started from."""

    digest: Digest


class ModelOut(Part):
    """The global model a round produced, and its checkpoint's file name (never a path)."""

    digest: Digest
    checkpoint: str


class Contribution(Part):
    """A site's update that a round aggregated, with what the site reported of its training.

    ``signature`` (base64, over the `witness_statement`), ``certificate`` (PEM) and
    ``fingerprint`` are null where sites do not sign, as in simulations. ``epsilon`` and
    ``delta`` are the site accountant's, after the round; ``train_loss`` is null if it
    could not be computed.
    """

    site: str
    fingerprint: Digest | None
    update_digest: Digest
    signature: str | None
    certificate: str | None
    examples: int
    steps: int
    train_loss: float | None
    dp: bool
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    epsilon: float
    delta: float


class LeftOut(Part):
    """A site a round went without, and why."""

    site: str
    reason: str


# ---------------------------------------------------------------------------- bodies


class Body(Part):
    """A record body; ``TYPE`` is the record type it is the body of."""

    TYPE: ClassVar[str]

    def dump(self) -> dict[str, Any]:
        """The body as the JSON object its record holds."""
        return self.model_dump(by_alias=True)


class RoundEvent(Body):
    """A body about one round of a run."""

    round: int


class RunStarted(Body):
    """A run began (or continued an interrupted one: ``resumes``).

    ``config`` is what the run was started from (free-form: a simulation's or a run
    config's summary); ``architecture`` the model's configuration (`fedgen.model_config.ModelConfig`
    or, for a Hugging Face base, `HFModelConfig`, whose base digest, architecture and
    parameter counts tell an auditor which base every adapter belongs to), the record's
    ``model_config`` member, named apart from pydantic's ``model_config``; ``versions``
    the software versions and ``code_digest`` a SHA-256 over fedgen's source.
    """

    TYPE: ClassVar[str] = "run_started"

    config: dict[str, Any]
    training: TrainingConfig
    architecture: dict[str, Any] = Field(alias="model_config")
    labels: list[str]
    sites: int
    strategy: Strategy
    initial_model: Digest
    versions: dict[str, str]
    code_digest: Digest
    resumes: Resumes | None

    @field_serializer("training")
    def _training_as_written(self, training: TrainingConfig) -> dict[str, Any]:
        # The settings the record was written with, no more: a ledger written before a
        # setting existed reads back to the bytes it was hashed as. New records set all.
        return training.model_dump(exclude_unset=True)


class RoundCommitted(RoundEvent):
    """A round's new global model was saved: what went in, who contributed, who was left out.

    ``started_at`` is when the round was configured (ISO 8601); ``rejected``,
    ``refused`` and ``failed`` are the sites whose update was rejected, that refused the
    round (privacy budget) or whose reply failed; ``metrics`` are the new model's on the
    aggregator's held-out set (null where not computed).
    """

    TYPE: ClassVar[str] = "round_committed"

    started_at: str | None
    ledger_head: HeadRef | None
    model_in: ModelIn
    model_out: ModelOut
    strategy: Strategy
    contributions: list[Contribution]
    rejected: list[LeftOut]
    refused: list[LeftOut]
    failed: list[LeftOut]
    metrics: dict[str, float | None]


class UpdateRejected(RoundEvent):
    """A site's update was left out of a round; its digest is null if it could not be read."""

    TYPE: ClassVar[str] = "update_rejected"

    site: str
    update_digest: Digest | None
    reason: str


class SiteRefused(RoundEvent):
    """A site refused a round, e.g. because it would pass the site's privacy ceiling."""

    TYPE: ClassVar[str] = "site_refused"

    site: str
    reason: str


class ModelApproved(RoundEvent):
    """A person approved a committed round's model (``round_record``: that round's record hash)."""

    TYPE: ClassVar[str] = "model_approved"

    by: str
    reason: str
    model_digest: Digest
    checkpoint: str
    round_record: Digest


class RunFinished(Body):
    """A run committed all its rounds; ``head`` is the ledger's hash just before this record."""

    TYPE: ClassVar[str] = "run_finished"

    rounds: int
    model_digest: Digest
    head: Digest | None


class RunFailed(Body):
    """A run stopped on an error (its type and message)."""

    TYPE: ClassVar[str] = "run_failed"

    error: str


BODY_TYPES: dict[str, type[Body]] = {
    body.TYPE: body
    for body in (RunStarted, RoundCommitted, UpdateRejected, SiteRefused, ModelApproved, RunFinished, RunFailed)
}


# ---------------------------------------------------------------------------- typed records


BodyT = TypeVar("BodyT", bound=Body)


@dataclass(frozen=True)
class Record(Generic[BodyT]):
    """A ledger record with its body typed (``hash``: the record's, see the format)."""

    seq: int
    time: str
    run_id: str
    hash: str
    body: BodyT

    @property
    def type(self) -> str:
        return self.body.TYPE

    @classmethod
    def of(cls, record: Mapping[str, Any], body: BodyT) -> Record[BodyT]:
        """``record`` (as `read_records` or `LineageWriter.append` return it) with ``body`` typed."""
        return cls(seq=record["seq"], time=record["time"], run_id=record["run_id"], hash=record["hash"], body=body)


def _parse(record: Mapping[str, Any], body_type: type[BodyT], source: StrPath | None) -> Record[BodyT]:
    try:
        body = body_type.model_validate(record["body"])
    except ValidationError as exc:
        where = f"record seq {record['seq']} ({record['type']}) body"
        raise LineageError(describe_validation_error(exc, f"{source}: {where}" if source else where)) from None
    return Record.of(record, body)


def parse_record(record: Mapping[str, Any], *, source: StrPath | None = None) -> Record[Body]:
    """A record read by `read_records`, its body parsed as the type its ``type`` names.

    Raises
    ------
    LineageError
        Naming ``source`` (the ledger), the record and each member that is missing,
        unknown or of the wrong kind.
    """
    return _parse(record, BODY_TYPES[record["type"]], source)


def records_of(
    records: Iterable[Mapping[str, Any]],
    body_type: type[BodyT],
    *,
    run_id: str | None = None,
    source: StrPath | None = None,
) -> list[Record[BodyT]]:
    """The records of ``body_type``'s type (and of run ``run_id``, if given), in order, bodies parsed.

    Raises
    ------
    LineageError
        As `parse_record`, for any of those records.
    """
    return [
        _parse(record, body_type, source)
        for record in records
        if record["type"] == body_type.TYPE and (run_id is None or record["run_id"] == run_id)
    ]

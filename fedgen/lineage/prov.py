"""The ledger's provenance as a W3C PROV-JSON document, for compliance tools."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from .format import LineageError, StrPath, digest_member, is_hex_digest, location, read_records

PROV_PREFIXES = {"fedgen": "https://fedgen.invalid/ns#", "sha256": "urn:sha256:"}


def _local(text: Any) -> str:
    """``text`` made safe as the local part of a PROV qualified name (percent-encoded)."""
    return quote(str(text), safe="").replace("~", "%7E")


def _qualified(name: str) -> dict[str, str]:
    return {"$": name, "type": "prov:QUALIFIED_NAME"}


class _ProvDocument:
    """A PROV-JSON document under construction, with unique relation ids."""

    _RELATION_PREFIXES = {
        "wasGeneratedBy": "wgb",
        "used": "u",
        "wasAssociatedWith": "waw",
        "wasAttributedTo": "wat",
        "wasDerivedFrom": "wdf",
    }

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, dict[str, Any]]] = {"entity": {}, "activity": {}, "agent": {}}
        self.relations: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in self._RELATION_PREFIXES}
        self.generated: set[str] = set()

    def node(self, kind: str, identifier: str, attributes: dict[str, Any]) -> str:
        """Add a node unless it exists (it keeps the attributes it was first given; None ones are left out)."""
        self.nodes[kind].setdefault(
            identifier, {name: value for name, value in attributes.items() if value is not None}
        )
        return identifier

    def relate(self, kind: str, **members: Any) -> None:
        table = self.relations[kind]
        identifier = f"_:{self._RELATION_PREFIXES[kind]}{len(table) + 1}"
        table[identifier] = {f"prov:{name}": value for name, value in members.items() if value is not None}

    def generated_by(self, entity: str, activity: str, time: str | None = None) -> None:
        """Record the entity's generation; an entity is generated once, by its first activity."""
        if entity not in self.generated:
            self.generated.add(entity)
            self.relate("wasGeneratedBy", entity=entity, activity=activity, time=time)

    def model(self, digest: str, run_id: str, round_number: Any) -> str:
        return self.node(
            "entity",
            f"sha256:{digest}",
            {"prov:type": _qualified("fedgen:Model"), "fedgen:run": run_id, "fedgen:round": round_number},
        )

    def aggregator(self, signer: str) -> str:
        return self.node(
            "agent",
            f"fedgen:aggregator-{signer[:16]}",
            {"prov:type": _qualified("prov:SoftwareAgent"), "fedgen:certificateFingerprint": signer},
        )

    def site(self, site: str) -> str:
        return self.node(
            "agent", f"fedgen:site-{_local(site)}", {"prov:type": _qualified("prov:Organization"), "fedgen:site": site}
        )

    def document(self) -> dict[str, Any]:
        return {"prefix": dict(PROV_PREFIXES), **self.nodes, **self.relations}


def _add_round(document: _ProvDocument, record: dict[str, Any]) -> None:
    body, run_id = record["body"], record["run_id"]
    number = body.get("round", f"seq{record['seq']}")
    round_name = f"run-{_local(run_id)}-round-{_local(number)}"
    model_in, model_out = digest_member(body, "model_in"), digest_member(body, "model_out")
    attributes = {
        "prov:type": _qualified("fedgen:AggregationRound"),
        "fedgen:run": run_id,
        "fedgen:round": number,
        "prov:endTime": record["time"],
    }
    if isinstance(body.get("started_at"), str):
        attributes["prov:startTime"] = body["started_at"]
    round_id = document.node("activity", f"fedgen:{round_name}", attributes)
    document.relate("wasAssociatedWith", activity=round_id, agent=document.aggregator(record["signer"]))
    input_id = None
    if model_in is not None:
        input_id = document.model(model_in, run_id, number - 1 if isinstance(number, int) else None)
        document.relate("used", activity=round_id, entity=input_id)
    if model_out is not None:
        output_id = document.model(model_out, run_id, number)
        checkpoint = body["model_out"].get("checkpoint")
        if checkpoint is not None:
            document.nodes["entity"][output_id].setdefault("fedgen:checkpoint", checkpoint)
        document.generated_by(output_id, round_id, record["time"])
        if input_id is not None:
            document.relate("wasDerivedFrom", generatedEntity=output_id, usedEntity=input_id)
    contributions = body.get("contributions")
    for contribution in contributions if isinstance(contributions, list) else []:
        _add_contribution(document, contribution, round_name, round_id, input_id)


def _add_contribution(
    document: _ProvDocument, contribution: Any, round_name: str, round_id: str, input_id: str | None
) -> None:
    if not isinstance(contribution, Mapping):
        return
    site, update_digest = contribution.get("site"), contribution.get("update_digest")
    if not isinstance(site, str) or not is_hex_digest(update_digest):
        return
    site_id = document.site(site)
    training_id = document.node(
        "activity",
        f"fedgen:{round_name}-site-{_local(site)}",
        {"prov:type": _qualified("fedgen:LocalTraining"), "fedgen:site": site},
    )
    document.relate("wasAssociatedWith", activity=training_id, agent=site_id)
    if input_id is not None:
        document.relate("used", activity=training_id, entity=input_id)
    attributes: dict[str, Any] = {"prov:type": _qualified("fedgen:ModelUpdate"), "fedgen:site": site}
    attributes.update(
        {f"fedgen:{key}": contribution[key] for key in ("examples", "epsilon", "delta") if key in contribution}
    )
    update_id = document.node("entity", f"sha256:{update_digest}", attributes)
    document.generated_by(update_id, training_id)
    document.relate("wasAttributedTo", entity=update_id, agent=site_id)
    document.relate("used", activity=round_id, entity=update_id)


def _add_approval(document: _ProvDocument, record: dict[str, Any]) -> None:
    body = record["body"]
    person = str(body.get("by", "unknown"))
    person_id = document.node(
        "agent", f"fedgen:person-{_local(person)}", {"prov:type": _qualified("prov:Person"), "fedgen:name": person}
    )
    attributes = {
        "prov:type": _qualified("fedgen:ModelApproval"),
        "fedgen:run": record["run_id"],
        "prov:endTime": record["time"],
    }
    attributes.update({f"fedgen:{key}": body[key] for key in ("round", "reason") if key in body})
    approval_id = document.node(
        "activity", f"fedgen:run-{_local(record['run_id'])}-approval-{record['seq']}", attributes
    )
    document.relate("wasAssociatedWith", activity=approval_id, agent=person_id)
    if is_hex_digest(body.get("model_digest")):
        model_id = document.model(body["model_digest"], record["run_id"], body.get("round"))
        document.relate("used", activity=approval_id, entity=model_id)


def export_prov(path: StrPath) -> dict[str, Any]:
    """The ledger's provenance as a W3C PROV-JSON document.

    Global model versions and site updates become entities (``sha256:<digest>``); rounds,
    sites' local training and model approvals become activities; the aggregator, the
    sites and approving people become agents; generation, usage, association, attribution
    and derivation relate them. Records are read, not verified: run `verify` first.

    Returns
    -------
    dict
        ``prefix``, ``entity``, ``activity``, ``agent`` and the relation tables
        ``wasGeneratedBy``, ``used``, ``wasAssociatedWith``, ``wasAttributedTo``,
        ``wasDerivedFrom``, each keyed by ``_:<kind><n>``.

    Raises
    ------
    LineageError
        If the ledger cannot be read, a whole line is malformed, or a round's model
        digests are.
    """
    document = _ProvDocument()
    for position, record in enumerate(read_records(path)):
        try:
            if record["type"] == "round_committed":
                _add_round(document, record)
            elif record["type"] == "model_approved":
                _add_approval(document, record)
        except LineageError as exc:
            raise LineageError(f"{path}: {location(position + 1)}: {exc}") from None
    return document.document()

"""Ledgers written by earlier fedgen still verify, read, show and export as they did then.

The fixtures (tests/unit/fixtures/lineage-v1, see its README) were written by real runs of
the code before the lineage became a package and its bodies types; the PROV documents,
`lineage show` cells and model card beside them are what that code made of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from fedgen import pki
from fedgen.cli import app
from fedgen.lineage import RECORD_TYPES, canonical_encoding, export_prov, read_records, record_hash, verify
from fedgen.lineage.records import BODY_TYPES, parse_record
from fedgen.model_release import approvals_of, find_round, model_card, privacy_spend

FIXTURES = Path(__file__).parent / "fixtures" / "lineage-v1"
LEDGERS = ("run", "failed")


def ledger(name: str) -> Path:
    return FIXTURES / f"{name}.jsonl"


def signer(name: str):
    return pki.load_certificate(FIXTURES / f"{name}-signer.pem")


@pytest.mark.parametrize("name", LEDGERS)
def test_an_earlier_ledger_verifies_against_its_ca(name: str):
    lines = ledger(name).read_bytes().splitlines()
    report = verify(ledger(name), signer(name), ca_certificate=pki.load_certificate(FIXTURES / f"{name}-ca.pem"))
    assert report.ok, report.error
    assert report.records == len(lines) and not report.incomplete_tail
    assert report.head_hash == json.loads(lines[-1])["hash"]


@pytest.mark.parametrize("name", LEDGERS)
def test_every_earlier_line_is_its_records_canonical_encoding_and_hash(name: str):
    lines = ledger(name).read_bytes().splitlines(keepends=True)
    records = read_records(ledger(name))
    assert len(records) == len(lines)
    for line, record in zip(lines, records):
        assert canonical_encoding(record) + b"\n" == line
        assert record_hash(record) == record["hash"]


@pytest.mark.parametrize("name", LEDGERS)
def test_every_earlier_body_reads_as_its_type_and_writes_back_the_same_bytes(name: str):
    for record in read_records(ledger(name)):
        typed = parse_record(record, source=ledger(name))
        assert type(typed.body) is BODY_TYPES[record["type"]] and typed.type == record["type"]
        assert (typed.seq, typed.time, typed.run_id, typed.hash) == (
            record["seq"],
            record["time"],
            record["run_id"],
            record["hash"],
        )
        assert canonical_encoding(typed.body.dump()) == canonical_encoding(record["body"])


def test_the_earlier_ledgers_hold_every_record_type():
    types = {record["type"] for name in LEDGERS for record in read_records(ledger(name))}
    assert types == set(RECORD_TYPES)


@pytest.mark.parametrize("name", LEDGERS)
def test_an_earlier_ledger_exports_the_same_prov_document(name: str):
    expected = json.loads((FIXTURES / f"{name}-prov.json").read_text(encoding="utf-8"))
    assert export_prov(ledger(name)) == expected


@pytest.mark.parametrize("name", LEDGERS)
def test_lineage_show_makes_the_same_table_of_an_earlier_ledger(name: str, monkeypatch: pytest.MonkeyPatch):
    shown: list[Table] = []
    monkeypatch.setattr(Console, "print", lambda console, table, *args, **kwargs: shown.append(table))
    result = CliRunner().invoke(app, ["lineage", "show", "--ledger", str(ledger(name))])
    assert result.exit_code == 0, result.output
    [table] = shown
    rows = [list(row) for row in zip(*(column._cells for column in table.columns))]
    assert rows == json.loads((FIXTURES / f"{name}-show.json").read_text(encoding="utf-8"))


def test_an_earlier_ledger_gives_the_same_model_card():
    path = ledger("run")
    entry = find_round(path, 1)
    head = verify(path, signer("run")).head_hash
    card = model_card(entry, approvals_of(path, entry), privacy_spend(path, entry), head)
    assert card == (FIXTURES / "run-MODEL_CARD.md").read_text(encoding="utf-8")

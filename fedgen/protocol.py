"""The messages site and aggregator exchange: record keys, instructions, replies.

Client and server meet only here. A train message carries the trainable tensors and a
ConfigRecord of instructions, including the lineage ledger's head when the round was
configured; a reply carries the updated tensors, a MetricRecord and the site's identity,
with its signature over its update and that head (`fedgen.lineage.witness_statement`).
Nothing else leaves a site: no sequence, no path, no per-sample value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from flwr.app import ConfigRecord, MetricRecord

from fedgen.lineage import LedgerHead

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
SITE_KEY = "site"
WEIGHT_KEY = "num-examples"

# Custom error code of a site that refuses a round to protect its privacy budget.
BUDGET_REFUSED = 1001
# Custom error code of a site whose local data does not fit the run (labels, format).
SITE_DATA_ERROR = 1002
# Custom error code of any other failure on a site; details stay in the site's own log.
SITE_ERROR = 1003
# Custom error code of a site that refuses to train the run's model: its own copy of the
# base differs from the run's, or per-sample gradients fail the check DP depends on.
MODEL_REFUSED = 1004

# The lineage ledger notice a round's instructions carry (absent when the run keeps no lineage).
LEDGER_NOTICE_KEYS = {
    "seq": "ledger-seq",
    "hash": "ledger-head",
    "signature": "ledger-head-signature",
    "signer": "ledger-signer",
    "round": "ledger-round",
}


class ProtocolError(ValueError):
    """A message does not carry what the protocol requires."""


@dataclass(frozen=True)
class LedgerNotice:
    """What a round's instructions show the sites of the lineage ledger, for them to witness.

    Attributes
    ----------
    head
        The ledger's last record when the round was configured.
    signer
        PEM of the lineage-signing certificate whose signature ``head`` carries.
    round
        The number the ledger records the round under (a resumed run numbers its rounds
        on, while the instructions' ``server_round`` counts this run's rounds from 1).
    """

    head: LedgerHead
    signer: str
    round: int


@dataclass(frozen=True)
class TrainInstructions:
    """What the aggregator asks of a site for one round."""

    server_round: int
    num_rounds: int
    model_config: str  # ModelConfig as JSON
    tokenizer: str
    label_names: list[str]
    local_epochs: float
    batch_size: int
    learning_rate: float
    seed: int
    proximal_mu: float = 0.0
    ledger: LedgerNotice | None = None

    def to_record(self) -> ConfigRecord:
        record = ConfigRecord(
            {
                "server-round": self.server_round,
                "num-rounds": self.num_rounds,
                "model-config": self.model_config,
                "tokenizer": self.tokenizer,
                "label-names": list(self.label_names),
                "local-epochs": float(self.local_epochs),
                "batch-size": self.batch_size,
                "lr": float(self.learning_rate),
                "seed": self.seed,
                "proximal-mu": float(self.proximal_mu),
            }
        )
        if self.ledger is not None:
            put_ledger_notice(record, self.ledger)
        return record

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainInstructions:
        """Parse a train ConfigRecord; a missing or mistyped key raises ProtocolError."""
        expected = {
            "server-round": int,
            "num-rounds": int,
            "model-config": str,
            "tokenizer": str,
            "label-names": list,
            "local-epochs": float,
            "batch-size": int,
            "lr": float,
            "seed": int,
        }
        values = {}
        for key, kind in expected.items():
            if key not in record:
                raise ProtocolError(f"train message lacks config key {key!r}")
            value = record[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ProtocolError(f"config key {key!r} should be {kind.__name__}, got {value!r}")
            values[key] = value
        return cls(
            server_round=values["server-round"],
            num_rounds=values["num-rounds"],
            model_config=values["model-config"],
            tokenizer=values["tokenizer"],
            label_names=[str(v) for v in values["label-names"]],
            local_epochs=values["local-epochs"],
            batch_size=values["batch-size"],
            learning_rate=values["lr"],
            seed=values["seed"],
            # FedProx adds this key itself in configure_train.
            proximal_mu=float(record.get("proximal-mu", 0.0)),
            ledger=_ledger_notice(record),
        )


def put_ledger_notice(record: ConfigRecord, notice: LedgerNotice) -> None:
    """Write the lineage ledger notice into train instructions."""
    for name, value in (
        ("seq", notice.head.seq),
        ("hash", notice.head.hash),
        ("signature", notice.head.signature),
        ("signer", notice.signer),
        ("round", notice.round),
    ):
        record[LEDGER_NOTICE_KEYS[name]] = value


def _ledger_notice(record: ConfigRecord) -> LedgerNotice | None:
    """The ledger notice of train instructions: all its keys, or none."""
    present = [key for key in LEDGER_NOTICE_KEYS.values() if key in record]
    if not present:
        return None
    if len(present) < len(LEDGER_NOTICE_KEYS):
        missing = sorted(set(LEDGER_NOTICE_KEYS.values()) - set(present))
        raise ProtocolError(f"train message carries part of the ledger notice: it lacks {missing}")
    values = {name: record[key] for name, key in LEDGER_NOTICE_KEYS.items()}
    for name in ("seq", "round"):
        if not isinstance(values[name], int) or isinstance(values[name], bool) or values[name] < 0:
            raise ProtocolError(
                f"config key {LEDGER_NOTICE_KEYS[name]!r} should be a non-negative int, got {values[name]!r}"
            )
    for name in ("hash", "signature", "signer"):
        if not isinstance(values[name], str):
            raise ProtocolError(f"config key {LEDGER_NOTICE_KEYS[name]!r} should be str, got {values[name]!r:.80}")
    return LedgerNotice(
        LedgerHead(values["seq"], values["hash"], values["signature"]), values["signer"], values["round"]
    )


@dataclass(frozen=True)
class TrainReport:
    """The metrics a site reports with its update; ε is its accountant's, after the round.

    ``train_seconds`` is the time the site spent inside local training (None in a reply
    from a site that does not report it).
    """

    num_examples: int
    train_loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    epsilon: float
    delta: float
    dp: bool
    train_seconds: float | None = None

    _KEYS = {
        "num_examples": WEIGHT_KEY,
        "train_loss": "train-loss",
        "steps": "steps",
        "sample_rate": "sample-rate",
        "noise_multiplier": "noise-multiplier",
        "max_grad_norm": "max-grad-norm",
        "epsilon": "epsilon",
        "delta": "delta",
        "dp": "dp",
        "train_seconds": "train-seconds",
    }
    _OPTIONAL = ("train_seconds",)  # absent from replies of sites before it was reported

    def to_record(self) -> MetricRecord:
        record = MetricRecord()
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            record[self._KEYS[f.name]] = int(value) if isinstance(value, (bool, int)) else float(value)
        return record

    @classmethod
    def from_record(cls, record: MetricRecord) -> TrainReport:
        missing = [key for name, key in cls._KEYS.items() if key not in record and name not in cls._OPTIONAL]
        if missing:
            raise ProtocolError(f"train reply lacks metrics {missing}")
        kwargs = {name: record[key] for name, key in cls._KEYS.items() if key in record}
        for name, value in kwargs.items():  # a site's numbers go into the lineage: numbers only
            key = cls._KEYS[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ProtocolError(f"train reply metric {key!r} is not a number")
            if name in ("num_examples", "steps") and (value < 0 or value != int(value)):
                raise ProtocolError(f"train reply metric {key!r} is not a count")
            if name == "train_seconds" and not (math.isfinite(value) and value >= 0):
                raise ProtocolError(f"train reply metric {key!r} is not a duration: {value!r}")
        kwargs["num_examples"] = int(kwargs["num_examples"])
        kwargs["steps"] = int(kwargs["steps"])
        kwargs["dp"] = bool(kwargs["dp"])
        if "train_seconds" in kwargs:
            kwargs["train_seconds"] = float(kwargs["train_seconds"])
        return cls(**kwargs)


def site_record(
    site_id: str, update_digest: str, signature: bytes | None = None, certificate_pem: str | None = None
) -> ConfigRecord:
    """Who sent an update, its digest and, in deployment, the site's signature over it.

    The signature is the site key's ECDSA signature over the round's
    `fedgen.lineage.witness_statement` (update digest, ledger head, round, run id); the
    certificate lets the aggregator and later an auditor check it against the consortium CA.
    """
    record = ConfigRecord({"site-id": site_id, "update-digest": update_digest})
    if signature is not None and certificate_pem is not None:
        record["signature"] = signature
        record["certificate"] = certificate_pem
    return record

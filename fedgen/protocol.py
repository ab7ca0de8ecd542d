"""The messages site and aggregator exchange: record keys, instructions, replies.

Client and server meet only here. A train message carries the trainable tensors and a
ConfigRecord of instructions; a reply carries the updated tensors, a MetricRecord and
the site's identity. Nothing else leaves a site: no sequence, no path, no per-sample
value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from flwr.app import ConfigRecord, MetricRecord

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


class ProtocolError(ValueError):
    """A message does not carry what the protocol requires."""


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

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
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

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainInstructions:
        """Parse a train ConfigRecord; a missing or mistyped key raises ProtocolError."""
        expected = {
            "server-round": int, "num-rounds": int, "model-config": str, "tokenizer": str,
            "label-names": list, "local-epochs": float, "batch-size": int, "lr": float,
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
        )


@dataclass(frozen=True)
class TrainReport:
    """The metrics a site reports with its update; ε is its accountant's, after the round."""

    num_examples: int
    train_loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    epsilon: float
    delta: float
    dp: bool

    _KEYS = {
        "num_examples": WEIGHT_KEY, "train_loss": "train-loss", "steps": "steps",
        "sample_rate": "sample-rate", "noise_multiplier": "noise-multiplier",
        "max_grad_norm": "max-grad-norm", "epsilon": "epsilon", "delta": "delta", "dp": "dp",
    }

    def to_record(self) -> MetricRecord:
        record = MetricRecord()
        for f in fields(self):
            value = getattr(self, f.name)
            record[self._KEYS[f.name]] = int(value) if isinstance(value, (bool, int)) else float(value)
        return record

    @classmethod
    def from_record(cls, record: MetricRecord) -> TrainReport:
        missing = [key for key in cls._KEYS.values() if key not in record]
        if missing:
            raise ProtocolError(f"train reply lacks metrics {missing}")
        kwargs = {name: record[key] for name, key in cls._KEYS.items()}
        kwargs["num_examples"] = int(kwargs["num_examples"])
        kwargs["steps"] = int(kwargs["steps"])
        kwargs["dp"] = bool(kwargs["dp"])
        return cls(**kwargs)


def site_record(site_id: str, update_digest: str, signature: bytes | None = None,
                certificate_pem: str | None = None) -> ConfigRecord:
    """Who sent an update, its digest and, in deployment, the site's signature over it.

    The signature is the site key's ECDSA signature over the update digest
    (`fedgen.pki.sign_digest`); the certificate lets the aggregator and later an auditor
    check it against the consortium CA.
    """
    record = ConfigRecord({"site-id": site_id, "update-digest": update_digest})
    if signature is not None and certificate_pem is not None:
        record["signature"] = signature
        record["certificate"] = certificate_pem
    return record

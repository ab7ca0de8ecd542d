"""Typed configuration both sides agree on, and strict TOML loading and writing.

Unknown keys and wrong types are errors that name the file and the field, so a typo in
an operator's config stops the launcher before any process starts. Types are strict:
``runtime_port = "19120"`` is an error, not a port.

Paths: a relative path inside a config file is relative to that file's folder. In
memory, a config's paths are usable as they are from the working directory (`load_toml`
resolves them); `write_toml` writes them back relative to the file or absolute, so a
file reads the same from any working directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import tomllib
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from fedgen import atomic

from .errors import FedgenError

STRATEGY_NAMES = ("fedavg", "fedprox", "fedadam", "fedtrimmedavg", "krum", "median")


class ConfigError(FedgenError, ValueError):
    """A configuration file or value is invalid; the message names where and why."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# TOML has no path type: a path is written as a string, so path fields alone accept one.
ConfigPath = Annotated[Path, Strict(False)]


class PrivacyConfig(StrictModel):
    """A site's sample-level differential-privacy settings; the site enforces them."""

    enabled: bool = True
    epsilon: float = Field(8.0, gt=0, description="ceiling on the total epsilon this site ever spends")
    delta: float = Field(1e-5, gt=0, lt=1)
    noise_multiplier: float | None = Field(
        None, gt=0, description="fixed noise multiplier; unset = calibrated to the ceiling"
    )
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"


class SiteTLSConfig(StrictModel):
    """The site's consortium-issued certificate and key, and the CA it trusts."""

    certificate: ConfigPath
    private_key: ConfigPath
    ca_certificate: ConfigPath


class SiteConfig(StrictModel):
    """What a site operator configures: identity, local data, device and privacy budget.

    ``aggregator`` and ``tls`` are needed to join a deployment (`fedgen site start`),
    not in simulation.
    """

    site_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: ConfigPath
    state_dir: ConfigPath
    device: str = "auto"
    privacy: PrivacyConfig = PrivacyConfig()
    aggregator: str | None = Field(None, pattern=r"^\S+:\d+$", description="host:port of the Fleet API")
    tls: SiteTLSConfig | None = None
    runtime_port: int = Field(9094, ge=1, le=65535, description="loopback port for ClientApp processes")
    base_model: ConfigPath | None = Field(
        None, description="this site's copy of the run's Hugging Face base checkpoint (a folder)"
    )
    trust_remote_code: bool = Field(False, description="run modeling code shipped inside the base checkpoint")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast precision on a GPU that supports it; refused under DP"
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")


class TrainingConfig(StrictModel):
    """What the coordinator chooses for a run: rounds, strategy, model, local training."""

    rounds: int = Field(5, ge=1)
    strategy: str = "fedavg"
    strategy_options: dict[str, float] = {}
    local_epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    model: str = Field("nano", description="a built-in preset, or the aggregator's Hugging Face checkpoint folder")
    tokenizer: str = Field("kmer3s1", description="built-in presets only; a checkpoint brings its own")
    finetune: Literal["auto", "full", "lora", "ffa-lora"] = Field(
        "auto", description="auto: full for built-in presets, lora for a checkpoint"
    )
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] = Field([], description="modules LoRA wraps; empty = the architecture's default")
    trust_remote_code: bool = Field(False, description="the aggregator runs modeling code shipped in its checkpoint")
    seed: int = 0
    round_timeout: float = Field(900.0, gt=0, description="seconds to wait for the sites' replies")
    site_wait: float = Field(600.0, gt=0, description="seconds to wait for the sites to connect")
    min_updates: int = Field(1, ge=1, description="quorum: valid updates a round needs to commit")
    max_update_norm: float | None = Field(None, gt=0, description="bound on ||site - global||; unset = none")
    max_update_mb: float = Field(512.0, gt=0, description="largest update accepted from one site")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {value!r}; choose one of {', '.join(STRATEGY_NAMES)}")
        return value


class AggregatorTLSConfig(StrictModel):
    """The aggregator's server certificate and key, the consortium CA and its CRL."""

    certificate: ConfigPath
    private_key: ConfigPath
    ca_certificate: ConfigPath
    crl: ConfigPath


class LineageSigningConfig(StrictModel):
    """The aggregator's lineage-signing certificate and key (`fedgen certs issue lineage`), not its TLS pair."""

    certificate: ConfigPath
    private_key: ConfigPath


class AggregatorConfig(StrictModel):
    """What the consortium operator configures for the aggregator (SuperLink)."""

    state_dir: ConfigPath
    fleet_host: str = Field("0.0.0.0", description="interface of the public, mutual-TLS Fleet API")
    fleet_port: int = Field(9092, ge=1, le=65535)
    control_port: int = Field(9093, ge=1, le=65535, description="loopback-only Control and Runtime APIs")
    tls: AggregatorTLSConfig
    lineage: LineageSigningConfig


class RunConfig(StrictModel):
    """What the coordinator submits: the training plan and the aggregator's held-out set."""

    aggregator: ConfigPath = Field(description="the aggregator.toml of the SuperLink to run on")
    sites: int = Field(ge=1, description="sites that must be connected; all train each round")
    labels: list[str] = Field(min_length=2, description="class labels every site agrees on")
    max_length: int = Field(512, ge=1, description="longest sequence in bases the model accepts")
    eval_data: ConfigPath | None = Field(None, description="held-out set on the aggregator")
    training: TrainingConfig = TrainingConfig()


Model = TypeVar("Model", bound=BaseModel)


def to_toml(config: BaseModel, destination: str | Path) -> str:
    """Render ``config`` as the TOML text of the file ``destination`` (unset optional fields omitted).

    A path inside ``destination``'s folder is written relative to it, any other path
    absolute, so `load_toml` reads the same files back from any working directory.
    """
    folder = Path(os.path.abspath(Path(destination).parent))
    return _toml_table(config.model_dump(exclude_none=True), prefix="", folder=folder)


def write_toml(config: BaseModel, path: str | Path) -> Path:
    """Write ``config`` to ``path`` (see `to_toml`), whole or not at all."""
    return atomic.write_text(path, to_toml(config, path))


def _toml_path(value: Path, folder: Path) -> str:
    target = Path(os.path.abspath(value))
    return (target.relative_to(folder) if target.is_relative_to(folder) else target).as_posix()


def _toml_value(value: object, folder: Path) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(_toml_path(value, folder))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item, folder) for item in value) + "]"
    return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings


def _toml_table(values: dict, prefix: str, folder: Path) -> str:
    scalars = [f"{key} = {_toml_value(value, folder)}" for key, value in values.items() if not isinstance(value, dict)]
    tables = [
        f"\n[{prefix}{key}]\n" + _toml_table(value, f"{prefix}{key}.", folder)
        for key, value in values.items()
        if isinstance(value, dict)
    ]
    return "\n".join(scalars) + ("\n" if scalars else "") + "".join(tables)


def describe_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: ``source: field.path: message``."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key (check its spelling or remove it)"
        lines.append(f"{source}: {field}: {message}")
    return "\n".join(lines)


def load_toml(path: str | Path, model: type[Model]) -> Model:
    """Load and validate a TOML file; relative paths inside resolve against its folder.

    The paths of the config returned are absolute, so they keep their meaning if the
    working directory changes or they are handed to another process.

    Raises
    ------
    ConfigError
        If the file is missing, is not valid TOML, or fails validation.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        config = model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(path))) from None
    return _resolve_paths(config, Path(os.path.abspath(path)).parent)


def _resolve_paths(config: Model, base: Path) -> Model:
    updates: dict[str, object] = {}
    for name, value in config:
        if isinstance(value, Path) and not value.is_absolute():
            updates[name] = base / value
        elif isinstance(value, BaseModel):
            updates[name] = _resolve_paths(value, base)
    return config.model_copy(update=updates) if updates else config

"""Shared fixtures: a tiny labelled site, the train message an aggregator would send, and the
mark that lets a test find every process it started."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedgen.sovereignty import NO_PHONE_HOME

# Every test runs with Flower's and Ray's phone-home switched off, as launchers do.
os.environ.update(NO_PHONE_HOME)

from flwr.app import RecordDict  # noqa: E402

from fedgen.data import load_bundled  # noqa: E402
from fedgen.model import build_model, preset_config  # noqa: E402
from fedgen.params import arrays_to_record, to_numpy, trainable_tensors  # noqa: E402
from fedgen.protocol import ARRAYS_KEY, CONFIG_KEY, TrainInstructions  # noqa: E402
from fedgen.tokenizers import make_tokenizer  # noqa: E402

from .integration.processes import MARK_VARIABLE, ProcessTree  # noqa: E402

TOKENIZER = "kmer4s1"


def write_site(
    root: Path,
    n: int = 120,
    *,
    epsilon: float = 8.0,
    noise_multiplier: float | None = None,
    enabled: bool = True,
    offset: int = 0,
) -> Path:
    """A site folder with ``n`` bundled sequences, a site.toml and an empty state dir."""
    data = load_bundled("train")
    root.mkdir(parents=True, exist_ok=True)
    rows = ["sequence,label"] + [
        f"{data.sequences[i]},{data.label_names[data.labels[i]]}" for i in range(offset, offset + n)
    ]
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    privacy = [f"enabled = {str(enabled).lower()}", f"epsilon = {epsilon}"]
    if noise_multiplier is not None:
        privacy.append(f"noise_multiplier = {noise_multiplier}")
    (root / "site.toml").write_text(
        f'site_id = "{root.name}"\ndata = "data.csv"\nstate_dir = "state"\ndevice = "cpu"\n'
        "[privacy]\n" + "\n".join(privacy) + "\n"
    )
    return root / "site.toml"


def train_message(
    server_round: int = 1, num_rounds: int = 3, *, batch_size: int = 16, local_epochs: float = 1.0
) -> RecordDict:
    tokenizer = make_tokenizer(TOKENIZER)
    cfg = preset_config("nano", vocab_size=tokenizer.vocab_size, max_len=tokenizer.token_length(70))
    model = build_model(cfg)
    instructions = TrainInstructions(
        server_round=server_round,
        num_rounds=num_rounds,
        model_config=cfg.to_json(),
        tokenizer=TOKENIZER,
        label_names=["0", "1"],
        local_epochs=local_epochs,
        batch_size=batch_size,
        learning_rate=1e-3,
        seed=0,
    )
    return RecordDict(
        {ARRAYS_KEY: arrays_to_record(to_numpy(trainable_tensors(model))), CONFIG_KEY: instructions.to_record()}
    )


@pytest.fixture
def site_toml(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site-a")


@pytest.fixture
def flower_task():
    """Building a Message needs the identity of the running Flower task (set by Flower itself
    inside a ServerApp or ClientApp process; here, by hand)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id = TaskIdentity._task_id = TaskIdentity._node_id = None


@pytest.fixture(autouse=True)
def process_tree(monkeypatch) -> ProcessTree:
    """The processes this test starts: each inherits the test's own mark through its environment.

    Autouse, so the mark is set before any other fixture of the test builds an environment.
    """
    tree = ProcessTree.new()
    monkeypatch.setenv(MARK_VARIABLE, tree.mark)
    return tree


@pytest.fixture(scope="session")
def hf_bases(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints of real architectures, built once per session: ``esm``
    (Nucleotide Transformer shape), ``bert`` (DNABERT shape), ``esm-other`` (another seed:
    another base digest) and ``mixing`` (remote code whose forward mixes samples)."""
    from fedgen.hf.random import bert_checkpoint, esm_checkpoint

    from .hf_checkpoints import mixing_checkpoint

    root = tmp_path_factory.mktemp("hf-bases")
    esm = esm_checkpoint(root / "esm")
    return {
        "esm": esm,
        "bert": bert_checkpoint(root / "bert"),
        "esm-other": esm_checkpoint(root / "esm-other", seed=1),
        "mixing": mixing_checkpoint(root / "mixing", tokenizer_from=esm),
    }


def model_message(model_config, model, *, tokenizer: str = "", batch_size: int = 16) -> RecordDict:
    """The train message an aggregator sends for ``model`` (built from ``model_config``)."""
    instructions = TrainInstructions(
        server_round=1,
        num_rounds=1,
        model_config=model_config.to_json(),
        tokenizer=tokenizer,
        label_names=["0", "1"],
        local_epochs=1.0,
        batch_size=batch_size,
        learning_rate=1e-3,
        seed=0,
    )
    return RecordDict(
        {ARRAYS_KEY: arrays_to_record(to_numpy(trainable_tensors(model))), CONFIG_KEY: instructions.to_record()}
    )

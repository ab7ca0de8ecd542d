"""A site's warm cache: later rounds in one process reuse the tokenised data, the base digest and
the model, give the same updates as cold rounds, and notice a changed data file or base."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest

from fedgen.client.ledger import BudgetExceeded, PrivacyLedger
from fedgen.client.round import train_round
from fedgen.client.warm import WarmCache, content_digest, file_state
from fedgen.config import SiteConfig, TrainingConfig, load_toml
from fedgen.data import DataError
from fedgen.model_source import BaseModelMismatch, LocalBase, build_classifier, resolve_model_config
from fedgen.params import digest, record_to_arrays
from fedgen.protocol import ARRAYS_KEY, METRICS_KEY, TrainReport

from ..conftest import model_message, train_message, write_site


def _report(reply) -> TrainReport:
    """The site's report, less its timing (which no two runs share)."""
    return dataclasses.replace(TrainReport.from_record(reply[METRICS_KEY]), train_seconds=None)


def test_a_second_round_reuses_data_and_model_and_matches_a_cold_round(tmp_path):
    warm_site = load_toml(write_site(tmp_path / "warm" / "site-a"), SiteConfig)
    cold_site = load_toml(write_site(tmp_path / "cold" / "site-a"), SiteConfig)  # same id, data and settings
    warm = WarmCache()
    warm_replies = [train_round(warm_site, train_message(r), run_id=1, warm=warm) for r in (1, 2)]
    assert warm.counts == {"data_loads": 1, "model_builds": 1}  # round 2 loaded and built nothing
    cold_replies = [train_round(cold_site, train_message(r), run_id=1, warm=WarmCache()) for r in (1, 2)]
    # The reused model and data give exactly the updates and the privacy spend of fresh ones.
    for warm_reply, cold_reply in zip(warm_replies, cold_replies, strict=True):
        assert digest(record_to_arrays(warm_reply[ARRAYS_KEY])) == digest(record_to_arrays(cold_reply[ARRAYS_KEY]))
        assert _report(warm_reply) == _report(cold_reply)
    ledger = PrivacyLedger.open(warm_site.state_dir, accountant="rdp", delta=1e-5)
    assert [r["round"] for r in ledger.rounds] == [1, 2]
    assert _report(warm_replies[1]).epsilon == pytest.approx(ledger.epsilon)


def test_a_changed_data_file_is_read_again_even_at_the_same_size_and_moment(tmp_path):
    site = load_toml(write_site(tmp_path / "site-a", n=40), SiteConfig)
    warm = WarmCache()
    message = train_message()
    before = warm.tokenised(site.data, _config(message), "kmer4s1", ["0", "1"], None)
    data = site.data.read_text().splitlines()
    swapped = [data[0]] + [line[:-1] + ("1" if line.endswith("0") else "0") for line in data[1:]]
    stat = site.data.stat()
    site.data.write_text("\n".join(swapped) + "\n")
    os.utime(site.data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    after = warm.tokenised(site.data, _config(message), "kmer4s1", ["0", "1"], None)
    assert warm.counts["data_loads"] == 2
    assert after.ids.equal(before.ids) and (after.labels == 1 - before.labels).all()
    # Rewritten with the same bytes: the content digest matches, nothing is tokenised again.
    site.data.write_text("\n".join(swapped) + "\n")
    assert warm.tokenised(site.data, _config(message), "kmer4s1", ["0", "1"], None) is after
    assert warm.counts["data_loads"] == 2
    # A data file that went bad is refused every round, never served from the cache.
    site.data.write_text(data[0] + "\nACGTXACGT,1\n")
    for _ in range(2):
        with pytest.raises(DataError, match="line 2"):
            warm.tokenised(site.data, _config(message), "kmer4s1", ["0", "1"], None)


def test_file_state_and_digest_of_a_folder_cover_every_file(tmp_path):
    folder = tmp_path / "data"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "a.csv").write_text("x")
    state, content = file_state(folder), content_digest(folder)
    (folder / "train" / "b.csv").write_text("y")
    assert [name for name, *_ in file_state(folder)] == ["train/a.csv", "train/b.csv"]
    assert file_state(folder) != state and content_digest(folder) != content


def test_a_hugging_face_base_is_digested_once_per_state_and_still_pinned(hf_bases, tmp_path):
    folder = shutil.copytree(hf_bases["esm"], tmp_path / "base")
    config = resolve_model_config(str(folder), TrainingConfig(), num_labels=2, max_bases=120)
    message = model_message(config, build_classifier(config, LocalBase(folder)))
    toml = write_site(tmp_path / "site-a", n=32)
    site = load_toml(toml, SiteConfig).model_copy(update={"base_model": folder})
    warm = WarmCache()
    for server_round in (1, 2):
        train_round(site, message, run_id=server_round, warm=warm)
    assert warm.counts == {"base_digests": 1, "data_loads": 1, "model_builds": 1}
    # Another base put in its place is digested again, and refused: the run is pinned.
    shutil.rmtree(folder)
    shutil.copytree(hf_bases["esm-other"], folder)
    with pytest.raises(BaseModelMismatch, match="pinned to"):
        train_round(site, message, run_id=3, warm=warm)
    assert warm.counts["base_digests"] > 1  # (more than once while its files are too fresh to trust)
    assert len(PrivacyLedger.open(site.state_dir, accountant="rdp", delta=1e-5).rounds) == 2


def test_a_failed_round_does_not_leave_its_model_to_the_next(tmp_path):
    one_round = PrivacyLedger(tmp_path / "x", "rdp", 1e-5).epsilon_after(1.0, 1 / 8, 8)
    toml = write_site(tmp_path / "site-a", epsilon=1.1 * one_round, noise_multiplier=1.0)
    site = load_toml(toml, SiteConfig)
    warm = WarmCache()
    train_round(site, train_message(1), run_id=1, warm=warm)
    with pytest.raises(BudgetExceeded):  # refused after the model was lent to the round
        train_round(site, train_message(2), run_id=1, warm=warm)
    site = site.model_copy(update={"privacy": site.privacy.model_copy(update={"enabled": False})})
    train_round(site, train_message(3), run_id=1, warm=warm)
    assert warm.counts["model_builds"] == 2


def _config(message):
    from fedgen.model_config import model_config_from_json
    from fedgen.protocol import CONFIG_KEY, TrainInstructions

    return model_config_from_json(TrainInstructions.from_record(message[CONFIG_KEY]).model_config)

"""One site round, as the site's worker (or, without one, the ClientApp process) runs it.

The site checks that the lineage ledger head it was sent is signed by the consortium's
lineage signer, takes its tokenised data and model from its warm cache, restores its
privacy ledger, refuses the round if it would pass its ε ceiling, trains (DP-SGD by
default), commits the ledger, keeps a receipt of the head and its update, and builds the
reply: the trainable tensors, its metrics, its site id and its signature over update and
head. The data path and the sequences stay on the site.

Rounds of one site never overlap: :func:`answer_round` holds the site's round lock (an
exclusive lock on a file in its state folder) from the ledger's first read to its commit,
whichever process runs them.
"""

from __future__ import annotations

import fcntl
import logging
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from fedgen.config import SiteConfig
from fedgen.data import DataError
from fedgen.errors import InputError
from fedgen.lineage import witness_statement
from fedgen.lineage.receipts import WitnessError, append_receipt, check_ledger_head, new_receipt
from fedgen.model import resolve_device
from fedgen.model_config import AnyModelConfig, HFModelConfig, model_config_from_json
from fedgen.model_source import BaseModelMismatch, build_classifier
from fedgen.params import (
    arrays_to_record,
    digest,
    load_trainable,
    record_to_arrays,
    to_numpy,
    trainable_tensors,
)
from fedgen.pki import load_certificate, load_private_key, sign_message
from fedgen.protocol import (
    ARRAYS_KEY,
    BUDGET_REFUSED,
    CONFIG_KEY,
    METRICS_KEY,
    MODEL_REFUSED,
    SITE_DATA_ERROR,
    SITE_ERROR,
    SITE_KEY,
    TrainInstructions,
    TrainReport,
    site_record,
)
from fedgen.state_files import ROUND_LOCK_FILE

from .channel import RoundRefused
from .dp_check import CheckKey, PerSampleGradientMismatch, verified_grad_sample_mode
from .ledger import BudgetExceeded, PrivacyLedger
from .trainer import DPSettings, LocalPlan, local_steps, poisson_sample_rate, train_local
from .warm import PROCESS_CACHE, WarmCache

log = logging.getLogger(__name__)


def _site_seed(site_id: str, instructions: TrainInstructions) -> int:
    # Stable across processes (unlike hash()): different per site, round and run seed.
    return zlib.crc32(f"{instructions.seed}/{instructions.server_round}/{site_id}".encode())


def gradient_check_key(model_config: AnyModelConfig) -> CheckKey:
    """What the per-sample gradient check depends on: the base and what trains, not the weights."""
    if isinstance(model_config, HFModelConfig):
        trained = f"{model_config.finetune} r{model_config.lora_rank} " + ",".join(model_config.target_modules)
        return CheckKey(model_config.base_digest, trained)
    return CheckKey("built-in", model_config.to_json())


def train_round(site: SiteConfig, content: RecordDict, run_id: int, warm: WarmCache | None = None) -> RecordDict:
    """Run one local round and build the reply content.

    What does not change between rounds (tokenised data, base digest, built model) comes
    from ``warm``, this process's cache by default.

    Raises
    ------
    WitnessError
        If the site has a certificate and the instructions carry no ledger head signed by
        the consortium's lineage signer (checked before any privacy budget is spent).
    BudgetExceeded
        If the site's ε ceiling does not allow this round.
    DataError
        If the site's data is unreadable or has labels the run does not know.
    """
    warm = PROCESS_CACHE if warm is None else warm
    try:
        return _train_round(site, content, run_id, warm)
    except BaseException:
        warm.forget_model()  # the failed round may have left it half-trained or hooked by Opacus
        raise


def _train_round(site: SiteConfig, content: RecordDict, run_id: int, warm: WarmCache) -> RecordDict:
    instructions = TrainInstructions.from_record(content[CONFIG_KEY])
    notice = instructions.ledger
    if site.tls is not None:
        check_ledger_head(
            notice.head if notice else None,
            notice.signer if notice else None,
            load_certificate(site.tls.ca_certificate),
        )
    model_config = model_config_from_json(instructions.model_config)
    base = warm.base(site)
    data = warm.tokenised(site.data, model_config, instructions.tokenizer, instructions.label_names, base)
    ids, labels = data.ids, data.labels

    device = resolve_device(site.device)
    model = warm.model(model_config, base, device)  # refuses a base other than the run's
    load_trainable(model, record_to_arrays(content[ARRAYS_KEY]))

    n = data.num_examples
    batch_size = min(instructions.batch_size, n)
    plan = LocalPlan(
        steps=local_steps(n, batch_size, instructions.local_epochs),
        batch_size=batch_size,
        learning_rate=instructions.learning_rate,
        seed=_site_seed(site.site_id, instructions),
        proximal_mu=instructions.proximal_mu,
        precision=site.precision,
    )
    privacy = site.privacy
    sample_rate = poisson_sample_rate(n, batch_size)
    dp = None
    ledger = None
    if privacy.enabled:
        if site.precision != "fp32":
            raise InputError(
                f"precision {site.precision} is refused under DP: fedgen checks per-sample gradients in float32 "
                'only; set precision = "fp32" or disable privacy'
            )
        # Before any budget is spent: DP holds only if per-sample gradients are what Opacus computes.
        grad_sample_mode = verified_grad_sample_mode(
            lambda: build_classifier(model_config, base, deterministic=True),
            ids,
            labels,
            state_dir=site.state_dir,
            key=gradient_check_key(model_config),
        )
        ledger = PrivacyLedger.open(site.state_dir, accountant=privacy.accountant, delta=privacy.delta)
        if privacy.noise_multiplier is not None:
            sigma = privacy.noise_multiplier
        else:
            remaining_rounds = max(1, instructions.num_rounds - instructions.server_round + 1)
            sigma = ledger.calibrate(sample_rate, plan.steps * remaining_rounds, privacy.epsilon, run_id=run_id)
        ledger.check(sigma, sample_rate, plan.steps, privacy.epsilon)
        dp = DPSettings(
            noise_multiplier=sigma,
            max_grad_norm=privacy.max_grad_norm,
            accountant=privacy.accountant,
            history=ledger.history,
            grad_sample_mode=grad_sample_mode,
        )

    started = time.perf_counter()
    result = train_local(model, ids, labels, plan, device, dp)
    train_seconds = time.perf_counter() - started

    epsilon = 0.0
    if ledger is not None and dp is not None:
        # Persist the spend before anything leaves the site.
        epsilon = ledger.commit(
            result.history,
            run_id=run_id,
            server_round=instructions.server_round,
            steps=plan.steps,
            noise_multiplier=dp.noise_multiplier,
            sample_rate=sample_rate,
        )
    report = TrainReport(
        num_examples=n,
        train_loss=result.mean_loss,
        steps=plan.steps,
        sample_rate=sample_rate if dp else 0.0,
        noise_multiplier=dp.noise_multiplier if dp else 0.0,
        max_grad_norm=dp.max_grad_norm if dp else 0.0,
        epsilon=epsilon,
        delta=privacy.delta if dp else 0.0,
        dp=dp is not None,
        train_seconds=train_seconds,
    )
    update = to_numpy(trainable_tensors(model))
    return RecordDict(
        {
            ARRAYS_KEY: arrays_to_record(update),
            METRICS_KEY: report.to_record(),
            SITE_KEY: _witnessed_site_record(site, instructions, str(run_id), digest(update)),
        }
    )


def _witnessed_site_record(
    site: SiteConfig, instructions: TrainInstructions, run_id: str, update_digest: str
) -> ConfigRecord:
    """The site's identity and update digest, signed together with the ledger head it was sent.

    The receipt of that head is written, durably, before the reply can leave. A simulated
    site (no certificate) keeps an unsigned receipt and sends no signature; without a
    ledger notice (a run that keeps no lineage, which a deployed site refused before
    training) there is nothing to witness.
    """
    notice = instructions.ledger
    if notice is None:
        return site_record(site.site_id, update_digest)
    signature = certificate_pem = None
    if site.tls is not None:
        statement = witness_statement(run_id, notice.round, notice.head.seq, notice.head.hash, update_digest)
        signature = sign_message(load_private_key(site.tls.private_key), statement)
        certificate_pem = site.tls.certificate.read_text(encoding="ascii")
    append_receipt(
        site.state_dir, new_receipt(site.site_id, run_id, notice.round, notice.head, update_digest, signature)
    )
    return site_record(site.site_id, update_digest, signature, certificate_pem)


@contextmanager
def round_lock(state_dir: Path) -> Iterator[None]:
    """Hold the site's round lock: one round at a time per site, across processes.

    The kernel releases it when its holder dies, so a killed worker leaves no lock behind.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ROUND_LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def answer_round(site: SiteConfig, content: RecordDict, run_id: int, warm: WarmCache | None = None) -> RecordDict:
    """The reply content of one round, under the site's round lock.

    Raises
    ------
    RoundRefused
        For every failure, with the error code and a reason that names no path and no
        sequence: exception messages can carry both, so the detail goes to the site's own
        log only.
    """
    site_id = site.site_id
    try:
        with round_lock(site.state_dir):
            return train_round(site, content, run_id, warm)
    except BudgetExceeded as exc:
        log.warning("site %s: %s", site_id, exc)
        code, reason = BUDGET_REFUSED, str(exc)
    except (BaseModelMismatch, PerSampleGradientMismatch) as exc:  # their messages name no path
        log.error("site %s: %s", site_id, exc)
        code, reason = MODEL_REFUSED, str(exc)
    except WitnessError as exc:  # its message names no path
        log.error("site %s: %s", site_id, exc)
        code, reason = SITE_ERROR, f"refused to witness the round: {exc}"
    except DataError as exc:
        log.error("site %s: %s", site_id, exc)
        code, reason = SITE_DATA_ERROR, f"local data rejected: {exc.reason}"
    except Exception as exc:  # noqa: BLE001 - reported to the aggregator without detail
        log.exception("site %s: round failed", site_id)
        code, reason = SITE_ERROR, f"{type(exc).__name__} (details in the site's log)"
    raise RoundRefused(code, reason)


__all__ = ["answer_round", "round_lock", "train_round"]

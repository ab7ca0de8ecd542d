"""Check on a few real samples that Opacus' per-sample gradients of a model are right.

DP-SGD bounds each sample's influence by clipping that sample's gradient, which Opacus
computes layer by layer from the layer's activations and backprops. A layer Opacus cannot
sample, or a forward that mixes the samples of a batch (batch statistics, unpadding that
concatenates the sequences of a batch as DNABERT-2 does), yields "per-sample" gradients
that are not the samples' gradients, and therefore no privacy guarantee, silently. Before
a site first trains a model under DP, fedgen compares Opacus' per-sample gradients on a
few of its samples with an explicit loop over single samples; the verdict is cached in
the site's state folder per base model, trainable configuration, grad-sample mode and
torch/Opacus versions, so later rounds do not pay for it again.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import opacus
import torch
import torch.nn.functional as F
from opacus.grad_sample import get_gsm_class
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn

from fedgen import atomic
from fedgen.errors import FedgenError
from fedgen.state_files import GRADIENT_CHECKS_FILE

DEFAULT_TOLERANCE = 1e-3
DEFAULT_SAMPLES = 4
# hooks/functorch/ew materialise per-sample gradients; ghost clipping only their norms.
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
# What a site trains with, in order of preference: the first whose check passes. Expanded
# weights were the fastest mode on every model of benchmarks/dp_overhead.py (docs/benchmarks.md);
# torch implements them for common layers only, and hooks cover the rest.
PREFERRED_MODES = ("ew", "hooks")
_CACHE_FORMAT = 1
_REASON_LIMIT = 240


class PerSampleGradientMismatch(FedgenError, RuntimeError):
    """Opacus' per-sample gradients of this model are wrong: training it under DP is refused."""


@dataclass(frozen=True)
class GradientCheck:
    """The verdict of one comparison of Opacus' per-sample gradients with an explicit loop.

    Parameters
    ----------
    passed : bool
        Every trainable tensor's per-sample gradient matched within the tolerance.
    max_relative_error : float
        The worst ``||g_opacus - g_loop|| / ||g_loop||`` over samples and tensors; ``inf``
        when no comparison was possible (Opacus refused the model, non-finite values).
    worst_tensor : str or None
        The trainable tensor with that error; None when nothing was compared.
    samples : int
        How many samples were compared.
    reason : str
        One line for an operator: why it passed or failed (names no data and no path).
    """

    passed: bool
    max_relative_error: float
    worst_tensor: str | None
    samples: int
    reason: str

    def to_dict(self) -> dict:
        record = asdict(self)
        # JSON has no infinity: "not compared" is stored as null.
        record["max_relative_error"] = self.max_relative_error if math.isfinite(self.max_relative_error) else None
        return record

    @classmethod
    def from_dict(cls, record: dict) -> GradientCheck:
        error = record["max_relative_error"]
        worst = record["worst_tensor"]
        check = cls(
            passed=record["passed"],
            max_relative_error=math.inf if error is None else float(error),
            worst_tensor=worst,
            samples=record["samples"],
            reason=record["reason"],
        )
        if not (
            isinstance(check.passed, bool)
            and isinstance(check.samples, int)
            and isinstance(check.reason, str)
            and (worst is None or isinstance(worst, str))
        ):
            raise ValueError("malformed gradient check record")
        return check


@dataclass(frozen=True)
class CheckKey:
    """What a cached verdict holds for: the pinned base model and what of it is trained.

    Parameters
    ----------
    base_digest : str
        The base model's digest (`fedgen.params`), as pinned by the run.
    trainable : str
        How the trainable part is configured, e.g. ``"lora r8 query,value"`` or a
        `ModelConfig` JSON: a different configuration is a different model to check.
    """

    base_digest: str
    trainable: str

    def identity(self, grad_sample_mode: str) -> dict[str, str | float]:
        """Everything a verdict depends on, as a JSON-ready mapping (a new default tolerance
        or a new torch or Opacus means checking again)."""
        return {
            "base_digest": self.base_digest,
            "trainable": self.trainable,
            "grad_sample_mode": grad_sample_mode,
            "tolerance": DEFAULT_TOLERANCE,
            "torch": torch.__version__,
            "opacus": opacus.__version__,
        }


def check_per_sample_gradients(
    model: nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    grad_sample_mode: str = "hooks",
    tolerance: float = DEFAULT_TOLERANCE,
) -> GradientCheck:
    """Compare Opacus' per-sample gradients of ``model`` on ``ids`` with an explicit loop.

    Works on a deep copy in train mode (Opacus records activations only in train mode), so
    the caller's model is left as it was. Opacus' side is one backward of the cross-entropy
    summed over the batch through a grad-sample wrapper of ``grad_sample_mode``, validated
    as `opacus.PrivacyEngine` validates; the explicit side backwards each sample alone (the
    same padded row). Ghost clipping never materialises per-sample gradients: in that mode
    the per-sample norms of each tensor are compared.

    Parameters
    ----------
    model : nn.Module
        A classifier, ``forward(ids [B, T]) -> logits [B, C]``, deterministic in train mode
        (dropout 0); its trainable tensors are those that require gradients.
    ids, labels : torch.Tensor
        A small batch of real samples ([B, T] token ids, [B] class ids).
    grad_sample_mode : str
        One of `GRAD_SAMPLE_MODES`, as the trainer will use it.
    tolerance : float
        Largest relative error of any tensor of any sample that passes.

    Returns
    -------
    GradientCheck
        Failed, with the reason, also when Opacus refuses the model.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"unknown grad_sample_mode {grad_sample_mode!r}; choose one of {', '.join(GRAD_SAMPLE_MODES)}")
    samples = len(ids)
    if samples == 0 or len(labels) != samples:
        raise ValueError(f"need a non-empty batch with one label per sample (got {samples} ids, {len(labels)} labels)")
    subject = copy.deepcopy(model).train()
    trainable = [(name, p) for name, p in subject.named_parameters() if p.requires_grad]
    if not trainable:
        return _failed(samples, "the model has no trainable tensors")
    device = trainable[0][1].device
    ids, labels = ids.to(device), labels.to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if not _deterministic(subject, ids):
            return _failed(
                samples,
                "the model is not deterministic in train mode (dropout left on?): per-sample "
                "gradients cannot be compared; load it with every dropout probability at 0",
            )
        try:
            ModuleValidator.validate(subject, strict=True)  # as PrivacyEngine.make_private does
        except UnsupportedModuleError as exc:
            return _failed(samples, f"Opacus refuses a layer of this model ({_one_line(exc)})")
        try:
            explicit = _loop_gradients(subject, trainable, ids, labels)
        except Exception as exc:  # noqa: BLE001 - any failure of the model is the verdict
            return _failed(samples, f"the model fails on a single sample ({_one_line(exc)})")
        try:
            opacus_side = _opacus_per_sample(subject, trainable, ids, labels, grad_sample_mode)
        except Exception as exc:  # noqa: BLE001 - Opacus refusing the model is the verdict
            return _failed(samples, f"Opacus cannot compute per-sample gradients of this model ({_one_line(exc)})")
    if grad_sample_mode == "ghost":
        explicit = {name: grads.flatten(1).norm(dim=1) for name, grads in explicit.items()}
    return _compare(opacus_side, explicit, samples, tolerance, grad_sample_mode)


def _failed(samples: int, reason: str) -> GradientCheck:
    return GradientCheck(passed=False, max_relative_error=math.inf, worst_tensor=None, samples=samples, reason=reason)


def _one_line(exc: BaseException) -> str:
    # Exception texts may carry a path (custom kernels, remote code): none leaves the site.
    text = re.sub(r"\S*[/\\]\S*", "<path>", " ".join(str(exc).split()))
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 3] + "..."


@torch.no_grad()
def _deterministic(model: nn.Module, ids: torch.Tensor) -> bool:
    first, second = model(ids), model(ids)
    return torch.allclose(first, second, rtol=1e-5, atol=1e-6)


def _loop_gradients(
    model: nn.Module, trainable: list[tuple[str, nn.Parameter]], ids: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each sample's gradient of each trainable tensor, stacked: name -> [B, *shape]."""
    per_sample: dict[str, list[torch.Tensor]] = {name: [] for name, _ in trainable}
    for i in range(len(ids)):
        for _, param in trainable:
            param.grad = None
        F.cross_entropy(model(ids[i : i + 1]), labels[i : i + 1], reduction="sum").backward()
        for name, param in trainable:
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            per_sample[name].append(grad.detach().clone())
    for _, param in trainable:
        param.grad = None
    return {name: torch.stack(grads) for name, grads in per_sample.items()}


def _opacus_per_sample(
    model: nn.Module,
    trainable: list[tuple[str, nn.Parameter]],
    ids: torch.Tensor,
    labels: torch.Tensor,
    grad_sample_mode: str,
) -> dict[str, torch.Tensor]:
    """Opacus' per-sample gradients (per-sample norms under ghost clipping) by tensor name."""
    wrapper_class = get_gsm_class(grad_sample_mode)
    options: dict = {"batch_first": True, "loss_reduction": "sum"}
    if grad_sample_mode != "ew":  # expanded weights take neither option
        options.update(strict=True, force_functorch=grad_sample_mode == "functorch")
    wrapped = wrapper_class(model, **options)
    try:
        F.cross_entropy(wrapped(ids), labels, reduction="sum").backward()
        attribute = "_norm_sample" if grad_sample_mode == "ghost" else "grad_sample"
        found: dict[str, torch.Tensor] = {}
        for name, param in trainable:
            value = getattr(param, attribute, None)
            if value is None:
                raise ValueError(f"no per-sample gradient was recorded for {name}")
            found[name] = value.detach()
        return found
    finally:
        wrapped.cleanup()  # hooks off and Opacus' attributes gone, though the copy is dropped anyway


# A tensor whose true per-sample gradient is zero (an attention key bias: softmax ignores a
# shift shared by all keys) is compared at this fraction of the sample's whole gradient, not
# relative to its own rounding noise.
ZERO_GRADIENT_FLOOR = 1e-3


def _compare(
    opacus_side: dict[str, torch.Tensor],
    explicit: dict[str, torch.Tensor],
    samples: int,
    tolerance: float,
    grad_sample_mode: str,
) -> GradientCheck:
    for name, loop in explicit.items():
        ours = opacus_side[name]
        if ours.shape != loop.shape:
            return GradientCheck(
                passed=False,
                max_relative_error=math.inf,
                worst_tensor=name,
                samples=samples,
                reason=f"Opacus' per-sample gradient of {name} has shape {tuple(ours.shape)}, "
                f"the explicit loop's {tuple(loop.shape)}",
            )
    flat = {name: (loop.reshape(samples, -1).double(), opacus_side[name].reshape(samples, -1).double())
            for name, loop in explicit.items()}  # fmt: skip
    whole = torch.stack([loop.norm(dim=1) for loop, _ in flat.values()]).norm(dim=0)  # each sample's ||g||
    worst_name, worst_error = None, 0.0
    for name, (loop, ours) in flat.items():
        scale = torch.maximum(loop.norm(dim=1), ZERO_GRADIENT_FLOOR * whole)
        errors = (ours - loop).norm(dim=1) / scale.clamp(min=torch.finfo(torch.float64).tiny)
        error = math.inf if not torch.isfinite(errors).all() else errors.max().item()
        if worst_name is None or error > worst_error:
            worst_name, worst_error = name, error
    passed = worst_error <= tolerance
    compared = "per-sample gradient norms" if grad_sample_mode == "ghost" else "per-sample gradients"
    verdict = "match" if passed else "do not match"
    return GradientCheck(
        passed=passed,
        max_relative_error=worst_error,
        worst_tensor=worst_name,
        samples=samples,
        reason=f"Opacus {grad_sample_mode} {compared} {verdict} an explicit per-sample loop on {samples} "
        f"samples (worst: {worst_name}, relative error {worst_error:.3g} {'<=' if passed else '>'} {tolerance:g})",
    )


class GradientCheckCache:
    """Verdicts of earlier checks, kept as JSON in a site's state folder.

    A missing, unreadable or malformed file is an empty cache: the check runs again,
    which costs seconds, rather than failing a round.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / GRADIENT_CHECKS_FILE

    def get(self, key: CheckKey, grad_sample_mode: str) -> GradientCheck | None:
        """The cached verdict for this model, mode and software, or None."""
        record = self._read().get(_entry_name(key.identity(grad_sample_mode)))
        try:
            return None if record is None else GradientCheck.from_dict(record["result"])
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: CheckKey, grad_sample_mode: str, check: GradientCheck) -> None:
        """Record ``check`` (replacing the file whole)."""
        identity = key.identity(grad_sample_mode)
        entries = self._read()
        entries[_entry_name(identity)] = {"key": identity, "result": check.to_dict()}
        text = json.dumps({"format": _CACHE_FORMAT, "checks": entries}, indent=2, sort_keys=True, allow_nan=False)
        atomic.write_text(self.path, text + "\n")

    def _read(self) -> dict[str, dict]:
        try:
            content = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(content, dict) or content.get("format") != _CACHE_FORMAT:
            return {}
        entries = content.get("checks")
        if not isinstance(entries, dict):
            return {}
        return {name: entry for name, entry in entries.items() if isinstance(entry, dict)}


def _entry_name(identity: dict) -> str:
    return json.dumps(identity, sort_keys=True)


def ensure_per_sample_gradients(
    model: nn.Module | Callable[[], nn.Module],
    ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    state_dir: str | Path,
    key: CheckKey,
    samples: int = DEFAULT_SAMPLES,
    grad_sample_mode: str = "hooks",
) -> GradientCheck:
    """Return the (cached or fresh) passing check of ``model``; raise if it fails.

    ``model`` may be a function that builds the model: it is called only on a cache miss,
    so later rounds do not pay for building a second copy of a large model.

    On a cache miss the check runs on ``samples`` examples of ``ids``/``labels`` chosen to
    differ in real length where the data allows (padding is where per-sample gradients go
    wrong), and its verdict, passed or failed, is cached under ``key``.

    Raises
    ------
    PerSampleGradientMismatch
        The check failed now or earlier: training this model under DP is refused.
    """
    cache = GradientCheckCache(state_dir)
    check = cache.get(key, grad_sample_mode)
    if check is None:
        chosen = select_samples(ids, samples)
        if not isinstance(model, nn.Module):
            model = model()
        check = check_per_sample_gradients(model, ids[chosen], labels[chosen], grad_sample_mode=grad_sample_mode)
        cache.put(key, grad_sample_mode, check)
    if not check.passed:
        raise PerSampleGradientMismatch(_refusal(check))
    return check


def verified_grad_sample_mode(
    model: Callable[[], nn.Module],
    ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    state_dir: str | Path,
    key: CheckKey,
    modes: tuple[str, ...] = PREFERRED_MODES,
) -> str:
    """The first of ``modes`` whose per-sample gradients of the model pass the check
    (`ensure_per_sample_gradients`, so each verdict is cached): the mode to train with.

    ``model`` builds the model; it is called at most once, and only on a cache miss.

    Raises
    ------
    PerSampleGradientMismatch
        No mode passes, with each mode's reason.
    """
    built: list[nn.Module] = []

    def build() -> nn.Module:
        if not built:
            built.append(model())
        return built[0]

    refusals = []
    for mode in modes:
        try:
            ensure_per_sample_gradients(build, ids, labels, state_dir=state_dir, key=key, grad_sample_mode=mode)
        except PerSampleGradientMismatch as exc:
            refusals.append(f"{mode}: {exc}")
            continue
        return mode
    raise PerSampleGradientMismatch("; ".join(refusals))


def _refusal(check: GradientCheck) -> str:
    consequence = "DP-SGD would not bound each sample's influence; refusing to train under DP"
    if check.worst_tensor is not None and math.isfinite(check.max_relative_error):
        return (
            "per-sample gradients of this model do not match an explicit per-sample loop (worst: "
            f"{check.worst_tensor}, relative error {check.max_relative_error:.2g} > {DEFAULT_TOLERANCE:g}): "
            f"{consequence}"
        )
    return f"per-sample gradients of this model could not be verified ({check.reason}): {consequence}"


def select_samples(ids: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of ``count`` rows of ``ids`` [N, T], of as many different real lengths as there are.

    Padding is taken to be the trailing run of one repeated token, so no pad id is needed;
    rows of a length already chosen fill up what distinct lengths cannot.
    """
    if count < 1:
        raise ValueError(f"need at least one sample to check, not {count}")
    count = min(count, len(ids))
    trailing_run = (ids == ids[:, -1:]).flip(1).long().cumprod(1).sum(1)
    lengths = (ids.shape[1] - trailing_run).tolist()
    chosen: list[int] = []
    seen: set[int] = set()
    for index, length in enumerate(lengths):
        if length not in seen:
            seen.add(length)
            chosen.append(index)
        if len(chosen) == count:
            break
    taken = set(chosen)
    chosen += [index for index in range(len(ids)) if index not in taken][: count - len(chosen)]
    return torch.tensor(sorted(chosen), dtype=torch.long)

"""What a site keeps between rounds in one long-lived process: tokenised data, digested base, built model.

A fresh process per round re-reads and re-tokenises the site's data, re-digests the
Hugging Face base (every weight) and rebuilds the model. The site's worker
(`fedgen.client.worker`) and a simulation's Ray actors live across rounds, so they keep
these here instead, each keyed by everything it depends on:

* tokenised data: the data's path and content digest, the run's labels, tokenizer and
  sequence length (and, for a Hugging Face run, the base's digest: its tokenizer files);
* the base digest: the base folder's file state (name, size, mtime, ctime, inode of
  each file), re-hashed when that state changes or is too recent to be trusted (a file
  rewritten within one tick of the file system's clock keeps its times);
* the built model: the run's model config (which names the base digest the run is
  pinned to), the local base's digest and trust_remote_code, and the device.

A cached model is only ever handed to one round at a time (the worker serialises rounds,
a Ray actor runs one call at a time); every round overwrites all of its trainable tensors
before training, and its frozen ones never change. A round that fails may leave it
half-trained or hooked by Opacus, so the caller forgets it (:meth:`WarmCache.forget_model`).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedgen.config import SiteConfig
from fedgen.data import load_dataset
from fedgen.model_config import AnyModelConfig, HFModelConfig
from fedgen.model_source import LocalBase, build_classifier, sequence_encoder

# File times advance in kernel ticks (1-10 ms on Linux): a file whose mtime or ctime is
# this close to when its state was recorded may be rewritten within the same tick, its
# state unchanged, so what was computed from it is not reused.
RACY_NANOSECONDS = 50_000_000
# Tokenised data of this many bytes, summed over the sites one process serves, stays cached.
DEFAULT_DATA_BYTES = 1 << 30
_CHUNK = 1 << 20

FileState = tuple[tuple[str, int, int, int, int], ...]


def file_state(path: Path) -> FileState:
    """(relative name, size, mtime, ctime, inode) of the file ``path``, or of every file under it."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    state = []
    for file in files:
        stat = file.stat()
        name = file.relative_to(path).as_posix() if file != path else ""
        state.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino))
    return tuple(state)


def content_digest(path: Path) -> str:
    """SHA-256 over the names and bytes of the file ``path``, or of every file under it."""
    path = Path(path)
    h = hashlib.sha256()
    for name, *_ in file_state(path):
        h.update(name.encode() + b"\0")
        with open(path / name if name else path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


class StateMemo:
    """Values computed from a file or folder, recomputed only when its file state changes."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, Path], tuple[FileState, int, str]] = {}

    def get(self, kind: str, path: Path, compute: Callable[[], str]) -> str:
        """``compute()`` for ``path`` in its current state (``kind`` names what is computed)."""
        key = (kind, Path(path).absolute())
        state = file_state(path)
        known = self._known.get(key)
        if known is not None and known[0] == state and not _racy(state, known[1]):
            return known[2]
        recorded_at = time.time_ns()  # before reading: a write during the read makes it racy
        value = compute()
        self._known[key] = (state, recorded_at, value)
        return value


def _racy(state: FileState, recorded_at: int) -> bool:
    return any(max(mtime, ctime) >= recorded_at - RACY_NANOSECONDS for _, _, mtime, ctime, _ in state)


@dataclass(frozen=True)
class TokenisedData:
    """A site's examples as the model reads them."""

    ids: torch.Tensor
    labels: torch.Tensor

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.labels.nbytes


@dataclass(frozen=True)
class MemoisedBase(LocalBase):
    """The site's base checkpoint, digested once per state of its files."""

    cache: WarmCache | None = field(default=None, compare=False, repr=False)

    def digest(self, checkpoint) -> str:  # noqa: ANN001 - a fedgen.hf.checkpoint.Checkpoint
        if self.cache is None:
            return LocalBase.digest(self, checkpoint)
        return self.cache.base_digest(self.folder, lambda: LocalBase.digest(self, checkpoint))


class WarmCache:
    """One process's tokenised data (per site, bounded in bytes), base digests and last built model.

    ``counts`` says how often each was actually computed (``data_loads``,
    ``base_digests``, ``model_builds``): a later round that finds all three warm adds to none.
    """

    def __init__(self, max_data_bytes: int = DEFAULT_DATA_BYTES) -> None:
        self.counts: Counter[str] = Counter()
        self._max_data_bytes = max_data_bytes
        self._memo = StateMemo()
        self._data: OrderedDict[tuple, TokenisedData] = OrderedDict()
        self._model: tuple[tuple, nn.Module] | None = None

    def base(self, site: SiteConfig) -> MemoisedBase | None:
        """The site's base checkpoint (None without one), its digest memoised here."""
        if site.base_model is None:
            return None
        return MemoisedBase(Path(site.base_model), site.trust_remote_code, cache=self)

    def base_digest(self, folder: Path, compute: Callable[[], str]) -> str:
        """The base digest of ``folder`` in its current state; ``compute`` runs when that state is new."""

        def counted() -> str:
            self.counts["base_digests"] += 1
            return compute()

        return self._memo.get("base", folder, counted)

    def _local_digest(self, base: MemoisedBase) -> str:
        from fedgen.hf.checkpoint import read_checkpoint

        return base.digest(read_checkpoint(base.folder))

    def tokenised(
        self,
        data: Path,
        model_config: AnyModelConfig,
        tokenizer: str,
        label_names: Sequence[str],
        base: MemoisedBase | None,
    ) -> TokenisedData:
        """The site's data at ``data``, labelled as the run names labels and tokenised for its model.

        Raises
        ------
        DataError
            If the data is unreadable or has labels the run does not know (never cached).
        """
        hf_base = self._local_digest(base) if isinstance(model_config, HFModelConfig) and base is not None else None
        key = (
            str(Path(data).absolute()),
            self._memo.get("data", data, lambda: content_digest(data)),
            tuple(label_names),
            tokenizer,
            model_config.max_len,
            hf_base,
        )
        if (hit := self._data.get(key)) is not None:
            self._data.move_to_end(key)
            return hit
        self.counts["data_loads"] += 1
        dataset = load_dataset(data).with_label_names(label_names)
        encoder = sequence_encoder(model_config, tokenizer, base)
        ids = encoder.encode(dataset.sequences, max_length=model_config.max_len)
        labels = torch.tensor(dataset.labels, dtype=torch.long)
        tokenised = TokenisedData(ids, labels)
        for stale in [k for k in self._data if k[0] == key[0]]:  # one state per data path
            del self._data[stale]
        self._data[key] = tokenised
        while len(self._data) > 1 and sum(d.nbytes for d in self._data.values()) > self._max_data_bytes:
            self._data.popitem(last=False)
        return tokenised

    def model(self, model_config: AnyModelConfig, base: MemoisedBase | None, device: torch.device) -> nn.Module:
        """The classifier ``model_config`` describes, on ``device``; its trainable tensors are
        the caller's to overwrite.

        Raises
        ------
        BaseModelMismatch
            If the local base is not the checkpoint the run is pinned to (checked every call).
        """
        local = None
        if isinstance(model_config, HFModelConfig) and base is not None:
            base.checked(model_config)  # the digest is memoised; the comparison runs every round
            local = (base.trust_remote_code, self._local_digest(base))
        key = (model_config.to_json(), local, str(device))
        if self._model is not None and self._model[0] == key:
            return self._model[1]
        self.forget_model()  # free the old model before building the next
        self.counts["model_builds"] += 1
        model = build_classifier(model_config, base).to(device)
        self._model = (key, model)
        return model

    def forget_model(self) -> None:
        """Drop the cached model (after a failed round: it may be half-trained or hooked)."""
        self._model = None


PROCESS_CACHE = WarmCache()
"""The cache of this process: the worker's, a Ray actor's, or a ClientApp process's (used once)."""

"""Who came to the aggregator's door: each site's Flower node, and recent refusals.

The public Fleet listener (`server.superlink`) is the only writer: it binds each Flower
node id to the site id of the certificate that holds the node's key, and notes every
refused handshake or request it logs. The ServerApp reads it to name sites by site id,
never by node number, and `fedgen run` reads it to say why sites are missing. One JSON
file in the aggregator's state folder, replaced atomically so a reader never sees half
of it; it is diagnostic, rebuilt from traffic, so it is not fsynced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

# server/coordinator.py reads the name from here until it imports fedgen.state_files itself.

log = logging.getLogger(__name__)
MAX_REFUSALS = 200  # the most recent are kept


@dataclass(frozen=True)
class Refusal:
    """One refused handshake or request at the Fleet API."""

    time: str  # ISO 8601, UTC
    peer: str  # the client's address
    cause: str  # see `server.door` for the causes
    site: str | None = None  # the presented certificate's site id, when there was one
    detail: str = ""


class FleetRegistry:
    """The registry file at ``path``: written by the Fleet listener, read by everyone else.

    A reader sees the file as it was when it last changed on disk: lookups re-read it
    when it was replaced.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._nodes: dict[int, str] = {}
        self._refusals: list[Refusal] = []
        self._seen: tuple[int, int, int] | None = None
        self._reload()

    def _reload(self) -> None:
        try:
            info = self.path.stat()
        except OSError:  # not written yet
            return
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)  # a replace makes a new inode
        if stamp == self._seen:
            return
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            nodes = {int(node): str(site) for node, site in raw.get("nodes", {}).items()}
            refusals = [Refusal(**entry) for entry in raw.get("refusals", [])]
        except (OSError, ValueError, TypeError, AttributeError):
            return  # unreadable: keep what was read before; the writer replaces it whole
        self._nodes, self._refusals, self._seen = nodes, refusals, stamp

    def _write(self) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        body = {
            "nodes": {str(node): site for node, site in sorted(self._nodes.items())},
            "refusals": [asdict(refusal) for refusal in self._refusals],
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError as exc:  # diagnostics must never stop the Fleet API
            with contextlib.suppress(OSError):
                temporary.unlink()
            log.error("cannot write %s (%s): run reports may name sites by node number", self.path, exc)

    def bind(self, node_id: int, site: str) -> bool:
        """Record that ``node_id`` is the node of ``site``; True if that is news."""
        if self._nodes.get(node_id) == site:
            return False
        self._nodes[node_id] = site
        self._write()
        return True

    def note_refusal(self, refusal: Refusal) -> None:
        """Append a refusal, keeping the most recent `MAX_REFUSALS`."""
        self._refusals = [*self._refusals, refusal][-MAX_REFUSALS:]
        self._write()

    def site_of(self, node_id: int) -> str | None:
        """The site id whose certificate holds ``node_id``, if the listener has seen it."""
        self._reload()
        return self._nodes.get(node_id)

    def nodes_of(self, site: str) -> list[int]:
        """Every node id bound to ``site`` (one per certificate key it has used)."""
        self._reload()
        return sorted(node for node, owner in self._nodes.items() if owner == site)

    def refusals_since(self, moment: datetime) -> list[Refusal]:
        """Refusals at or after ``moment`` (timezone-aware), oldest first."""
        self._reload()
        return [r for r in self._refusals if datetime.fromisoformat(r.time) >= moment]

"""fedgen: sovereign federated fine-tuning of genomic language models."""

from __future__ import annotations

# First of all: Flower reads its telemetry switch once, when it is imported, and any
# fedgen module may import it. Every entry point imports this package first.
from .sovereignty import switch_off_phone_home

switch_off_phone_home()

from importlib.metadata import PackageNotFoundError, version  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

try:
    __version__ = version("fedgen")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

if TYPE_CHECKING:
    from .simulation import simulate


def __getattr__(name: str) -> Any:
    # Lazy: `import fedgen` stays light; the simulation pulls in Flower, Ray and torch.
    if name == "simulate":
        from .simulation import simulate

        return simulate
    raise AttributeError(f"module 'fedgen' has no attribute {name!r}")


__all__ = ["simulate", "__version__"]

"""Fixtures of the integration tests."""

from .tripwire import tripwire  # noqa: F401  (a network tripwire, tests/integration/tripwire.py)

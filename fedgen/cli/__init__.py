"""The `fedgen` command line: one module per command group, the demo, one output style.

Commands import `fedgen.client` and `fedgen.server` inside their bodies only, so the
core never depends on either through the CLI.
"""

from __future__ import annotations

from .app import app, main

__all__ = ["app", "main"]

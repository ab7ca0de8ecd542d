"""`python -m fedgen.cli`: the `fedgen` command."""

from . import main

main()

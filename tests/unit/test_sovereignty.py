"""The no-phone-home switches are set before Flower or Ray can read them, in every entry point.

Each check runs in a fresh interpreter whose environment lacks the switches, as an
operator's shell or a notebook kernel would: this test process imported fedgen long ago.
"""

import inspect
import os
import subprocess
import sys

import pytest

from fedgen.sovereignty import NO_PHONE_HOME, ray_without_api_server

READ_SWITCHES = (
    "import flwr.supercore.telemetry as telemetry, ray._private.ray_constants as ray_constants\n"
    "print(telemetry.FLWR_TELEMETRY_ENABLED, ray_constants.ENABLE_RAY_CLUSTER)\n"
)


def _fresh_python(program: str, switches: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name not in NO_PHONE_HOME} | (switches or {})
    return subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("entry_point", ["fedgen", "fedgen.cli"])
def test_every_entry_point_switches_phone_home_off_before_flower_and_ray_read_it(entry_point):
    # fedgen: a notebook's `import fedgen`; fedgen.cli: the `fedgen` command, `python -m fedgen.cli`.
    # Any other fedgen module (the apps Flower loads) imports the package `fedgen` first too.
    done = _fresh_python(f"import {entry_point}\n" + READ_SWITCHES)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "False"]  # what Flower and Ray read, at their import


def test_flower_imported_before_fedgen_is_detected_warned_and_refused(tmp_path):
    out = tmp_path / "run"
    program = (
        "import warnings\n"
        "import flwr\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fedgen\n"
        "from fedgen.sovereignty import SovereigntyError, SovereigntyWarning\n"
        "print([w.category.__name__ for w in caught if issubclass(w.category, SovereigntyWarning)])\n"
        "try:\n"
        f"    fedgen.simulate(sites=1, rounds=1, out={str(out)!r})\n"
        "except SovereigntyError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = _fresh_python(program)
    assert done.returncode == 0, done.stderr
    warned, refused = done.stdout.splitlines()
    assert warned == "['SovereigntyWarning']"
    assert refused.startswith("refused: flwr was imported before fedgen")
    assert "FLWR_TELEMETRY_ENABLED=0" in refused  # the way out, named
    assert not out.exists()  # refused before anything was written


def test_switches_set_before_python_starts_make_import_order_irrelevant():
    program = (
        "import warnings\nimport flwr, ray\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fedgen\n"
        "from fedgen.sovereignty import SovereigntyWarning, apply_sovereign_environment\n"
        "apply_sovereign_environment()\n"
        "print(sum(issubclass(w.category, SovereigntyWarning) for w in caught))\n" + READ_SWITCHES
    )
    done = _fresh_python(program, switches=NO_PHONE_HOME)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "0", "False"]  # no warning; Flower and Ray read the switches


def test_ray_without_api_server_replaces_the_ray_method_it_names_and_restores_it():
    # Pinned to Ray 2.55 (through flwr[simulation]): fails loudly if Ray renames it.
    from ray._private.node import Node

    original = Node.start_api_server
    assert list(inspect.signature(original).parameters) == ["self", "include_dashboard", "raise_on_failure"]
    with ray_without_api_server():
        assert Node.start_api_server is not original
        assert Node.start_api_server(object(), include_dashboard=False, raise_on_failure=False) is None
    assert Node.start_api_server is original

"""`pip install .` and `pip install -e .` both give importable fedgen.{client,server,strategies}."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fedgen
import fedgen.client
import fedgen.server
import fedgen.strategies

ROOT = Path(__file__).resolve().parents[2]
CHECK = (
    "import fedgen, fedgen.client.app, fedgen.server.app, fedgen.strategies.registry, fedgen.cli\n"
    "from fedgen.data import load_bundled\n"
    "print(fedgen.__file__); print(fedgen.client.app.__file__); print(len(load_bundled('test')))\n"
)


def test_editable_install_maps_subpackages_to_the_source_folders():
    assert Path(fedgen.__file__).parent == ROOT / "fedgen"
    assert Path(fedgen.client.__file__).parent == ROOT / "client"
    assert Path(fedgen.server.__file__).parent == ROOT / "server"
    assert Path(fedgen.strategies.__file__).parent == ROOT / "strategies"


@pytest.mark.slow
def test_regular_install_has_subpackages_data_and_console_script(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", "runs", ".pytest_cache"),
    )
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    shutil.rmtree(source)  # nothing may still point into the source tree
    out = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": ""},
    )
    fedgen_file, client_file, test_rows = out.stdout.split()
    assert Path(fedgen_file).is_relative_to(target) and Path(client_file).is_relative_to(target)
    assert Path(client_file) == target / "fedgen" / "client" / "app.py"
    assert int(test_rows) == 888
    assert (target / "bin" / "fedgen").exists()
    assert not (target / "server").exists()  # nothing called `server` in site-packages

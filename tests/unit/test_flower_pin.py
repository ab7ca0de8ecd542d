from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from fedgen import flower_pin

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_pin_is_pyprojects_flower_requirement():
    dependencies = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    (flower,) = [Requirement(line) for line in dependencies if Requirement(line).name == "flwr"]
    assert flower.specifier == Requirement("flwr" + flower_pin.FLOWER_REQUIREMENT).specifier
    major, minor = flower_pin.FLOWER_SERIES
    assert f"{major}.{minor}.0" in flower.specifier and f"{major}.{minor}.99" in flower.specifier
    assert f"{major}.{minor + 1}.0" not in flower.specifier


def test_another_flower_series_is_refused_with_the_requirement_to_install(monkeypatch):
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    with pytest.raises(
        RuntimeError,
        match=r"SuperNode glue is written for Flower 1\.41\.x; found 1\.42\.0\. "
        r"Install flwr>=1\.41,<1\.42\.",
    ):
        flower_pin.check_flower_version("SuperNode glue")

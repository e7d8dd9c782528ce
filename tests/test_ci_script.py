""".ci/run is what a newcomer does: a fresh virtual environment each run, README's install
command, README's test command; a run that collects no test fails (pytest exit 5 under set -e)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CI = (ROOT / ".ci" / "run").read_text()
README = (ROOT / "README.md").read_text()


def _commands(script: str) -> list[str]:
    return [
        ln.strip() for ln in script.splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]


def test_ci_installs_into_a_fresh_venv_and_runs_readmes_commands():
    cmds = _commands(CI)
    assert "set -euo pipefail" in cmds  # pytest's exit 5 (no tests) fails the run
    fresh = [cmds.index(c) for c in ("rm -rf .venv-ci", "python -m venv .venv-ci",
                                     ". .venv-ci/bin/activate")]  # fmt: skip
    assert fresh == sorted(fresh)
    install = next(c for c in cmds if "pip install" in c)
    test = cmds[-1]
    assert cmds.index(install) > fresh[-1] and test == "python -m pytest -q -n 2"
    assert re.sub(r"\s-q\b", "", install) == 'python -m pip install -e ".[dev]"'
    two = README[README.index("## Two commands") : README.index("\n## ", README.index("## Two"))]
    assert 'pip install -e ".[dev]"' in two and f"\n{test}\n" in two
    assert "python -m venv .venv && . .venv/bin/activate" in two


def test_fresh_environments_are_ignored_by_git():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {".venv-ci/", ".venv-floor/"} <= set(ignored)


def test_readme_tested_versions_match_compat():
    from finegrain.compat import TESTED

    text = README[README.index("**Tested versions**") :]
    newest = text[text.index("*newest*") : text.index("*floor*")]
    floor = text[text.index("*floor*") :]
    for dist, (lo, hi) in TESTED.items():
        assert f"{dist} {hi}" in newest, f"README newest {dist} != compat.TESTED {hi}"
        assert f"{dist} {lo}" in floor, f"README floor {dist} != compat.TESTED {lo}"

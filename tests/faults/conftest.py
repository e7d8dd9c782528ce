"""Fault-injection suite (issue 17): every test injects faults, asserts the run survives them
with nothing lost, and records its counts; the totals are printed at the end of the session."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # toy_method / helpers live one folder up
    sys.path.insert(0, str(TESTS))

_COUNTS: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))


class FaultLog:
    """``faults.record(kind, injected=..., survived=..., lost=...)`` from a test."""

    def record(self, kind: str, *, injected: int, survived: int, lost: int = 0) -> None:
        c = _COUNTS[kind]
        c["injected"] += injected
        c["survived"] += survived
        c["lost"] += lost
        print(f"[faults] {kind}: injected={injected} survived={survived} samples_lost={lost}")


@pytest.fixture
def faults() -> FaultLog:
    return FaultLog()


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 (pytest hook)
    if not _COUNTS:
        return
    tr = terminalreporter
    tr.section("fault injection")
    total = {"injected": 0, "survived": 0, "lost": 0}
    for kind, c in sorted(_COUNTS.items()):
        tr.write_line(f"{kind:<28} injected {c['injected']:>3}  survived {c['survived']:>3}  "
                      f"samples lost {c['lost']}")  # fmt: skip
        for k in total:
            total[k] += c[k]
    tr.write_line(f"{'TOTAL':<28} injected {total['injected']:>3}  survived "
                  f"{total['survived']:>3}  samples lost {total['lost']}")  # fmt: skip


@pytest.fixture
def toy_cli(monkeypatch):  # noqa: ANN001, ANN201
    """In-process ``finegrain train --recipe toy_faults``: ToyCLIP, ToyLoader, toy evaluation."""
    from inject import toy_setup

    for module, name, value in toy_setup():
        monkeypatch.setattr(module, name, value)

"""tests/helpers/shared_run.py: the session's expensive outputs (``finegrain demo --quick``)
are built once across pytest-xdist workers, and a failure or a dead builder is reported to the
waiting workers instead of building again or hanging."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.shared_run import session_root, shared_once

HELPERS = Path(__file__).resolve().parent

WORKER = """
import sys, time
from pathlib import Path
from helpers.shared_run import shared_once

def make(out):
    out.mkdir()
    with open(Path(sys.argv[1]) / "builds.txt", "a") as f:
        f.write("x")
    time.sleep(1.0)
    (out / "result.txt").write_text("done")

print(shared_once(Path(sys.argv[1]), "thing", make))
"""


def test_concurrent_workers_build_once_and_share(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HELPERS)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]  # fmt: skip
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert set(outs) == {str(tmp_path / "thing")}
    assert (tmp_path / "builds.txt").read_text() == "x"  # built by one of the three
    assert (tmp_path / "thing" / "result.txt").read_text() == "done"


def test_a_failed_build_is_reported_to_the_waiting_workers(tmp_path):
    def boom(out: Path) -> None:
        raise RuntimeError("demo exited 2")

    with pytest.raises(RuntimeError, match="demo exited 2"):
        shared_once(tmp_path, "thing", boom)
    with pytest.raises(RuntimeError, match="failed in another worker: RuntimeError: demo exited 2"):
        shared_once(tmp_path, "thing", lambda out: out.mkdir())


def test_a_dead_builder_is_noticed(tmp_path):
    (tmp_path / "thing.lock").mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (tmp_path / "thing.lock" / "pid").write_text(dead)
    with pytest.raises(RuntimeError, match="died without a result"):
        shared_once(tmp_path, "thing", lambda out: out.mkdir(), timeout_s=30)


def test_session_root_is_shared_by_xdist_workers(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert session_root(tmp_path / "popen-gw0") == tmp_path / "popen-gw0"
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    assert session_root(tmp_path / "popen-gw1") == tmp_path

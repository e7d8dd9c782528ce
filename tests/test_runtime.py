"""``finegrain.runtime``: the CLI keeps freed memory in the process (glibc), measurably (page
faults of a repeated large allocation), with a one-line error for a bad setting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finegrain import runtime
from finegrain.cli import main

_glibc = pytest.mark.skipif(runtime._glibc() is None, reason="glibc only")

# a 64 MiB tensor allocated, touched and freed 34 times: page faults of the last 4 rounds (torch
# allocates with posix_memalign, whose chunks glibc places a little further up the heap for the
# first rounds: the heap settles after ~20 rounds, then every round reuses it)
_PROBE = """
import resource, sys, torch
from finegrain import runtime
print(runtime.configure_process(), file=sys.stderr)
for _ in range(30):
    x = torch.empty(16 << 20).fill_(1.0); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    x = torch.empty(16 << 20).fill_(1.0); del x
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


def _faults_per_round(mode: str) -> int:
    env = {"FINEGRAIN_MALLOC": mode, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@_glibc
def test_retained_memory_is_reused_without_page_faults() -> None:
    """glibc's default maps a 64 MiB block fresh each time (16,384 4-KiB pages faulted in per
    round here; fewer where transparent huge pages back it); retained, the freed block is
    reused: almost no faults."""
    system, retained = _faults_per_round("system"), _faults_per_round("retain")
    assert retained < 500, (system, retained)
    assert system > retained, (system, retained)


@_glibc
def test_retain_reports_what_glibc_accepted() -> None:
    code = "from finegrain import runtime; print(sorted(runtime.retain_freed_memory()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['mmap_threshold', 'top_pad', 'trim_threshold']"


def test_bad_setting_is_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("FINEGRAIN_MALLOC", "jemalloc")
    assert main(["recipes"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "FINEGRAIN_MALLOC='jemalloc'" in err


def test_system_setting_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINEGRAIN_MALLOC", "system")
    assert runtime.configure_process() == {}

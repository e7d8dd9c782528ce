"""``torchrun`` from a test, bounded in wall-clock time.

torchrun's agent starts every worker in a session of its own, so killing the agent (what
``subprocess.run(timeout=...)`` does) leaves hung workers behind, and they keep its stdout and
stderr pipes open: the test then waits on those pipes forever. Here the output goes to files,
and a run that outlives its bound has its whole process tree killed (workers first asked, by
SIGUSR1, to dump their Python stacks where they registered ``faulthandler`` for it) and fails
the test with one line naming the bound, followed by the tail of its log.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class Launched:
    proc: subprocess.Popen
    stdout: Path
    stderr: Path
    started: float = field(default_factory=time.perf_counter)


def launcher() -> list[str]:
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def start(args: list[str], env: dict[str, str], *, nproc: int = 2, restarts: int = 0) -> Launched:
    """``torchrun --standalone`` (c10d rendezvous on a port the agent picks itself, so parallel
    runs cannot race for one) with ``nproc`` workers running ``args``."""
    cmd = [*launcher(), "--standalone", "--nproc_per_node", str(nproc),
           "--max-restarts", str(restarts), *args]  # fmt: skip
    logs = Path(tempfile.mkdtemp(prefix="torchrun-"))
    out, err = logs / "stdout", logs / "stderr"
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(cmd, env=env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
    return Launched(proc, out, err)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def finish(run: Launched, timeout: float) -> subprocess.CompletedProcess:
    """Wait for the run; past ``timeout`` seconds (counted from its start) kill its process
    tree and fail the test."""
    left = max(0.0, timeout - (time.perf_counter() - run.started))
    try:
        run.proc.wait(timeout=left)
    except subprocess.TimeoutExpired:
        workers = descendants(run.proc.pid)
        _signal_all(workers, signal.SIGUSR1)  # stack dumps where faulthandler listens
        time.sleep(2)
        _signal_all([run.proc.pid, *workers], signal.SIGKILL)
        run.proc.wait()
        tail = run.stderr.read_text(errors="replace")[-6000:]
        shutil.rmtree(run.stdout.parent, ignore_errors=True)
        pytest.fail(f"torchrun hung: no exit within {timeout:.0f} s, killed it and its "
                    f"{len(workers)} workers; log tail:\n{tail}", pytrace=False)  # fmt: skip
    out = run.stdout.read_text(errors="replace")
    err = run.stderr.read_text(errors="replace")
    shutil.rmtree(run.stdout.parent, ignore_errors=True)
    return subprocess.CompletedProcess(run.proc.args, run.proc.returncode, out, err)

"""One expensive output per test session, shared by every pytest-xdist worker.

``shared_once(root, name, make)`` returns ``root / name`` after ``make(root / name)`` has run
exactly once for that ``root``: the first caller takes a lock (an atomic ``mkdir``), builds
into a temporary folder and renames it into place; every other caller, in this process or
another worker, waits for it. A failure is recorded, so the waiting workers fail at once with
the first one's message instead of building again; a builder that died without a word (killed)
is noticed from its process id.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

POLL_S = 0.5


def session_root(basetemp: Path) -> Path:
    """The folder every xdist worker of this session sees: ``basetemp``'s parent under xdist
    (each worker's basetemp is ``<session>/popen-gwN``), ``basetemp`` itself without it."""
    return basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _wait(out: Path, lock: Path, failed: Path, timeout_s: float) -> Path:
    start = time.monotonic()
    while not out.is_dir():
        if failed.is_file():
            raise RuntimeError(f"shared {out.name} failed in another worker: {failed.read_text()}")
        pid_file = lock / "pid"
        if pid_file.is_file() and not _alive(int(pid_file.read_text() or 0)):
            raise RuntimeError(f"the worker building shared {out.name} died without a result")
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f} s for shared {out.name}")
        time.sleep(POLL_S)
    return out


def shared_once(
    root: Path, name: str, make: Callable[[Path], None], timeout_s: float = 3600.0
) -> Path:
    """``root / name``, built once by ``make(folder)`` (see the module docstring)."""
    out, lock, failed = root / name, root / f"{name}.lock", root / f"{name}.failed"
    try:
        lock.mkdir()
    except FileExistsError:
        return _wait(out, lock, failed, timeout_s)
    (lock / "pid").write_text(str(os.getpid()))
    tmp = root / f"{name}.building"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        tmp.rename(out)  # atomic: waiters never see half an output
    except BaseException as e:
        failed.write_text(f"{type(e).__name__}: {e}")
        raise
    return out

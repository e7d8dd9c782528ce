"""Under ``torchrun --nproc_per_node 2`` (gloo): a rank killed mid-step makes the job restart
(``--max-restarts 1``) from the last checkpoint and finish on the same weights as a run that
was never interrupted; a hung rank is caught by ``train.timeout_s`` with a one-line message."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finegrain.checkpoint import latest_checkpoint

from helpers import torchrun

REPO = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).resolve().parent / "inject.py"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
# a restart that cannot join the process group (the stale-store hang) is ended by finegrain
# after train.timeout_s + JOIN_GRACE_S with its one-line message, before BOUND_S
ARGS = ["train", "--recipe", "toy_faults", "train.steps=8", "train.checkpoint_every=2",
        "eval.tasks=[]", "train.device=cpu", "train.timeout_s=120"]  # fmt: skip
BOUND_S = 420  # one torchrun, both attempts; about 80 s on 2 busy cores


def _start(out: Path, fault: str, *extra: str, restarts: int = 0,
           env_extra: dict | None = None) -> torchrun.Launched:  # fmt: skip
    args = [str(INJECT), fault, "--", *ARGS, "--output-dir", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env_extra or {}))
    return torchrun.start(args, env, restarts=restarts)


def _torchrun(out: Path, fault: str, *extra: str, **kw: object) -> subprocess.CompletedProcess:
    return torchrun.finish(_start(out, fault, *extra, **kw), BOUND_S)  # type: ignore[arg-type]


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


def test_several_nodes_with_restarts_are_told_to_unshare_the_store(monkeypatch, capsys):
    """Restart counts are per node agent, so attempt prefixes can differ between nodes: rank 0
    names the launch setting that gives each attempt a fresh store (one line, only then)."""
    from datetime import timedelta

    import torch.distributed as dist

    from finegrain.train.distributed import attempt_store

    server = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5)
    )
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port), "RANK": "0",
           "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "1"}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for nodes, told in (("1", False), ("2", True)):
        monkeypatch.setenv("GROUP_WORLD_SIZE", nodes)
        attempt_store(timedelta(seconds=5))
        err = capsys.readouterr().err
        assert ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in err) is told, (nodes, err)
        assert err.count("\n") == int(told)
    monkeypatch.setenv("RANK", "1")  # one line per job, not per rank
    attempt_store(timedelta(seconds=5))
    assert capsys.readouterr().err == ""


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


def test_setup_hang_past_the_timeout_ends_the_rank_in_one_line():
    """A rank stuck in process-group setup past torch's own timeout (gloo connecting to a dead
    peer's address does not give up) is ended by the watchdog: exit code 2, one line."""
    code = ("import time; from finegrain.train.distributed import join_within; "
            "join_within(0.5, lambda: None); time.sleep(1.5); print('fast join: no exit'); "
            "join_within(2, lambda: time.sleep(600), rank=1)")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stdout.strip() == "fast join: no exit", "a join that returns disarms the timer"
    line = res.stderr.strip()
    assert line.startswith("finegrain train: error: rank 1: could not join the process group "
                           "within 2s"), line  # fmt: skip
    assert "\n" not in line
    assert time.perf_counter() - start < 120


def test_a_worker_that_joined_a_group_ends_with_its_code_and_flushed_output():
    """``end_worker`` (torchrun workers skip interpreter teardown, where gloo's threads can
    abort the process) keeps the exit code and everything printed, and is a no-op in a
    process that never joined a group (a plain ``finegrain train``)."""
    code = ("import sys; import finegrain.train.distributed as d; d.end_worker(5); "
            "print('no group: returned'); d._JOINED = True; print('buffered', end=''); "
            "sys.stderr.write('err'); d.end_worker(3); print('not reached')")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert res.returncode == 3, res.stderr[-3000:]
    assert res.stdout == "no group: returned\nbuffered"
    assert res.stderr.endswith("err")


def test_killed_rank_restarts_from_last_checkpoint_same_result(tmp_path, faults):
    run = tmp_path / "run"  # the uninterrupted reference runs at the same time (own port, dir)
    ref_run = _start(tmp_path / "ref", "none")
    try:
        res = _torchrun(run, "step:5", restarts=1,
                        env_extra={"FAULT_RANK": "1", "FAULT_ATTEMPT": "0"})  # fmt: skip
    finally:
        ref = torchrun.finish(ref_run, BOUND_S)
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


def test_hung_torchrun_fails_the_test_and_leaves_no_worker(tmp_path):
    """The bound itself: a torchrun whose workers never end is killed with its workers (each in
    a session of its own, out of reach of the agent's process group) and fails the test in one
    line, with the workers' Python stacks in the log tail."""
    hang = ("import faulthandler, os, pathlib, signal, sys, time; "
            "faulthandler.register(signal.SIGUSR1, all_threads=True); "
            "pathlib.Path(sys.argv[1], os.environ['LOCAL_RANK']).touch(); "
            "time.sleep(600)")  # fmt: skip
    cmd = ["--no-python", sys.executable, "-c", hang, str(tmp_path)]
    run = torchrun.start(cmd, dict(os.environ))
    deadline = time.perf_counter() + 120
    while not all((tmp_path / r).exists() for r in "01") and time.perf_counter() < deadline:
        time.sleep(0.2)
    workers = torchrun.descendants(run.proc.pid)
    assert len(workers) == 2, workers
    bound = time.perf_counter() - run.started + 1  # both workers are up: they hang from now on
    with pytest.raises(pytest.fail.Exception) as failed:
        torchrun.finish(run, bound)
    msg = str(failed.value)
    assert msg.startswith(f"torchrun hung: no exit within {bound:.0f} s"), msg
    assert msg.count("most recent call first") == 2, "each hung worker dumped its stack"
    assert time.perf_counter() - run.started < bound + 15
    left = [p for p in workers if _running(p)]
    assert not left, f"workers {left} outlived the bound"


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status may wait for PID 1 to collect it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

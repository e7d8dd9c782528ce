"""SIGKILL at random points (inside a step, inside a checkpoint write, inside an evaluation),
a corrupted newest checkpoint and a SIGTERM, all on one run that is resumed each time with
``--resume latest``: the final weights equal an uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finegrain.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint

REPO = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).resolve().parent / "inject.py"
STEPS = 10
ARGS = ["train", "--recipe", "toy_faults", f"train.steps={STEPS}", "train.checkpoint_every=2",
        "train.eval_every=3", "train.keep_last=0"]  # fmt: skip


def _run(out: Path, fault: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(INJECT), fault, "--", *ARGS, "--output-dir", str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("ref") / "run"
    res = _run(out, "none")
    assert res.returncode == 0, res.stderr[-3000:]
    return _weights(out)


def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path, reference, faults):
    rng = random.Random(int(os.environ.get("FINEGRAIN_FAULT_SEED", "17")))
    kills = [f"step:{rng.randint(3, STEPS - 1)}",
             f"ckpt:1:{rng.choice(['model', 'state', 'latest'])}", "eval:1"]  # fmt: skip
    run, survived = tmp_path / "run", 0
    for i, fault in enumerate(kills):
        res = _run(run, fault, *(["--resume", "latest"] if i else []))
        assert res.returncode == -signal.SIGKILL, f"{fault} never fired: {res.stderr[-2000:]}"
        assert "Traceback" not in res.stderr
        for c in list_checkpoints(run / "ckpt"):  # whatever the kill hit, what is listed is valid
            verify_checkpoint(c)
        survived += 1
    # the newest checkpoint rots on disk: --resume latest says so and takes the one before
    newest = list_checkpoints(run / "ckpt")[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    res = _run(run, "none", "--resume", "latest")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"skipping {newest.name}" in res.stderr and "falling back to" in res.stderr
    assert "resumed from step" in res.stderr
    got = _weights(run)
    assert latest_checkpoint(run).name == f"step_{STEPS:07d}"
    for k in reference:
        assert torch.equal(got[k], reference[k]), k
    survived += 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["data"]["broken"] == 0
    evals = sorted(p.name for p in run.glob("eval*"))
    assert evals and all((run / e / "results.json").is_file() for e in evals)
    print(f"kill points: {kills} + corrupt {newest.name}")
    faults.record("SIGKILL step/ckpt/eval + rot", injected=len(kills) + 1, survived=survived)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_checkpoints_at_step_boundary_and_resumes_exactly(
    tmp_path, toy_cli, monkeypatch, capsys, faults, sig
):
    from finegrain import cli
    from finegrain.train.trainer import Trainer

    assert cli.main([*ARGS, "--output-dir", str(tmp_path / "ref")]) == 0
    reference = _weights(tmp_path / "ref")
    run, orig = tmp_path / "run", Trainer.train_step

    def signalled(self, micro):  # noqa: ANN001, ANN202
        if self.step + 1 == 5:
            os.kill(os.getpid(), sig)  # what a scheduler sends before preemption
        return orig(self, micro)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    capsys.readouterr()
    assert cli.main([*ARGS, "--output-dir", str(run)]) == 128 + sig
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"interrupted by {sig.name} at step 5" in last and "--resume latest" in last
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] == 5
    assert latest_checkpoint(run).name == "step_0000005", "checkpoint at the step boundary"
    assert not any(run.glob("eval*")), "an interrupted run has no final evaluation"
    monkeypatch.setattr(Trainer, "train_step", orig)
    assert cli.main([*ARGS, "--output-dir", str(run)]) == 2  # forgot --resume: refused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another run" in err[0] and "--resume latest" in err[0]
    assert cli.main([*ARGS, "--output-dir", str(run), "--resume", "latest"]) == 0
    assert "resumed from step 5" in capsys.readouterr().err
    got = _weights(run)
    for k in reference:
        assert torch.equal(got[k], reference[k]), k
    faults.record(f"{sig.name} (preemption)", injected=1, survived=1)

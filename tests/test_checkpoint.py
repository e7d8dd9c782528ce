import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finegrain.checkpoint import (
    check_compatible,
    latest_checkpoint,
    list_checkpoints,
    load_run,
)
from finegrain.train.checkpoint import load_state, rng_state, save_checkpoint, set_rng_state

from helpers.toy_method import ToyCLIP, ToyConfig, toy_trainer

HERE = Path(__file__).resolve().parent


def _save(root, step, keep=3):
    w = {"w": torch.full((2, 2), float(step))}
    return save_checkpoint(root, step, w, {"step": step, "x": torch.arange(3)}, keep_last=keep)


def test_atomic_layout_latest_and_keep_last(tmp_path):
    root = tmp_path / "ckpt"
    for s in (1, 2, 3, 4):
        _save(root, s, keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["step_0000003", "step_0000004"]
    assert (root / "latest").read_text().strip() == "step_0000004"
    assert latest_checkpoint(tmp_path).name == "step_0000004"
    w, state = load_state(root / "step_0000004")
    assert torch.equal(w["w"], torch.full((2, 2), 4.0)) and state["step"] == 4
    assert not list(root.glob(".tmp_*")), "temp dirs must not survive a save"


def test_crash_mid_write_never_corrupts_latest(tmp_path):
    root = tmp_path / "ckpt"
    _save(root, 5)
    half = root / ".tmp_step_0000010_999999"  # a writer killed mid-checkpoint
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00garbage")
    incomplete = root / "step_0000011"  # a dir without state.pt is not a checkpoint
    incomplete.mkdir()
    assert latest_checkpoint(tmp_path).name == "step_0000005"
    (root / "latest").write_text("step_0000099\n")  # dangling pointer: fall back to a scan
    assert latest_checkpoint(tmp_path).name == "step_0000005"
    _save(root, 6)  # the next save sweeps the stale temp dir of the dead process
    assert not half.exists()


def test_rng_state_roundtrip_is_weights_only_safe(tmp_path):
    import random

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = rng_state()
    torch.save(state, tmp_path / "s.pt")
    a = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    b = (random.random(), np.random.rand(), torch.rand(1))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_check_compatible_names_shape(tmp_path):
    method = ToyCLIP(ToyConfig())
    sd = {k: v.clone() for k, v in method.state_dict().items()}
    check_compatible(method, sd, "x")
    sd["image_proj.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"'image_proj.0.weight' has shape \(3, 3\)"):
        check_compatible(method, sd, "x")
    del sd["logit_scale"]
    with pytest.raises(ValueError, match="1 missing keys"):
        check_compatible(method, sd, "x")


def test_load_run_from_run_ckpt_and_file(tmp_path):
    tr = toy_trainer(tmp_path, steps=2)
    tr.fit()
    ref = tr.method.state_dict()
    ckpt = latest_checkpoint(tmp_path)
    for where in (tmp_path, ckpt, ckpt / "model.safetensors"):
        method, cfg, weights = load_run(str(where))
        assert cfg.method.name == "toy_clip" and not method.training
        assert weights == ckpt / "model.safetensors"
        for k, v in ref.items():
            assert torch.equal(method.state_dict()[k], v), (where, k)
    with pytest.raises(FileNotFoundError):
        load_run(str(tmp_path / "nope"))


def _toy_cmd(out, *extra):
    return [sys.executable, str(HERE / "helpers" / "toy_method.py"), str(out), "12", "3", *extra]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{HERE.parent}{os.pathsep}{HERE}")
    return env


def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    """A run killed with SIGKILL after a checkpoint, resumed, ends on the same bits."""
    ref = subprocess.run(_toy_cmd(tmp_path / "ref"), env=_env(), capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen(_toy_cmd(run, "--sleep", "0.15"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 90
    while time.time() < deadline and (latest_checkpoint(run) is None
                                      or latest_checkpoint(run).name < "step_0000006"):  # fmt: skip
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = latest_checkpoint(run)
    assert killed_at is not None and killed_at.name < "step_0000012", "kill came too late"
    res = subprocess.run(_toy_cmd(run, "--resume", "latest"), env=_env(), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    a = load_file(str(latest_checkpoint(tmp_path / "ref") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert latest_checkpoint(run).name == "step_0000012"
    for k in a:
        assert torch.equal(a[k], b[k]), k

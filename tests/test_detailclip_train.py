"""DetailCLIP through the real machinery: 2 gloo ranks == 1 process on the joined batch (losses,
gradients, all-reduced centres), and SIGKILL + resume == uninterrupted run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_detailclip import tiny_batch, tiny_config

from finegrain.checkpoint import latest_checkpoint
from finegrain.methods.detailclip import DetailCLIP

REPO = Path(__file__).resolve().parents[1]
WORLD, B = 2, 3


def _model() -> DetailCLIP:
    torch.manual_seed(0)
    m = DetailCLIP(tiny_config()).double().train()
    with torch.no_grad():  # move off the init so every term has signal
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return m


def _batch() -> dict:
    b = tiny_batch(WORLD * B, seed=5)
    return {k: v.double() if v.is_floating_point() else v for k, v in b.items()}


def _step(m: DetailCLIP, batch: dict) -> dict:
    out = m(batch)
    out.loss.backward()
    res = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.losses.items()}}
    res["grads"] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.after_optimizer_step(1, 10)
    res["center_cls"], res["center_patch"] = m.center_cls.clone(), m.center_patch.clone()
    return res


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)  # fmt: skip
    try:
        sl = slice(rank * B, (rank + 1) * B)
        res = _step(_model(), {k: v[sl] for k, v in _batch().items()})
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_gloo_ranks_equal_one_process_on_the_joined_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ref = _step(_model(), _batch())
    # the self-distillation and reconstruction terms are float64 end to end; the shared
    # clip_loss takes its logits in float32 (losses/contrastive.py), hence its looser
    # tolerance on the value (its gradients agree to ~1e-15)
    for key in ("ibot_patch_loss", "ibot_cls_loss", "recon_loss"):
        mean = torch.stack([r[key] for r in ranks]).mean()  # DDP: mean of the ranks' losses
        torch.testing.assert_close(mean, ref[key], rtol=1e-10, atol=1e-12, msg=key)
    for key in ("loss", "clip_loss"):
        mean = torch.stack([r[key] for r in ranks]).mean()
        torch.testing.assert_close(mean, ref[key], rtol=1e-6, atol=1e-7, msg=key)
    for name, g in ref["grads"].items():
        mean = torch.stack([r["grads"][name] for r in ranks]).mean(0)  # DDP averages grads
        atol = 1e-10 * float(g.abs().max()) + 1e-15  # scaled to the tensor's magnitude
        torch.testing.assert_close(mean, g, rtol=1e-8, atol=atol, msg=name)
    for key in ("center_cls", "center_patch"):  # all-reduced: every rank holds the global mean
        for r in ranks:
            torch.testing.assert_close(r[key], ref[key], rtol=1e-6, atol=1e-9, msg=key)


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "finegrain.cli", "train", "--recipe", "detailclip_smoke",
            "--output-dir", str(out), "train.steps=6", "train.checkpoint_every=2",
            "eval.tasks=[]", "data.batch_size=4", "data.num_workers=0", *extra]  # fmt: skip


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    ref = subprocess.run(_cmd(tmp_path / "ref"), env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(run), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        found = latest_checkpoint(run)
        if found is not None and found.name >= "step_0000002":
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = latest_checkpoint(run)
    assert killed_at is not None and killed_at.name < "step_0000006", "kill came too late"
    res = subprocess.run(_cmd(run, "--resume", "latest"), env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    a = load_file(str(latest_checkpoint(tmp_path / "ref") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert latest_checkpoint(run).name == "step_0000006"
    assert any(k.startswith("teacher.") for k in a) and "center_patch" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k

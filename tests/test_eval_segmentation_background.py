"""Zero-shot segmentation with background prompts (CLIPpy / its replication) and
higher-resolution inference (more patches at test time)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finegrain.eval import run_tasks
from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.segmentation import background_prompts, predict_masks

from helpers.eval_toy import COLORS, ToyMethod


def test_background_prompts_predict_zero():
    classes = F.normalize(torch.eye(3), dim=-1)  # 2 objects + 1 background prompt
    dense = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.1, 0, 1.0]]).t()
    dense = dense.reshape(1, 3, 1, 4)  # (B, D, h, w)
    pred = predict_masks(dense, classes, [(1, 4)], threshold=0.0, num_background=1)[0]
    assert pred.tolist() == [[1, 2, 0, 0]]
    pred = predict_masks(dense, classes, [(1, 4)], threshold=0.0)[0]  # no background class
    assert pred.tolist() == [[1, 2, 3, 3]]
    assert background_prompts(" background, sky ,,") == ["background", "sky"]


def _white_background_scenes(root, scenes, size=32):
    names = [c for c in COLORS if c != "white"]
    for d in ("JPEGImages", "SegmentationClass"):
        (root / d).mkdir(parents=True, exist_ok=True)
    h = size // 2
    for i, colors in enumerate(scenes):
        arr = np.full((size, size, 3), COLORS["white"], np.uint8)
        mask = np.zeros((size, size), np.uint8)
        for q, c in enumerate(colors):
            if c is not None:
                ys, xs = (q // 2) * h, (q % 2) * h
                arr[ys : ys + h, xs : xs + h] = COLORS[c]
                mask[ys : ys + h, xs : xs + h] = 1 + names.index(c)
        Image.fromarray(arr).save(root / "JPEGImages" / f"{i}.jpg", format="PNG")
        Image.fromarray(mask, "L").save(root / "SegmentationClass" / f"{i}.png")
    (root / "classnames.txt").write_text("\n".join(names))


def test_background_class_and_higher_resolution_end_to_end(tmp_path):
    _white_background_scenes(tmp_path, [["red", None, "blue", None], [None, "green", None, "red"]])
    base = {"task": "segmentation", "dataset": "voc", "path": str(tmp_path), "templates": "plain"}
    tasks = [
        EvalTaskConfig(**base),
        EvalTaskConfig(**base, background="white"),
        EvalTaskConfig(**base, background="white", image_size=64),
    ]
    res = run_tasks(ToyMethod(), tasks, progress=False)
    # with the background prompt, background (3/4 of the pixels) is class 0 of the mIoU and
    # predicted right; a few stray object pixels keep the mIoU lower
    for key in ("bg", "bg+64px"):
        assert res[f"segmentation/voc/{key}/pixel_accuracy"] > 0.95, res
        assert res[f"segmentation/voc/{key}/miou"] > 0.5, res
    with pytest.raises(ValueError, match=r"background prompts \['red'\] are also object classes"):
        run_tasks(ToyMethod(), [EvalTaskConfig(**base, background="red")], progress=False)


def test_higher_resolution_inference_feeds_more_patches(tmp_path):
    _white_background_scenes(tmp_path, [["red", None, "blue", None]])
    seen = []

    class Spy(ToyMethod):
        def dense_features(self, images):
            seen.append(tuple(images.shape[-2:]))
            return super().dense_features(images)

    base = {"task": "segmentation", "dataset": "voc", "path": str(tmp_path), "templates": "plain"}
    run_tasks(
        Spy(), [EvalTaskConfig(**base), EvalTaskConfig(**base, image_size=64)], progress=False
    )
    assert seen == [(32, 32), (64, 64)]

"""Zero-shot segmentation: prediction and mIoU vs naive per-pixel references, end-to-end on a
VOC-style fixture folder, background threshold, overlays, capability error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finegrain.eval import run_tasks
from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.segmentation import confusion, predict_masks, seg_metrics

from helpers.eval_toy import COLORS, PlainToy, ToyMethod, color_scene


def test_predict_masks_matches_per_pixel_reference():
    g = torch.Generator().manual_seed(0)
    dense, classes = (
        torch.randn(2, 5, 3, 4, generator=g),
        F.normalize(torch.randn(3, 5, generator=g), dim=-1),
    )
    preds = predict_masks(dense, classes, [(6, 8), (3, 4)], threshold=0.3)
    up = F.interpolate(F.normalize(dense, dim=1), size=(6, 8), mode="bilinear", align_corners=False)
    for y in range(6):
        for x in range(8):
            sims = [float(up[0, :, y, x] @ classes[c]) for c in range(3)]
            # the einsum commutes with the (linear) bilinear upsampling
            want = 0 if max(sims) < 0.3 else 1 + int(np.argmax(sims))
            assert preds[0][y, x].item() == want
    assert preds[1].shape == (3, 4)


def naive_miou(preds, gts, n, ignore_bg):
    ious, correct, total = [], 0, 0
    for c in range(1 if ignore_bg else 0, n):
        tp = fp = fn = 0
        for p, g in zip(preds, gts):
            valid = (g != 255) & ((g != 0) if ignore_bg else True)
            tp += int(((p == c) & (g == c) & valid).sum())
            fp += int(((p == c) & (g != c) & valid).sum())
            fn += int(((p != c) & (g == c) & valid).sum())
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    for p, g in zip(preds, gts):
        valid = (g != 255) & ((g != 0) if ignore_bg else True)
        correct += int(((p == g) & valid).sum())
        total += int(valid.sum())
    return sum(ious) / len(ious), correct / total


@pytest.mark.parametrize("ignore_bg", [True, False])
def test_miou_matches_naive(ignore_bg):
    g = torch.Generator().manual_seed(3)
    gts = [torch.randint(0, 4, (5, 6), generator=g) for _ in range(3)]
    gts[0][0, :] = 255
    lo = 1 if ignore_bg else 0
    preds = [torch.randint(lo, 4, (5, 6), generator=g) for _ in range(3)]
    conf = sum(confusion(p, t, 4, ignore_bg) for p, t in zip(preds, gts))
    got = seg_metrics(conf, ignore_bg)
    miou, acc = naive_miou(preds, gts, 4, ignore_bg)
    assert got["miou"] == pytest.approx(miou) and got["pixel_accuracy"] == pytest.approx(acc)


def write_scenes(root, scenes):
    for d in ("JPEGImages", "SegmentationClass"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i, colors in enumerate(scenes):
        img, mask = color_scene(colors, size=32)
        img.resize((48, 40)).save(root / "JPEGImages" / f"{i}.jpg", quality=95)  # non-square
        m = Image.fromarray(mask.astype(np.uint8)).resize((48, 40), Image.NEAREST)
        m.save(root / "SegmentationClass" / f"{i}.png")
    (root / "classnames.txt").write_text("\n".join(COLORS))


def test_segmentation_end_to_end_with_overlays(tmp_path):
    scenes = [
        ["red", None, "blue", "green"],
        [None, "yellow", "purple", None],
        ["green", "red", None, None],
    ]
    write_scenes(tmp_path / "voc", scenes)
    base = dict(
        task="segmentation",
        dataset="voc",
        path=str(tmp_path / "voc"),
        templates="plain",
        batch_size=2,
    )
    tasks = [
        EvalTaskConfig(**base),
        EvalTaskConfig(**base, background_threshold=0.5, name="seg/bg"),
    ]
    res = run_tasks(ToyMethod(), tasks, out_dir=tmp_path / "out", progress=False)
    assert res["segmentation/voc/miou"] > 0.5, res  # colours are what the toy embeds
    assert 0 <= res["seg/bg/miou"] <= 1 and 0 <= res["seg/bg/pixel_accuracy"] <= 1
    overlays = sorted((tmp_path / "out" / "segmentation" / "voc" / "overlays").glob("*.png"))
    assert len(overlays) == 3 and overlays[0].stat().st_size > 1000


def test_segmentation_needs_dense_features(tmp_path):
    write_scenes(tmp_path, [["red", None, None, None]])
    cfg = EvalTaskConfig(task="segmentation", dataset="voc", path=str(tmp_path), templates="plain")
    with pytest.raises(
        ValueError, match=r"method 'toy' \(PlainToy\) has no dense_features.*segmentation/voc"
    ):
        run_tasks(PlainToy(), [cfg], progress=False)


def test_per_image_confusions_sum_to_the_task_metrics(tmp_path):
    """The per-image confusion matrices (for bootstrap over images) add up to the metrics."""
    from finegrain.eval.common import EvalContext
    from finegrain.eval.datasets import load_task_data
    from finegrain.eval.segmentation import evaluate_segmentation

    write_scenes(tmp_path / "voc", [["red", None, "blue", "green"], [None, "yellow", None, None]])
    cfg = EvalTaskConfig(task="segmentation", dataset="voc", path=str(tmp_path / "voc"),
                         templates="plain", batch_size=1)  # fmt: skip
    ctx = EvalContext.create(ToyMethod(), progress=False)
    metrics, art = evaluate_segmentation(ctx, cfg, load_task_data(cfg, ctx.image_size))
    per_image = art["confusions"]
    assert per_image.shape == (2, len(COLORS) + 1, len(COLORS) + 1)
    assert seg_metrics(per_image.sum(0), True) == pytest.approx(metrics)
    assert seg_metrics(per_image[1], True)["miou"] != pytest.approx(metrics["miou"])

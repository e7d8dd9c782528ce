"""Linear-probe segmentation: a head on frozen dense features learns what they encode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.eval import run_tasks
from finegrain.eval.config import LinearProbeTaskConfig
from finegrain.eval.linear_probe import train_probe

from helpers.eval_toy import COLORS, PlainToy, ToyMethod, color_scene


def _write_voc(root, scenes, split_of):
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i, colors in enumerate(scenes):
        img, mask = color_scene(colors, size=32)
        img.save(root / "JPEGImages" / f"{i}.jpg", quality=95)
        Image.fromarray(mask.astype(np.uint8)).save(root / "SegmentationClass" / f"{i}.png")
    for split in ("train", "val"):
        ids = [str(i) for i in range(len(scenes)) if split_of(i) == split]
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids))
    (root / "classnames.txt").write_text("\n".join(COLORS))


def test_train_probe_fits_separable_features():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (16, 4, 4), generator=g)  # patch-level classes
    feats = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 2.0
    feats = feats + 0.1 * torch.randn(feats.shape, generator=g)
    masks = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (16, 16, 16)
    cfg = LinearProbeTaskConfig(epochs=25, batch_size=8, lr=5e-2)
    mu, sigma, head = train_probe(feats, masks, 3, cfg)
    pred = torch.nn.functional.interpolate(head((feats - mu) / sigma), size=(16, 16),
                                           mode="bilinear").argmax(1)  # fmt: skip
    assert (pred == masks).float().mean() > 0.95


def test_linear_probe_voc_folder_end_to_end(tmp_path):
    names = list(COLORS)
    rng = np.random.default_rng(0)
    scenes = [[names[j] if rng.random() > 0.3 else None for j in rng.integers(0, 6, 4)]
              for _ in range(24)]  # fmt: skip
    _write_voc(tmp_path / "voc", scenes, lambda i: "train" if i < 16 else "val")
    cfg = LinearProbeTaskConfig(dataset="voc", path=str(tmp_path / "voc"), epochs=30,
                                batch_size=8, lr=5e-2)  # fmt: skip
    res = run_tasks(ToyMethod(), [cfg], progress=False)
    assert res["linear_probe/voc/miou"] > 0.7, res  # colours are what the toy's patches encode
    assert 0 <= res["linear_probe/voc/pixel_accuracy"] <= 1


def test_linear_probe_is_deterministic_and_runs_on_builtin_scenes():
    cfg = LinearProbeTaskConfig(num_train=16, num_samples=8, epochs=2, batch_size=8)
    a = run_tasks(ToyMethod(), [cfg], progress=False)
    b = run_tasks(ToyMethod(), [cfg], progress=False)
    assert a["linear_probe/synthetic/miou"] == b["linear_probe/synthetic/miou"]


def test_linear_probe_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="LinearProbeTaskConfig.dataset .ade.; valid choices"):
        LinearProbeTaskConfig(dataset="ade")
    with pytest.raises(ValueError, match="has no dense_features.*linear_probe"):
        run_tasks(PlainToy(), [LinearProbeTaskConfig(num_train=2, num_samples=2)], progress=False)


def test_linear_probe_color_variant_labels_objects_by_colour():
    from finegrain.data.synthetic_sets import eval_split
    from finegrain.eval.datasets import PROBE_TRAIN_SEED, load_probe_data

    cfg = LinearProbeTaskConfig(variant="color", num_train=4, num_samples=4)
    data = load_probe_data(cfg, image_size=32)
    ref = eval_split("segmentation", 4, seed=PROBE_TRAIN_SEED, image_size=32)
    assert data.train.classnames == list(ref["color_classnames"])
    for got, want in zip(data.train.masks, ref["color_masks"]):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    shape = load_probe_data(LinearProbeTaskConfig(num_train=4, num_samples=4), image_size=32)
    assert shape.train.classnames == list(ref["classnames"]) != data.train.classnames
    cfg = LinearProbeTaskConfig(variant="color", num_train=16, num_samples=8, epochs=2,
                                batch_size=8)  # fmt: skip
    assert "linear_probe/synthetic/color/miou" in run_tasks(ToyMethod(), [cfg], progress=False)
    with pytest.raises(ValueError, match="variant 'colour'.*valid choices: segmentation, color"):
        load_probe_data(LinearProbeTaskConfig(variant="colour"))

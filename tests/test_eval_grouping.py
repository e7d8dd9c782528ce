"""Bottom-up grouping: PCA centres + cosine assignment and best-overlap Jaccard vs hand-computed
answers, oracle features score 1, VOC-style and built-in data end to end, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finegrain.data.config import DataConfig
from finegrain.eval import run_tasks
from finegrain.eval.common import EvalContext
from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.grouping import (
    GroupingTaskConfig,
    InstanceData,
    assign_groups,
    evaluate_grouping,
    group_patches,
    instance_jaccards,
)

from helpers.eval_toy import COLORS, PlainToy, ToyMethod


def test_group_patches_hand_computed():
    # patches [1,0], [0,1], [2,0]: Z^T Z = diag(2, 1) -> v1 = e1, v2 = e2 (k' = min(8, 3, 2) = 2)
    feats = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]).reshape(2, 1, 3)  # (D, h, w)
    sim = group_patches(feats, k=8)
    assert sim.shape == (2, 1, 3)
    torch.testing.assert_close(sim[:, 0], torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    assert assign_groups(sim, (1, 3)).tolist() == [[0, 1, 0]]
    # signs point towards the data: negating the features flips v, not the assignment
    assert assign_groups(group_patches(-feats), (1, 3)).tolist() == [[0, 1, 0]]


def test_instance_jaccard_hand_computed():
    groups = torch.tensor([[0, 0, 1], [0, 1, 1]])
    inst = torch.tensor([[1, 1, 0], [255, 2, 2]])  # (1, 0) ignored, 0 background
    # instance 1 = group 0's 2 valid pixels -> 1; instance 2: 2 of group 1's 3 pixels -> 2/3
    assert instance_jaccards(groups, inst) == pytest.approx([1.0, 2 / 3])
    assert instance_jaccards(groups, torch.zeros(2, 3, dtype=torch.long)) == []


def test_instance_jaccard_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 5, (9, 11), generator=g)
    inst = torch.randint(0, 4, (9, 11), generator=g)
    inst[0, :4] = 255
    want = []
    valid = inst != 255
    for i in (1, 2, 3):
        best = 0.0
        for k in range(5):
            a, b = (inst == i) & valid, (groups == k) & valid
            best = max(best, float((a & b).sum() / (a | b).sum()))
        want.append(best)
    assert instance_jaccards(groups, inst) == pytest.approx(want)


class OracleColors(ToyMethod):
    """Dense features at pixel resolution: one-hot of the nearest palette colour (images
    un-normalised: mean 0, std 1)."""

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        rgb = images  # (B, 3, H, W) in 0..1
        palette = torch.tensor([(0, 0, 0), *COLORS.values()], dtype=torch.float32) / 255
        d = ((rgb[:, None] - palette[None, :, :, None, None]) ** 2).sum(2)  # (B, P, H, W)
        return F.one_hot(d.argmin(1), len(palette)).permute(0, 3, 1, 2).float()


def _instance_scenes(root, scenes, size=32):
    """Quadrant instances: scene = list of 4 colour names or None (background)."""
    for d in ("JPEGImages", "SegmentationObject"):
        (root / d).mkdir(parents=True, exist_ok=True)
    h = size // 2
    for i, colors in enumerate(scenes):
        arr = np.zeros((size, size, 3), np.uint8)
        inst = np.zeros((size, size), np.uint8)
        k = 0
        for q, c in enumerate(colors):
            if c is None:
                continue
            k += 1
            ys, xs = (q // 2) * h, (q % 2) * h
            arr[ys : ys + h, xs : xs + h] = COLORS[c]
            inst[ys : ys + h, xs : xs + h] = k
        inst[h, :] = 255  # a VOC-style ignored boundary row
        # lossless bytes under the VOC name (PIL reads the content, not the suffix)
        Image.fromarray(arr).save(root / "JPEGImages" / f"{i}.jpg", format="PNG")
        Image.fromarray(inst, "L").save(root / "SegmentationObject" / f"{i}.png")


SCENES = [
    ["red", None, "blue", "green"],
    [None, "yellow", "purple", None],
    ["red", "blue", None, None],
]


def test_oracle_features_score_one_on_a_voc_folder(tmp_path):
    _instance_scenes(tmp_path, SCENES)
    d = DataConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    cfg = EvalTaskConfig(task="grouping", dataset="voc", path=str(tmp_path), batch_size=2)
    res = run_tasks(OracleColors(), [cfg], progress=False, data_cfg=d)
    assert res["grouping/voc/jaccard"] == pytest.approx(1.0)
    assert res["grouping/voc/instances"] == 7


def test_toy_patch_features_group_and_config_kinds_agree(tmp_path):
    _instance_scenes(tmp_path, SCENES)
    base = {"dataset": "voc", "path": str(tmp_path), "batch_size": 2}
    a = run_tasks(ToyMethod(), [EvalTaskConfig(task="grouping", **base)], progress=False)
    b = run_tasks(ToyMethod(), [GroupingTaskConfig(**base)], progress=False)
    for key in ("jaccard", "jaccard_image_mean", "instances"):
        assert a[f"grouping/voc/{key}"] == b[f"grouping/voc/{key}"]
    assert 0.5 < a["grouping/voc/jaccard"] <= 1.0  # colour patches separate the quadrants
    one = run_tasks(ToyMethod(), [GroupingTaskConfig(**base, num_groups=1)], progress=False)
    assert one["grouping/voc/jaccard"] < a["grouping/voc/jaccard"]  # one group merges all


def test_grouping_on_builtin_scenes_and_bad_input(tmp_path):
    res = run_tasks(ToyMethod(), [EvalTaskConfig(task="grouping", num_samples=6, batch_size=4)],
                    progress=False)  # fmt: skip
    assert 0 < res["grouping/synthetic/jaccard"] <= 1 and res["grouping/synthetic/instances"] >= 6
    with pytest.raises(ValueError, match=r"has no dense_features.*grouping/synthetic"):
        run_tasks(PlainToy(), [GroupingTaskConfig(num_samples=2)], progress=False)
    with pytest.raises(ValueError, match="no instance masks under"):
        run_tasks(
            ToyMethod(), [GroupingTaskConfig(dataset="voc", path=str(tmp_path))], progress=False
        )
    ctx = EvalContext.create(ToyMethod(), progress=False)
    data = InstanceData([Image.new("RGB", (32, 32))], [np.zeros((32, 32), np.int64)])
    with pytest.raises(ValueError, match="no ground-truth instances"):
        evaluate_grouping(ctx, GroupingTaskConfig(), data)
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        evaluate_grouping(ctx, GroupingTaskConfig(num_groups=0), data)

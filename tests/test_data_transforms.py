"""Box-aware transforms: boxes follow crop/resize/flip, checked against rendered pixels."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.data.config import DataConfig
from finegrain.data.transforms import BoxTransform, eval_transform, move_regions, train_transform

W, H, S = 100, 80, 64
PX_BOX = (20, 10, 50, 40)  # red rectangle in source pixels: x0, y0, x1, y1 (exclusive)


def _scene() -> tuple[Image.Image, np.ndarray, list[dict]]:
    arr = np.full((H, W, 3), 255, dtype=np.uint8)
    x0, y0, x1, y1 = PX_BOX
    arr[y0:y1, x0:x1] = (255, 0, 0)
    mask = np.zeros((H, W), dtype=np.int64)
    mask[y0:y1, x0:x1] = 1
    region = {"text": "a red box", "box": [x0 / W, y0 / H, x1 / W, y1 / H], "score": 1.0}
    return Image.fromarray(arr), mask, [region]


def _bbox(on: torch.Tensor) -> list[float] | None:
    ys, xs = torch.nonzero(on, as_tuple=True)
    if len(xs) == 0:
        return None
    return [xs.min() / S, ys.min() / S, (xs.max() + 1) / S, (ys.max() + 1) / S]


@pytest.mark.parametrize("mode,hflip", [("rrc", False), ("rrc", True), ("squash", False),
                                        ("center", False), ("squash", True)])  # fmt: skip
def test_boxes_follow_pixels(mode: str, hflip: bool) -> None:
    t = BoxTransform(size=S, mode=mode, crop_scale=(0.2, 1.0), hflip=hflip, mean=(0, 0, 0),
                     std=(1, 1, 1), min_visible=0.3)  # fmt: skip
    image, mask, regions = _scene()
    kept = dropped = 0
    for seed in range(40):
        img, moved, m = t(image, regions, random.Random(seed), mask)
        assert img.shape == (3, S, S) and m.shape == (S, S)
        red = (img[0] > 0.8) & (img[1] < 0.3)  # pixels of the red rectangle
        ref_mask = _bbox(m == 1)  # naive reference: the mask warped by nearest interpolation
        ref_pix = _bbox(red)
        if moved:
            kept += 1
            box = moved[0]["box"]
            assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
            assert np.allclose(box, ref_mask, atol=1.5 / S), (seed, box, ref_mask)
            assert np.allclose(box, ref_pix, atol=2.5 / S), (seed, box, ref_pix)
        else:
            dropped += 1
            # dropped only when (nearly) cut out: few mask pixels remain in the crop
            frac = 0.0 if ref_mask is None else float((m == 1).sum()) / (S * S)
            area = (PX_BOX[2] - PX_BOX[0]) * (PX_BOX[3] - PX_BOX[1]) / (W * H)
            assert ref_mask is None or mode == "rrc", "only random crops may cut a box out"
            assert frac < area * 4, seed
    assert kept > 0
    if mode != "rrc":
        assert dropped == 0


def test_flip_mirrors_box() -> None:
    image, mask, regions = _scene()
    t = BoxTransform(size=S, mode="squash", hflip=True, mean=(0, 0, 0), std=(1, 1, 1))
    seen = set()
    for seed in range(10):
        img, moved, _ = t(image, regions, random.Random(seed), mask)
        x0 = moved[0]["box"][0]
        seen.add(round(x0, 3))
        assert round(x0, 3) in (round(PX_BOX[0] / W, 3), round(1 - PX_BOX[2] / W, 3))
    assert len(seen) == 2, "both flipped and unflipped outcomes should occur"


def test_cut_out_boxes_dropped_and_clipped() -> None:
    regions = [{"text": "in", "box": [0.1, 0.1, 0.3, 0.3]},
               {"text": "out", "box": [0.8, 0.8, 0.9, 0.9]},
               {"text": "half", "box": [0.4, 0.4, 0.6, 0.6]}]  # fmt: skip
    # crop the top-left half of a 100x100 image
    moved = move_regions(regions, (0, 0, 50, 50), (100, 100), False, min_visible=0.2)
    assert [r["text"] for r in moved] == ["in", "half"]
    assert np.allclose(moved[0]["box"], [0.2, 0.2, 0.6, 0.6])
    assert np.allclose(moved[1]["box"], [0.8, 0.8, 1.0, 1.0])  # clipped to the crop
    assert [r["text"] for r in move_regions(regions, (0, 0, 50, 50), (100, 100), False, 0.3)] == [
        "in"
    ]


def test_deterministic_and_normalised() -> None:
    cfg = DataConfig(image_size=S, augment="rrc", hflip=True)
    t = train_transform(cfg)
    image, mask, regions = _scene()
    a = t(image, regions, random.Random(3), mask)
    b = t(image, regions, random.Random(3), mask)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])
    e = eval_transform(cfg)(image, regions)
    white = (1.0 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    assert torch.allclose(e[0][:, 0, -1], white, atol=1e-4)  # top-right pixel is white


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="valid choices"):
        train_transform(DataConfig(augment="flip"))
    with pytest.raises(ValueError, match="crop_scale"):
        BoxTransform(size=8, mode="rrc", crop_scale=(0.0, 1.0))


def test_flip_swaps_left_right_in_text() -> None:
    from finegrain.data.sources import make_sample
    from finegrain.data.synthetic import generate_scene, position_words, scene_record
    from finegrain.data.transforms import swap_left_right

    assert swap_left_right("Left of the right, bright") == "Right of the left, bright"
    t = BoxTransform(size=64, mode="squash", hflip=True)
    flips = 0
    for seed in range(12):
        scene = generate_scene(seed, 64)
        raw = {"key": str(seed), "image": scene["image"], "record": scene_record(scene)}
        s = make_sample(raw, t, seed)
        flips += s["regions"][0]["box"] != scene["regions"][0]["box"]
        for region, sentence in zip(s["regions"], s["sentences"]):
            assert position_words(region["box"]) in sentence.lower(), (seed, sentence)
    assert 0 < flips < 12


@pytest.mark.parametrize("wh", [(500, 375), (333, 500), (97, 131), (64, 64)])
def test_one_eval_transform_is_clips_pixel_for_pixel(wh: tuple[int, int]) -> None:
    """Training's ``center`` mode, ``data.transforms.eval_transform`` and the evaluation tasks'
    preprocessing are one transform, identical to torchvision's Resize + CenterCrop."""
    from torchvision import transforms as T

    from finegrain.eval.common import eval_transform as task_transform

    w, h = wh
    rng = np.random.default_rng(w * h)
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    cfg = DataConfig(image_size=64)
    ref = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BICUBIC),
                     T.CenterCrop(64), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])(image)  # fmt: skip
    assert torch.equal(eval_transform(cfg)(image)[0], ref)
    assert torch.equal(task_transform(64, tuple(cfg.mean), tuple(cfg.std))(image), ref)
    # a box covering the whole image ends up covering the whole crop
    _, moved, _ = eval_transform(cfg)(image, [{"text": "all", "box": [0.0, 0.0, 1.0, 1.0]}])
    assert moved[0]["box"] == pytest.approx([0.0, 0.0, 1.0, 1.0])

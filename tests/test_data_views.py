"""Per-stage sample RNG streams and multi-view transforms (views, their boxes, photometric ops)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.data.collate import ContrastiveCollate, stack_views
from finegrain.data.config import DataConfig, SyntheticConfig
from finegrain.data.loader import build_train_loader
from finegrain.data.schema import sample_rng
from finegrain.data.sources import make_sample
from finegrain.data.transforms import (
    BoxTransform,
    MultiViewTransform,
    ViewAugment,
    multi_view_transform,
)
from finegrain.methods.flair import FLAIRCollate

W, H, S = 100, 80, 48
PX_BOX = (20, 10, 60, 50)  # red rectangle in source pixels: x0, y0, x1, y1 (exclusive)
PLAIN = {"jitter_prob": 0.0, "grayscale_prob": 0.0}  # geometry only


def _scene() -> tuple[Image.Image, list[dict]]:
    arr = np.full((H, W, 3), 255, dtype=np.uint8)
    x0, y0, x1, y1 = PX_BOX
    arr[y0:y1, x0:x1] = (255, 0, 0)
    region = {"text": "a red box on the left", "box": [x0 / W, y0 / H, x1 / W, y1 / H]}
    return Image.fromarray(arr), [region]


def _mv(views: list[ViewAugment]) -> MultiViewTransform:
    base = BoxTransform(S, "rrc", (0.3, 1.0), hflip=True, mean=(0, 0, 0), std=(1, 1, 1))
    return MultiViewTransform(base, views)


def _red_bbox(view: torch.Tensor) -> list[float] | None:
    on = (view[0] > 0.5) & (view[1] < 0.5)  # red, not white
    ys, xs = torch.nonzero(on, as_tuple=True)
    if len(xs) == 0:
        return None
    size = view.shape[-1]
    return [xs.min() / size, ys.min() / size, (xs.max() + 1) / size, (ys.max() + 1) / size]


def test_sample_rng_streams_are_independent_and_reproducible() -> None:
    a, b = sample_rng(7, "crop"), sample_rng(7, "subcaption")
    assert [a.random() for _ in range(3)] != [b.random() for _ in range(3)]
    assert sample_rng(7, "view0").random() == sample_rng(7, "view0").random()
    assert sample_rng(7, "view0").random() != sample_rng(8, "view0").random()
    with pytest.raises(ValueError, match="stage"):
        sample_rng(7, "")


def test_crop_scale_does_not_change_the_subcaption_draw() -> None:
    """With one shared Random the crop's draws decided the sub-captions; now they cannot."""
    image, regions = _scene()
    record = {"sentences": [f"Sentence number {i}." for i in range(8)]}
    raw = {"key": "k", "record": record, "image": image}
    drawn: list[list[str]] = []
    collate = FLAIRCollate(lambda t: (drawn.append(t), torch.zeros(len(t), 4))[1], 3, 3,
                           "consecutive", "auto")  # fmt: skip
    images = []
    for scale in ((0.1, 0.2), (0.9, 1.0)):
        t = BoxTransform(S, "rrc", scale, hflip=True)
        images.append(
            [make_sample({**raw, "image": image.copy()}, t, seed, "caption") for seed in range(6)]
        )
        collate(images[-1])
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(*images)), "crops differ"
    assert drawn[0] == drawn[1]


def test_views_are_seeded_distinct_and_move_their_boxes() -> None:
    image, regions = _scene()
    mv = _mv([ViewAugment(size=S, crop_scale=(0.3, 1.0), **PLAIN) for _ in range(2)])
    checked = 0
    for seed in range(12):
        out = mv.for_sample(image, regions, seed)
        again = mv.for_sample(image, regions, seed)
        assert len(out.views) == 2 and all(v.shape == (3, S, S) for v in out.views)
        assert all(torch.equal(a, b) for a, b in zip(out.views, again.views)), "not seeded"
        assert not torch.equal(out.views[0], out.views[1]), "views must differ"
        assert not torch.equal(out.views[0], out.image)
        for view, moved in zip(out.views, out.view_regions):
            pix = _red_bbox(view)
            if not moved:  # dropped: mostly cut out of this view
                continue
            checked += 1
            assert pix is not None
            np.testing.assert_allclose(moved[0]["box"], pix, atol=2.5 / S)
    assert checked >= 6
    other = mv.for_sample(image, regions, 99)
    assert not torch.equal(other.views[0], mv.for_sample(image, regions, 0).views[0])


def test_view_flip_mirrors_region_text_of_that_view_only() -> None:
    image, regions = _scene()
    mv = _mv([ViewAugment(size=S, crop_scale=(0.95, 1.0), hflip=True, **PLAIN)])
    texts = set()
    for seed in range(12):
        out = mv.for_sample(image, regions, seed)
        if out.view_regions[0]:
            texts.add(out.view_regions[0][0]["text"])
        # the image's own regions are moved with their own flip, not the view's
        assert out.regions == [] or out.regions[0]["text"] == regions[0]["text"]
    assert texts == {"a red box on the left", "a red box on the right"}


def test_photometric_ops_are_applied_from_the_stream() -> None:
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    gray = ViewAugment(size=16, jitter_prob=0.0, grayscale_prob=1.0).photometric(
        x, random.Random(0)
    )
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    sol = ViewAugment(size=16, jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=1.0)
    torch.testing.assert_close(
        sol.photometric(x, random.Random(0)), torch.where(x >= 0.5, 1 - x, x)
    )
    blur = ViewAugment(size=16, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=1.0,
                       blur_sigma=(1.5, 2.0))  # fmt: skip
    blurred = blur.photometric(x, random.Random(0))
    assert blurred.diff(dim=-1).abs().mean() < 0.5 * x.diff(dim=-1).abs().mean()
    jitter = ViewAugment(size=16, jitter_prob=1.0, grayscale_prob=0.0)
    a, b = jitter.photometric(x, random.Random(1)), jitter.photometric(x, random.Random(2))
    assert not torch.equal(a, x) and not torch.equal(a, b)
    torch.testing.assert_close(a, jitter.photometric(x, random.Random(1)), rtol=0, atol=0)


def test_bad_view_config_is_one_line() -> None:
    with pytest.raises(ValueError, match="blur_prob must be a probability"):
        ViewAugment(blur_prob=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        ViewAugment(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="at least one ViewAugment"):
        multi_view_transform(DataConfig(), [])


def test_loader_with_method_transform_stacks_views() -> None:
    cfg = DataConfig(image_size=32, augment="rrc", batch_size=4)
    cfg.synthetic = SyntheticConfig(num_samples=8)
    views = [ViewAugment(size=24, blur_prob=1.0), ViewAugment(size=24, solarize_prob=0.2)]
    collate = ContrastiveCollate(lambda t: torch.zeros(len(t), 5, dtype=torch.long))
    loader = build_train_loader(cfg, collate, seed=1, transform=multi_view_transform(cfg, views))
    batch = next(iter(loader))
    again = next(iter(build_train_loader(cfg, collate, seed=1,
                                         transform=multi_view_transform(cfg, views))))  # fmt: skip
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["views"].shape == (4, 2, 3, 24, 24)
    assert torch.equal(batch["views"], again["views"])
    assert batch["stats"] == {"skipped_samples": 0.0}
    plain = next(iter(build_train_loader(cfg, collate, seed=1)))
    assert "views" not in plain and torch.equal(plain["image"], batch["image"])


def test_stack_views_errors() -> None:
    a = {"views": [torch.zeros(3, 4, 4)]}
    assert stack_views([{"image": torch.zeros(3, 4, 4)}]) is None
    with pytest.raises(ValueError, match="same number of views"):
        stack_views([a, {"views": [torch.zeros(3, 4, 4)] * 2}])
    with pytest.raises(ValueError, match="different sizes"):
        stack_views([a, {"views": [torch.zeros(3, 5, 5)]}])

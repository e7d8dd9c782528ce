"""Random resized crops as boxes (finegrain.data.crop_boxes): the sampling rule and the
crop-and-resize of pixels or feature maps that DetailCLIP's token-space views use."""

from __future__ import annotations

import math

import pytest
import torch

from finegrain.data.crop_boxes import crop_resize, sample_crop_boxes


def test_boxes_follow_the_rrc_rule() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(2000, (0.14, 1.0), (3 / 4, 4 / 3), generator=g).double()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes >= 0).all() and (boxes <= 1 + 1e-6).all()
    whole = (w > 1 - 1e-6) & (h > 1 - 1e-6)  # the fallback after 10 failed draws
    area, ratio = (w * h)[~whole], (w / h)[~whole]
    assert (area >= 0.14 - 1e-5).all() and (area <= 1 + 1e-5).all()
    assert (ratio >= 3 / 4 - 1e-5).all() and (ratio <= 4 / 3 + 1e-5).all()
    assert 0.4 < area.mean().item() < 0.7  # uniform in [0.14, 1] minus the rejected tall/wide
    again = sample_crop_boxes(2000, (0.14, 1.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, boxes.float())  # seeded
    never = sample_crop_boxes(5, (1.0, 1.0), (2.0, 2.0))  # a 2:1 box of the whole area: no fit
    assert torch.equal(never, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 5))
    with pytest.raises(ValueError, match="crop scale"):
        sample_crop_boxes(1, (0.5, 0.2))


def test_crop_resize_cuts_the_box_out() -> None:
    x = torch.randn(3, 5, 8, 8, dtype=torch.float64)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    torch.testing.assert_close(crop_resize(x, whole, (8, 8)), x, rtol=0, atol=1e-12)
    # box [0, 0.5] x [0.25, 0.75] at half size: output pixel centres land on input centres
    box = torch.tensor([[0.0, 0.25, 0.5, 0.75]] * 3)
    torch.testing.assert_close(crop_resize(x, box, (4, 4)), x[:, :, 2:6, 0:4], rtol=0, atol=1e-12)
    # the same box cuts the same region out of a map at another resolution: a 2 x 2 average
    # pooled map's crop equals the pooled crop of the full map (bilinear at exact 2x scale)
    up = x.repeat_interleave(2, -1).repeat_interleave(2, -2)  # (3, 5, 16, 16)
    torch.testing.assert_close(
        crop_resize(up, box, (8, 8)), up[:, :, 4:12, 0:8], rtol=0, atol=1e-12
    )
    with pytest.raises(ValueError, match="boxes must be"):
        crop_resize(x, box[:2], (4, 4))


def test_crop_resize_upsamples_bilinearly() -> None:
    """A centred box of half the side, resized to the full size: naive bilinear reference."""
    x = torch.arange(16.0, dtype=torch.float64).reshape(1, 1, 4, 4)
    got = crop_resize(x, torch.tensor([[0.25, 0.25, 0.75, 0.75]]), (4, 4))[0, 0]
    want = torch.empty(4, 4, dtype=torch.float64)
    for i in range(4):
        for j in range(4):  # output centre -> input coordinate (pixel centres at k + 0.5)
            yi, xj = 1 + (i + 0.5) / 2 - 0.5, 1 + (j + 0.5) / 2 - 0.5
            y0, x0 = math.floor(yi), math.floor(xj)
            fy, fx = yi - y0, xj - x0
            want[i, j] = ((1 - fy) * (1 - fx) * x[0, 0, y0, x0] + (1 - fy) * fx * x[0, 0, y0, x0 + 1]
                          + fy * (1 - fx) * x[0, 0, y0 + 1, x0] + fy * fx * x[0, 0, y0 + 1, x0 + 1])  # fmt: skip
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

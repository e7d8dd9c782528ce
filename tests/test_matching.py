"""Box conversions, GIoU vs a scalar reference (degenerate boxes included), Hungarian matching
vs brute force over all permutations, box losses vs a loop."""

from __future__ import annotations

import itertools

import pytest
import torch

from finegrain.losses.matching import (
    box_cxcywh_to_xyxy,
    box_losses,
    box_xyxy_to_cxcywh,
    hungarian_match,
    matching_cost,
    pairwise_giou,
    pairwise_iou,
)


def ref_giou(a: list[float], b: list[float]) -> tuple[float, float]:
    """Rezatofighi et al. 2019, Alg. 1, written with explicit branches for zero areas."""
    area = lambda x: max(x[2] - x[0], 0.0) * max(x[3] - x[1], 0.0)  # noqa: E731
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area(a) + area(b) - inter
    iou = inter / union if union > 0 else 0.0
    c = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    giou = iou - (c - union) / c if c > 0 else iou
    return iou, giou


def test_box_conversions_roundtrip() -> None:
    b = torch.rand(7, 4)
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(b)), b, atol=1e-6)
    assert torch.allclose(
        box_cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])), torch.tensor([0.4, 0.3, 0.6, 0.7])
    )


def test_giou_matches_reference_including_degenerate() -> None:
    boxes = [
        [0.1, 0.1, 0.5, 0.5],
        [0.3, 0.3, 0.9, 0.8],
        [0.6, 0.6, 0.7, 0.9],  # disjoint from the first
        [0.2, 0.2, 0.2, 0.6],  # zero width (a line)
        [0.4, 0.4, 0.4, 0.4],  # a point
        [0.4, 0.4, 0.4, 0.4],  # the same point (zero union and zero enclosure)
        [0.1, 0.1, 0.5, 0.5],  # identical to the first
    ]
    t = torch.tensor(boxes, dtype=torch.float64)
    giou, iou = pairwise_giou(t, t), pairwise_iou(t, t)
    assert torch.isfinite(giou).all()
    for i, j in itertools.product(range(len(boxes)), repeat=2):
        ri, rg = ref_giou(boxes[i], boxes[j])
        assert iou[i, j].item() == pytest.approx(ri, abs=1e-6), (i, j)
        assert giou[i, j].item() == pytest.approx(rg, abs=1e-6), (i, j)
    assert giou[0, 6].item() == pytest.approx(1.0)
    assert giou[0, 2].item() < 0  # disjoint boxes are penalised


def brute_force(cost: torch.Tensor) -> float:
    """Minimum total cost over all injective assignments of the smaller side."""
    q, r = cost.shape
    if r <= q:
        return min(
            sum(cost[p[j], j].item() for j in range(r)) for p in itertools.permutations(range(q), r)
        )
    return min(
        sum(cost[i, p[i]].item() for i in range(q)) for p in itertools.permutations(range(r), q)
    )


@pytest.mark.parametrize("q,r", [(3, 1), (3, 3), (4, 2), (2, 4), (5, 5)])
def test_hungarian_matches_brute_force(q: int, r: int) -> None:
    g = torch.Generator().manual_seed(q * 10 + r)
    b = 3
    pred = torch.rand(b, q, 4, generator=g) * 0.5 + 0.2
    tgt = torch.rand(b, r, 4, generator=g) * 0.5 + 0.2
    mask = torch.ones(b, r, dtype=torch.bool)
    mask[1, 0] = False  # a padded target
    cost = matching_cost(pred, tgt)
    bi, pi, ti = hungarian_match(pred, tgt, mask)
    for i in range(b):
        cols = mask[i].nonzero().squeeze(1)
        sel = bi == i
        assert sel.sum().item() == min(q, len(cols)), "one pair per target (up to Q)"
        assert len(set(pi[sel].tolist())) == sel.sum().item(), "a query is used once"
        assert set(ti[sel].tolist()) <= set(cols.tolist()), "padded targets are never matched"
        got = cost[i, pi[sel], ti[sel]].sum().item()
        assert got == pytest.approx(brute_force(cost[i][:, cols]), abs=1e-5)


def test_hungarian_no_targets_and_cost_formula() -> None:
    pred = torch.rand(2, 3, 4) * 0.3 + 0.3
    tgt = torch.rand(2, 2, 4) * 0.3 + 0.3
    bi, pi, ti = hungarian_match(pred, tgt, torch.zeros(2, 2, dtype=torch.bool))
    assert bi.numel() == pi.numel() == ti.numel() == 0
    c = matching_cost(pred, tgt)
    x, y = box_cxcywh_to_xyxy(pred[0, 1]), box_cxcywh_to_xyxy(tgt[0, 0])
    ref = 5 * (pred[0, 1] - tgt[0, 0]).abs().sum().item() - 2 * ref_giou(x.tolist(), y.tolist())[1]
    assert c[0, 1, 0].item() == pytest.approx(ref, abs=1e-5)


def test_box_losses_vs_loop() -> None:
    src = torch.rand(5, 4) * 0.4 + 0.3
    tgt = torch.rand(5, 4) * 0.4 + 0.3
    l1, giou = box_losses(src, tgt, num_boxes=7.0)
    ref_l1 = sum((src[i] - tgt[i]).abs().sum().item() for i in range(5)) / 7
    xs, ys = box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)
    ref_g = sum(1 - ref_giou(xs[i].tolist(), ys[i].tolist())[1] for i in range(5)) / 7
    assert l1.item() == pytest.approx(ref_l1, rel=1e-5)
    assert giou.item() == pytest.approx(ref_g, rel=1e-5)
    e1, e2 = box_losses(src[:0].requires_grad_(), tgt[:0], 0)
    assert e1.item() == 0 and e2.item() == 0

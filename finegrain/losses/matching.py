"""Box geometry, Hungarian matching and the DETR box losses used by GRAIN.

Boxes are normalised to the image (0..1). Two layouts are used:
``cxcywh`` (centre x, centre y, width, height; what the region decoder predicts) and
``xyxy`` (x0, y0, x1, y1; the sample schema).

Math (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020, Eq. 1-2;
Rezatofighi et al., "Generalized IoU", CVPR 2019, Alg. 1):

- matching cost between prediction q and target r:
  ``C[q, r] = w_l1 * ||b_q - b_r||_1 - w_giou * GIoU(b_q, b_r)`` (GRAIN's released matcher uses
  ``w_l1 = 5``, ``w_giou = 2`` and no class term);
- ``GIoU(a, b) = IoU(a, b) - (|C| - |A u B|) / |C|`` with ``C`` the smallest enclosing box.

Degenerate (zero-area) boxes: a zero union gives ``IoU = 0`` and a zero enclosing box gives
``GIoU = IoU`` (the divisions are clamped by ``EPS``), so a point or a line never yields NaN.

Matching is vectorised: one batched ``(B, Q, R)`` cost tensor, one device -> host copy, then
``scipy.optimize.linear_sum_assignment`` per image on a small ``(Q, R_b)`` matrix.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from finegrain.losses.contrastive import at_least_fp32
from finegrain.losses.distributed import world_info

EPS = 1e-7


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """(..., 4) cx cy w h -> (..., 4) x0 y0 x1 y1."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    """(..., 4) x0 y0 x1 y1 -> (..., 4) cx cy w h."""
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(b: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (...) area, negative extents count as zero."""
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def _iou_parts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Broadcasting helper: (intersection, union, enclosing area) of xyxy boxes a and b."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a) + box_area(b) - inter
    lt_c = torch.minimum(a[..., :2], b[..., :2])
    rb_c = torch.maximum(a[..., 2:], b[..., 2:])
    enclose = (rb_c - lt_c).clamp(min=0).prod(-1)
    return inter, union, enclose


def elementwise_giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(IoU, GIoU) of paired xyxy boxes ``a[..., i]`` and ``b[..., i]`` (shapes broadcast)."""
    inter, union, enclose = _iou_parts(a, b)
    iou = inter / union.clamp(min=EPS)
    giou = iou - (enclose - union) / enclose.clamp(min=EPS)
    return iou, giou


def pairwise_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., N, 4) x (..., M, 4) xyxy -> (..., N, M) generalized IoU."""
    return elementwise_giou(a.unsqueeze(-2), b.unsqueeze(-3))[1]


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., N, 4) x (..., M, 4) xyxy -> (..., N, M) IoU."""
    return elementwise_giou(a.unsqueeze(-2), b.unsqueeze(-3))[0]


def matching_cost(
    pred: torch.Tensor, target: torch.Tensor, cost_l1: float = 5.0, cost_giou: float = 2.0
) -> torch.Tensor:
    """Batched DETR matching cost (Carion et al. 2020, Eq. 1 without the class term).

    pred: (B, Q, 4) cxcywh, target: (B, R, 4) cxcywh -> (B, Q, R).
    """
    assert pred.dim() == 3 and target.dim() == 3, "pred (B,Q,4) and target (B,R,4) expected"
    pred, target = pred.float(), target.float()
    l1 = (pred.unsqueeze(2) - target.unsqueeze(1)).abs().sum(-1)  # (B, Q, R)
    giou = pairwise_giou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))  # (B, Q, R)
    return cost_l1 * l1 - cost_giou * giou


@torch.no_grad()
def hungarian_match(
    pred: torch.Tensor,
    target: torch.Tensor,
    target_mask: torch.Tensor,
    cost_l1: float = 5.0,
    cost_giou: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimal one-to-one assignment per image between predictions and real targets.

    pred: (B, Q, 4) cxcywh; target: (B, R, 4) cxcywh, padded; target_mask: (B, R) bool.
    Returns three LongTensors of equal length M (on ``pred.device``):
    ``batch_idx``, ``pred_idx`` (query index) and ``target_idx`` (index into R), sorted by
    image then target. Images with no target contribute nothing; with more targets than
    queries only ``Q`` of them are matched (the cheapest assignment).
    """
    b, q, _ = pred.shape
    assert target.shape[0] == b and target_mask.shape == target.shape[:2], (
        f"target {tuple(target.shape)} / mask {tuple(target_mask.shape)} do not fit pred {tuple(pred.shape)}"
    )
    cost = matching_cost(pred, target, cost_l1, cost_giou).cpu().numpy()  # one copy: (B, Q, R)
    mask = target_mask.cpu().numpy().astype(bool)
    bi, pi, ti = [], [], []
    for i in range(b):
        cols = np.flatnonzero(mask[i])
        if cols.size == 0:
            continue
        rows, sel = linear_sum_assignment(cost[i][:, cols])
        order = np.argsort(cols[sel])
        bi.append(np.full(rows.size, i))
        pi.append(rows[order])
        ti.append(cols[sel][order])
    if not bi:
        empty = torch.zeros(0, dtype=torch.long, device=pred.device)
        return empty, empty.clone(), empty.clone()

    def cat(xs: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(xs).astype(np.int64)).to(pred.device)

    return cat(bi), cat(pi), cat(ti)


def box_losses(
    pred: torch.Tensor, target: torch.Tensor, num_boxes: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DETR box losses over matched pairs (Carion et al. 2020, Sec. 3.1 "Bounding box loss").

    pred, target: (M, 4) cxcywh matched pairs. Returns ``(L1, 1 - GIoU)`` each summed over
    pairs (L1 also over the 4 coordinates) and divided by ``num_boxes`` (the number of target
    boxes, averaged across ranks by the caller).
    """
    assert pred.shape == target.shape, f"{tuple(pred.shape)} vs {tuple(target.shape)}"
    if isinstance(num_boxes, torch.Tensor):
        num_boxes = num_boxes.clamp(min=1.0)
    else:
        num_boxes = max(float(num_boxes), 1.0)
    if pred.shape[0] == 0:
        zero = pred.sum() * 0.0
        return zero, zero.clone()
    pred, target = at_least_fp32(pred), at_least_fp32(target)
    l1 = F.l1_loss(pred, target, reduction="sum") / num_boxes
    _, giou = elementwise_giou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))
    return l1, (1.0 - giou).sum() / num_boxes


def num_boxes_over_ranks(
    n: torch.Tensor | float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """DETR's box-loss normaliser: the number of target boxes averaged over ranks, >= 1."""
    n = torch.as_tensor(n, dtype=torch.float, device=device).reshape(())
    _, world = world_info()
    if world > 1:
        import torch.distributed as dist

        n = n.clone()
        dist.all_reduce(n)
        n = n / world
    return n.clamp(min=1.0)

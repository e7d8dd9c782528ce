"""GRAIN's total loss (issue 15) against a naive loop written from the released code
(grain-clip ``train.py``, ``model/box_utils.py``, ``model/losses.py``), in float64:

- ``CLIPLoss``: symmetric InfoNCE of the global image and caption embeddings, scale exp(s);
- ``compute_box_loss``: Hungarian matching per image (cost 5 * L1 - 2 * GIoU, no class term),
  ``sum |b - b'| / num_boxes`` and ``sum (1 - GIoU) / num_boxes`` with the local box count,
  weighted 1/1 and divided by ``len(weight_dict) / 3 = 2/3``; the per-layer (aux) terms are
  computed and dropped;
- ``WordContrastiveLoss``: every matched region query against every available description of
  the batch (flattened image by image), target = its matched description, mean CE;
- total = clip + box + 1 * word.
``weighting=paper`` drops the 1.5; ``aux_loss=True`` adds every intermediate layer's own
matched box terms at the final layer's weights (DETR); ``region_dedup=True`` removes other
slots with the target's text from the denominator.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from finegrain.data.config import SyntheticConfig
from finegrain.data.synthetic_sets import SyntheticScenes
from finegrain.methods.base import build_method
from finegrain.recipes.grain import grain_smoke_method


def _xyxy(b: torch.Tensor) -> list[float]:
    cx, cy, w, h = b.tolist()
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _giou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Generalized IoU of two cxcywh boxes (Rezatofighi et al. 2019), one pair at a time."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = _xyxy(a), _xyxy(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    iou = inter / union
    return iou - (hull - union) / hull


def _ce(logits: list[float], target: int) -> float:
    m = max(logits)
    return -(logits[target] - m - math.log(sum(math.exp(v - m) for v in logits)))


def _match(pred: torch.Tensor, tgt: torch.Tensor) -> list[tuple[int, int]]:
    """(query, target) pairs of the released matcher for one image: pred (Q, 4), tgt (T, 4)."""
    cost = [[5 * float((p - t).abs().sum()) - 2 * _giou(p, t) for t in tgt] for p in pred]  # (Q, T)
    rows, cols = linear_sum_assignment(cost)
    return list(zip(rows.tolist(), cols.tolist()))


def _box_terms(pred: torch.Tensor, boxes: list[torch.Tensor]) -> tuple[float, float, list]:
    """One decoder layer: pred (B, Q, 4) -> (L1 sum / n, (1 - GIoU) sum / n, matches)."""
    n = sum(len(t) for t in boxes)
    l1 = giou = 0.0
    matches = []
    for i, tgt in enumerate(boxes):
        pairs = _match(pred[i], tgt) if len(tgt) else []
        matches.append(pairs)
        for q, t in pairs:
            l1 += float((pred[i, q] - tgt[t]).abs().sum())
            giou += 1.0 - _giou(pred[i, q], tgt[t])
    return l1 / max(n, 1), giou / max(n, 1), matches


def naive_total(f: dict, scale: float, weighting: str, aux: bool, dedup: bool) -> dict:
    img, txt = f["image"], f["text"]  # (B, D), unit norm
    b = img.shape[0]
    logits = (scale * img @ txt.T).tolist()
    clip = sum(_ce(logits[i], i) + _ce([r[i] for r in logits], i) for i in range(b)) / (2 * b)
    mask = f["region_mask"]
    boxes = [f["boxes"][i][mask[i]] for i in range(b)]  # available boxes, annotation order
    last = f["pred_boxes"][:, -1]  # (B, Q, 4)
    l1, giou, matches = _box_terms(last, boxes)
    w_box = 1.5 if weighting == "released" else 1.0  # / (len(weight_dict) / 3)
    box = w_box * (l1 + giou)
    aux_l1 = aux_giou = 0.0
    if aux:
        for layer in range(f["pred_boxes"].shape[1] - 1):
            a1, a2, _ = _box_terms(f["pred_boxes"][:, layer], boxes)
            aux_l1, aux_giou = aux_l1 + a1, aux_giou + a2
        box += w_box * (aux_l1 + aux_giou)
    # word loss: descriptions flattened image by image (avail_idx), matched queries as rows
    descs, texts, offset, rows = [], [], [], []
    for i in range(b):
        offset.append(len(descs))
        for r in range(mask.shape[1]):
            if mask[i, r]:
                descs.append(f["descriptions"][i, r])
                texts.append(tuple(f["region_text"][i, r].tolist()))
    for i, pairs in enumerate(matches):
        for q, t in pairs:
            rows.append((f["regions"][i, q], offset[i] + t))
    word_terms = []
    for reg, tgt in rows:
        cols = [j for j in range(len(descs)) if j == tgt or not (dedup and texts[j] == texts[tgt])]
        lg = [scale * float(reg @ descs[j]) for j in cols]
        word_terms.append(_ce(lg, cols.index(tgt)))
    word = sum(word_terms) / len(word_terms)
    return {"total": clip + box + word, "clip_loss": clip, "box_l1_loss": l1,
            "box_giou_loss": giou, "region_loss": word, "aux": (aux_l1, aux_giou)}  # fmt: skip


@pytest.fixture(scope="module")
def batch_and_model():
    torch.manual_seed(0)
    cfg = grain_smoke_method()
    ds = SyntheticScenes(SyntheticConfig(seed=3, num_samples=8), image_size=64)
    samples = [ds[i] for i in range(6)]
    samples[2] = {**samples[2], "regions": []}  # an image without regions
    dup = samples[0]["regions"][0]  # the same description in two images (dedup matters)
    samples[1] = {**samples[1], "regions": [dict(dup, box=[0.1, 0.2, 0.5, 0.9])]}
    m = build_method(cfg)
    batch = m.make_collate(True)(samples)
    return cfg, batch


@pytest.mark.parametrize(
    "weighting,aux,dedup",
    [("released", False, False), ("paper", False, False), ("released", True, True),
     ("paper", True, False)],
)  # fmt: skip
def test_total_loss_matches_released_loop(batch_and_model, weighting, aux, dedup) -> None:
    cfg, batch = batch_and_model
    torch.manual_seed(1)
    cfg = dataclasses.replace(cfg, weighting=weighting, aux_loss=aux, region_dedup=dedup)
    m = build_method(cfg).double().train()
    with torch.no_grad():
        m.logit_scale.fill_(math.log(12.0))
        for p in m.decoder.parameters():  # spread the boxes so the matching is not degenerate
            p.add_(0.05 * torch.randn_like(p))
    b = dict(batch, image=batch["image"].double())
    f = m.features(b)
    assert f["region_mask"].sum() >= 6 and not f["region_mask"][2].any()
    out = m.loss_from_features(f)
    ref = naive_total({k: v.detach() for k, v in f.items()}, 12.0, weighting, aux, dedup)
    for k in ("clip_loss", "box_l1_loss", "box_giou_loss", "region_loss"):
        assert out.losses[k].item() == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k
    if aux:
        got = (out.losses["aux_box_l1_loss"].item(), out.losses["aux_box_giou_loss"].item())
        assert ref["aux"][0] > 0 and f["pred_boxes"].shape[1] == cfg.decoder_depth
        assert got == pytest.approx(ref["aux"], rel=1e-9)
    else:
        assert "aux_box_l1_loss" not in out.losses
    assert out.loss.item() == pytest.approx(ref["total"], rel=1e-9)


def test_released_weighting_is_custom_one_and_a_half(batch_and_model) -> None:
    cfg, batch = batch_and_model
    torch.manual_seed(1)
    m = build_method(cfg).double()
    f = m.features(dict(batch, image=batch["image"].double()))
    released = m.loss_from_features(f).loss
    custom = dataclasses.replace(cfg, weighting="custom", box_l1_weight=1.5, box_giou_weight=1.5)
    m2 = build_method(custom).double()
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2.loss_from_features(f).loss, released, rtol=1e-12, atol=0)

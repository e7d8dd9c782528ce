"""Zero-shot semantic segmentation from patch-text similarity (CLIPpy, Ranasinghe et al.
ICCV 2023, Sec. 3.3; the same protocol as GroupViT/TCL's zero-shot segmentation).

For each image: dense features z (D, h, w) from ``Method.dense_features``, class embeddings
w_c (templates averaged, as in zero-shot classification),
    s_c(p) = <normalize(z(p)), w_c>,  upsampled bilinearly from (h, w) to the mask size;
    pred(p) = 1 + argmax_c s_c(p), or 0 (background) where max_c s_c(p) < threshold.
Images are squashed to the model's square input size (no crop), so the upsampled prediction
lines up with the full mask.

Background (CLIPpy Sec. 4 and its replication, which adds "background" and stuff classes to the
prompts and maps every prediction outside the object classes to background):
``background="background,sky,wall"`` appends these prompts to the classes; a pixel whose
argmax is one of them is predicted 0. ``background_threshold > 0`` additionally predicts 0
where the best similarity is below it. Higher-resolution inference: ``image_size`` (> the
model's input size) feeds more patches at test time (towers resample position embeddings).

Metrics: mIoU (mean over classes that occur in the ground truth or the prediction) and pixel
accuracy, from one confusion matrix over all images; label 255 is ignored. Without background
handling (no prompts, threshold 0) background pixels are ignored and mIoU is over object
classes only (the "VOC-20" convention); with either, background is class 0 of the mIoU
("VOC-21").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from finegrain.eval.common import EvalContext, image_batches, require
from finegrain.eval.config import SegmentationTaskConfig
from finegrain.eval.containers import SegmentationData, load_mask
from finegrain.eval.templates import class_prompts, load_templates
from finegrain.eval.zeroshot import class_embeddings

IGNORE = 255


def background_prompts(spec: str) -> list[str]:
    """The background class names of a comma-separated ``background`` field ('' = none)."""
    return [n.strip() for n in spec.split(",") if n.strip()]


def predict_masks(
    dense: torch.Tensor,
    classes: torch.Tensor,
    sizes: list[tuple[int, int]],
    threshold: float,
    num_background: int = 0,
) -> list[torch.Tensor]:
    """dense (B, D, h, w), classes (C + K, D) normalised, the last ``num_background`` = K of
    them background prompts -> B label maps (H_i, W_i) in 0..C (0 = background)."""
    num_objects = classes.shape[0] - num_background
    z = F.normalize(dense.float(), dim=1)
    sim = torch.einsum("bdhw,cd->bchw", z, classes.to(z.device))  # (B, C, h, w)
    out = []
    for b, (h, w) in enumerate(sizes):
        up = F.interpolate(sim[b : b + 1], size=(h, w), mode="bilinear", align_corners=False)[0]
        best, arg = up.max(0)  # (H, W)
        pred = torch.where(arg >= num_objects, torch.zeros_like(arg), arg + 1)
        if threshold > 0:
            pred = torch.where(best < threshold, torch.zeros_like(pred), pred)
        out.append(pred.cpu())
    return out


def confusion(
    pred: torch.Tensor, gt: torch.Tensor, num_labels: int, ignore_background: bool
) -> torch.Tensor:
    """(num_labels, num_labels) counts, rows = ground truth, columns = prediction."""
    valid = gt != IGNORE
    if ignore_background:
        valid &= gt != 0
    g, p = gt[valid], pred[valid]
    bad = g[(g < 0) | (g >= num_labels)]
    if bad.numel():
        raise ValueError(
            f"mask labels {bad.unique().tolist()[:5]} exceed the {num_labels - 1} classes"
        )
    return torch.bincount(g * num_labels + p, minlength=num_labels**2).reshape(
        num_labels, num_labels
    )


def seg_metrics(conf: torch.Tensor, ignore_background: bool) -> dict[str, float]:
    """mIoU over classes present in ground truth or prediction, and pixel accuracy."""
    conf = conf.double()
    if ignore_background:
        conf = conf[1:, 1:]  # predictions are never 0 without a threshold
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    return {
        "miou": (tp[present] / union[present]).mean().item() if present.any() else 0.0,
        "pixel_accuracy": (tp.sum() / conf.sum().clamp_min(1)).item(),
    }


@torch.no_grad()
def evaluate_segmentation(
    ctx: EvalContext, cfg: SegmentationTaskConfig, data: SegmentationData
) -> tuple[dict[str, float], dict]:
    m = ctx.method
    require(m, "dense_features", f"segmentation/{cfg.dataset}")
    bg = background_prompts(cfg.background)
    clash = sorted(set(bg) & set(data.classnames))
    if clash:
        raise ValueError(f"background prompts {clash} are also object classes of {cfg.dataset}")
    names = list(data.classnames) + bg
    prompts = class_prompts(names, load_templates(cfg.templates, cfg.dataset))
    classes = class_embeddings(ctx, prompts, cfg.batch_size, cfg.context_length)  # (C + K, D)
    n = len(data.classnames) + 1
    ignore_bg = cfg.background_threshold <= 0 and not bg
    conf = torch.zeros(n, n, dtype=torch.long)
    keep: dict = {"preds": [], "masks": [], "indices": [], "confusions": []}
    s = 0
    batches = image_batches(
        ctx, data.images, cfg.batch_size, "segmentation", crop=False, size=cfg.image_size
    )
    for batch in batches:
        masks = [torch.from_numpy(load_mask(mk)) for mk in data.masks[s : s + batch.shape[0]]]
        dense = m.dense_features(batch)  # (B, D, h, w)
        assert dense.dim() == 4, f"dense_features must be (B, D, h, w), got {tuple(dense.shape)}"
        sizes = [tuple(mk.shape) for mk in masks]
        preds = predict_masks(dense, classes, sizes, cfg.background_threshold, len(bg))
        for j, (p, g) in enumerate(zip(preds, masks)):
            image_conf = confusion(p, g, n, ignore_bg)
            conf += image_conf
            keep["confusions"].append(image_conf)  # per image: bootstrap over images
            if len(keep["preds"]) < cfg.num_examples:
                keep["preds"].append(p.numpy().astype(np.uint8))
                keep["masks"].append(g.numpy())
                keep["indices"].append(s + j)
        s += batch.shape[0]
    keep["confusions"] = torch.stack(keep["confusions"]) if s else torch.zeros(0, n, n).long()
    return seg_metrics(conf, ignore_bg), keep

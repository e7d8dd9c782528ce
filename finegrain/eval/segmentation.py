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
argmax is one of them is predicted 0. ``classnames="voc59"`` is the replication's vocabulary:
the 20 VOC classes plus 39 stuff names that predict background (ids >= 21 -> 0). ``background_threshold > 0`` additionally predicts 0
where the best similarity is below it. Higher-resolution inference: ``image_size`` (> the
model's input size) feeds more patches at test time (towers resample position embeddings).

Dense-protocol variants (``dense_variant``, ``finegrain.encoders.dense``): the image tower's
last block as MaskCLIP / SCLIP / NACLIP compute it (CLIP-like ViT towers; other methods or
towers refuse in one line); ``raw`` is the method's own ``dense_features``.
Sliding windows (``slide_size`` > 0; SCLIP / NACLIP's ``forward_slide``): the image's short
side is resized to ``slide_size`` (aspect kept, bicubic), windows of the model's input size
(``image_size`` if set) start every ``slide_stride`` pixels (the last one flush with the
border), each window's class similarities are upsampled to its pixels and summed, and the sum
is divided by the number of windows covering each pixel, then resized to the mask.

Metrics: mIoU (mean over classes that occur in the ground truth or the prediction) and pixel
accuracy, from one confusion matrix over all images; label 255 is ignored. Without background
handling (no prompts, threshold 0) background pixels are ignored and mIoU is over object
classes only (the "VOC-20" convention); with either, background is class 0 of the mIoU
("VOC-21").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from finegrain.encoders.dense import dense_variant
from finegrain.eval.common import EvalContext, image_batches, require
from finegrain.eval.config import SegmentationTaskConfig
from finegrain.eval.containers import SegmentationData, load_image, load_mask
from finegrain.eval.templates import class_prompts, load_templates, split_background
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
    sim = class_similarity(dense, classes)  # (B, C, h, w)
    out = []
    for b, (h, w) in enumerate(sizes):
        up = F.interpolate(sim[b : b + 1], size=(h, w), mode="bilinear", align_corners=False)[0]
        out.append(scores_to_labels(up, threshold, num_objects))
    return out


def class_similarity(dense: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) cosine similarity of dense (B, D, h, w) features with classes (C, D)."""
    z = F.normalize(dense.float(), dim=1)
    return torch.einsum("bdhw,cd->bchw", z, classes.to(z.device))


def scores_to_labels(scores: torch.Tensor, threshold: float, num_objects: int) -> torch.Tensor:
    """(C + K, H, W) similarities -> (H, W) labels in 0..C (background prompts and, with a
    threshold > 0, pixels whose best similarity is below it -> 0)."""
    best, arg = scores.max(0)  # (H, W)
    pred = torch.where(arg >= num_objects, torch.zeros_like(arg), arg + 1)
    if threshold > 0:
        pred = torch.where(best < threshold, torch.zeros_like(pred), pred)
    return pred.cpu()


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one side (mmseg's slide grid, as SCLIP / NACLIP): every
    ``stride`` pixels, the last window moved back to end at the border."""
    n = max(length - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride + window, length) - window, 0) for i in range(n)]


def short_side_size(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(H', W') of an (H, W) image whose short side is resized to ``size``, aspect kept."""
    h, w = hw
    if h <= w:
        return size, max(size, round(w * size / h))
    return max(size, round(h * size / w)), size


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


def dense_tower(method: nn.Module, variant: str) -> nn.Module:
    """The image tower whose last block makes the method's dense features (``eval_towers()``:
    the teacher's when a method evaluates through it); one-line error else."""
    tower = method.eval_towers().get("image")
    if tower is not None:
        return tower
    raise ValueError(
        f"method '{method.cfg.name}' has no image tower whose last block makes its dense "
        f"features; dense_variant='{variant}' does not apply (use dense_variant='raw')"
    )


@contextmanager
def dense_mode(ctx: EvalContext, cfg: SegmentationTaskConfig) -> Iterator[None]:
    if cfg.dense_variant == "raw":
        yield
        return
    tower = dense_tower(ctx.method, cfg.dense_variant)
    with dense_variant(tower, cfg.dense_variant, gaussian_std=cfg.gaussian_std,
                       block=cfg.dense_block):  # fmt: skip
        yield


def _to_tensor(image, hw: tuple[int, int], ctx: EvalContext) -> torch.Tensor:
    """(3, H', W') normalised, bicubic resize of the whole image (as the eval transform)."""
    from PIL import Image

    out = image.resize((hw[1], hw[0]), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).float().div_(255.0)
    mean, std = torch.tensor(ctx.mean).view(3, 1, 1), torch.tensor(ctx.std).view(3, 1, 1)
    return (arr - mean) / std


def slide_scores(
    ctx: EvalContext, cfg: SegmentationTaskConfig, image, classes: torch.Tensor
) -> torch.Tensor:
    """(C, H', W') window-averaged class similarities of one image at short side
    ``slide_size`` (module docstring)."""
    window = cfg.image_size or ctx.image_size
    stride = cfg.slide_stride or max(1, window // 2)
    if cfg.slide_size < window:
        raise ValueError(f"slide_size={cfg.slide_size} is smaller than the {window}-pixel window")
    if not 1 <= stride <= window:
        raise ValueError(f"slide_stride={stride} must lie in [1, {window}] (windows must cover)")
    hh, ww = short_side_size((image.height, image.width), cfg.slide_size)
    x = _to_tensor(image, (hh, ww), ctx)
    boxes = [(y, x0) for y in window_starts(hh, window, stride)
             for x0 in window_starts(ww, window, stride)]  # fmt: skip
    total = torch.zeros(classes.shape[0], hh, ww)
    count = torch.zeros(1, hh, ww)
    for s in range(0, len(boxes), cfg.batch_size):
        part = boxes[s : s + cfg.batch_size]
        crops = torch.stack([x[:, y : y + window, x0 : x0 + window] for y, x0 in part])
        sim = class_similarity(ctx.method.dense_features(crops.to(ctx.device)), classes)
        sim = F.interpolate(sim, size=(window, window), mode="bilinear", align_corners=False)
        for (y, x0), sc in zip(part, sim.cpu()):
            total[:, y : y + window, x0 : x0 + window] += sc
            count[:, y : y + window, x0 : x0 + window] += 1
    return total / count


def _predictions(
    ctx: EvalContext, cfg: SegmentationTaskConfig, data: SegmentationData, classes, num_bg: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(index, prediction (H, W), ground truth (H, W)) of every image."""
    num_objects = classes.shape[0] - num_bg
    if cfg.slide_size < 0 or cfg.slide_stride < 0:
        raise ValueError("slide_size and slide_stride must be >= 0 (0 = whole image / half window)")
    if cfg.slide_size > 0:
        for i in ctx.bar(range(len(data.images)), "segmentation", total=len(data.images)):
            g = torch.from_numpy(load_mask(data.masks[i]))
            sc = slide_scores(ctx, cfg, load_image(data.images[i]), classes)  # (C, H', W')
            up = F.interpolate(sc[None], size=tuple(g.shape), mode="bilinear", align_corners=False)
            yield i, scores_to_labels(up[0], cfg.background_threshold, num_objects), g
        return
    s = 0
    batches = image_batches(
        ctx, data.images, cfg.batch_size, "segmentation", crop=False, size=cfg.image_size
    )
    for batch in batches:
        masks = [torch.from_numpy(load_mask(mk)) for mk in data.masks[s : s + batch.shape[0]]]
        dense = ctx.method.dense_features(batch)  # (B, D, h, w)
        assert dense.dim() == 4, f"dense_features must be (B, D, h, w), got {tuple(dense.shape)}"
        sizes = [tuple(mk.shape) for mk in masks]
        preds = predict_masks(dense, classes, sizes, cfg.background_threshold, num_bg)
        for j, (p, g) in enumerate(zip(preds, masks)):
            yield s + j, p, g
        s += batch.shape[0]


def chance_metrics(conf: torch.Tensor, num_predictable: int, ignore_bg: bool) -> dict[str, float]:
    """mIoU / pixel accuracy of uniformly random labels over the ``num_predictable`` labels a
    prediction can take, from the ground-truth pixel counts (rows of ``conf``): the metrics of
    the expected confusion matrix E[conf_gp] = n_g / K (ratio of expectations)."""
    rows = conf.double().sum(1, keepdim=True)  # (n, 1) ground-truth pixels per label
    cols = torch.zeros(1, conf.shape[0], dtype=torch.float64)
    cols[0, conf.shape[0] - num_predictable :] = 1.0 / num_predictable
    return seg_metrics(rows * cols, ignore_bg)


@torch.no_grad()
def evaluate_segmentation(
    ctx: EvalContext, cfg: SegmentationTaskConfig, data: SegmentationData
) -> tuple[dict[str, float], dict]:
    m = ctx.method
    require(m, "dense_features", f"segmentation/{cfg.dataset}")
    objects, preset_bg = split_background(cfg.classnames, list(data.classnames))
    if preset_bg:  # e.g. voc59: names past the 20 VOC classes predict background
        data = dataclasses.replace(data, classnames=objects)
    bg = preset_bg + background_prompts(cfg.background)
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
    with dense_mode(ctx, cfg):
        for i, p, g in _predictions(ctx, cfg, data, classes, len(bg)):
            image_conf = confusion(p, g, n, ignore_bg)
            conf += image_conf
            keep["confusions"].append(image_conf)  # per image: bootstrap over images
            if len(keep["preds"]) < cfg.num_examples:
                keep["preds"].append(p.numpy().astype(np.uint8))
                keep["masks"].append(g.numpy())
                keep["indices"].append(i)
    count = len(keep["confusions"])
    keep["confusions"] = torch.stack(keep["confusions"]) if count else torch.zeros(0, n, n).long()
    keep["protocol"] = _protocol(ctx, cfg, data, conf, ignore_bg, bg, count)
    return seg_metrics(conf, ignore_bg), keep


def _protocol(ctx, cfg, data, conf, ignore_bg: bool, bg: list[str], count: int) -> dict:
    """Every setting that changes the number (``art["protocol"]``)."""
    n = conf.shape[0]
    window = cfg.image_size or ctx.image_size
    out = {
        "n_images": count,
        "n_classes": len(data.classnames),
        "dense_variant": cfg.dense_variant,
        "inference": f"slide:{cfg.slide_size}" if cfg.slide_size else "whole:squash",
        "resolution": window,
        "background": {
            "prompts": bg,
            "threshold": cfg.background_threshold,
            "miou_over": "objects (background ignored)" if ignore_bg else "objects + background",
        },
        "chance": chance_metrics(conf, n - 1 if ignore_bg else n, ignore_bg),
    }
    if cfg.dense_variant != "raw":
        out["dense_block"] = cfg.dense_block
        if cfg.dense_variant == "naclip":
            out["gaussian_std"] = cfg.gaussian_std
    if cfg.slide_size:
        out["slide"] = {"short_side": cfg.slide_size, "window": window,
                        "stride": cfg.slide_stride or max(1, window // 2)}  # fmt: skip
    return out

"""Region classification: the class of each ground-truth box, zero-shot from class prompts.

Every usable box (``finegrain.eval.region_data.clean_boxes``: clipped when it overlaps the
image partly, skipped and counted when it lies outside or has no area) gets a region embedding
r, and is classified by s_c = <normalize(r), w_c> with the class vectors w_c of zero-shot
classification (templates, descriptions and ``class_vectors`` as ``finegrain.eval.zeroshot``).
``mode`` picks how r is made:

- ``crop`` (any method): the box, grown by ``margin`` x its width/height on each side and, with
  ``square``, padded to a square around its centre (pixels outside the image take the
  normalisation mean, i.e. 0 after normalising), is resized to the model's input and encoded
  with ``encode_image`` (the CLIP-on-crops baseline of ViLD/RegionCLIP-style evaluations).
  ``square=False`` squashes the (margined) box to the square input instead.
- ``roialign`` (methods with ``dense_features``): the whole image is squashed to the model's
  input (or ``image_size``) once; its (D, h, w) dense map (already projected into the text space
  the way the method's dense features are, per-token normalised where the method does so, e.g.
  GRAIN) is RoIAlign-pooled (He et al. 2017; ``torchvision.ops.roi_align`` with
  ``aligned=True``, ``roi_size`` x ``roi_size`` bins of ``sampling_ratio`` samples, averaged)
  for every box of the image. Pixel boxes map to the token grid per axis: token column j covers
  original pixels [j W / w, (j + 1) W / w). The pooled vector is then L2-normalised. The maps
  are kept (up to ``feature_cache_mb``) for the rest of the ``run_tasks`` call, keyed by image
  content, so further region tasks on the same images (variants, margins, templates) only pool.
- ``regions`` (methods with ``region_embeddings``, i.e. GRAIN, Halbe et al. arXiv 2412.04429):
  GRAIN's released code (shaunak27/grain-clip) scores region queries only at the image level
  (``finegrain.eval.zeroshot`` ``region_score="released"``) and has no evaluation from
  ground-truth boxes, so two readings are offered (``region_scoring``):
  ``iou`` (default): each box takes the region query whose predicted box
  (``predict_boxes``, on the squashed image) has the highest IoU with it (IoU 0 everywhere: the
  query with the nearest predicted centre; ``unmatched_regions`` counts these, ``matched_iou``
  is the mean best IoU) -- how DETR-style queries, one per object, are read, and the only reading
  that uses the model's own boxes; ``released``: the box is cropped as in ``crop`` and scored by
  the released image-level rule on the crop, s_c = mean_q max_{d in D_c} <r_q, e_d> over the
  crop's region queries q and the class's raw descriptors d (its name without descriptions).

``margin`` applies to ``crop``, ``roialign`` (grown box clipped to the image) and the ``released``
crop; ``iou`` matching uses the ground-truth box. Metrics: ``acc1``, ``acc5`` (when C > 5),
``mean_per_class_recall`` (mean over the classes that have boxes of their recall, i.e. mean
per-class accuracy); with LVIS frequencies also ``acc1_<r|c|f>`` and
``mean_per_class_recall_<r|c|f>``; and the counts ``skipped_box_outside``,
``skipped_degenerate``, ``clipped_boxes`` (plus the loader's ``skipped_crowd``,
``skipped_unknown_category``). ``art["protocol"]`` records the settings and counts.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import box_iou, roi_align

from finegrain.eval.common import EvalContext, eval_transform, require
from finegrain.eval.config import RegionTaskConfig
from finegrain.eval.containers import load_image
from finegrain.eval.region_data import FREQUENCIES, RegionData, clean_boxes
from finegrain.eval.templates import load_templates
from finegrain.eval.zeroshot import (
    _prompt_embeddings,
    class_embeddings,
    prompts_for,
    released_region_scores,
    renormalize_classes,
    task_descriptions,
)

Stream = Iterable[tuple[int, Image.Image, torch.Tensor, torch.Tensor]]


# ---- geometry -----------------------------------------------------------------------------------
def grow_boxes(boxes: torch.Tensor, margin: float) -> torch.Tensor:
    """(K, 4) xyxy boxes grown by ``margin`` x their width/height on every side."""
    if margin == 0:
        return boxes
    wh = (boxes[:, 2:] - boxes[:, :2]) * margin  # (K, 2)
    return torch.cat([boxes[:, :2] - wh, boxes[:, 2:] + wh], dim=1)


def clip_boxes(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    lim = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return torch.minimum(boxes.clamp_min(0), lim)


def crop_region(
    image: Image.Image, box: list[float], square: bool, fill: tuple[int, int, int]
) -> Image.Image:
    """The pixels of ``box`` (xyxy; may extend past the image), squared around its centre when
    ``square``; what lies outside the image is ``fill``."""
    x0, y0, x1, y1 = box
    if square:
        cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2
        x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
    left, top = round(x0), round(y0)
    right, bottom = max(round(x1), left + 1), max(round(y1), top + 1)
    canvas = Image.new("RGB", (right - left, bottom - top), fill)
    w, h = image.size
    inside = (max(left, 0), max(top, 0), min(right, w), min(bottom, h))
    if inside[2] > inside[0] and inside[3] > inside[1]:
        canvas.paste(image.crop(inside), (inside[0] - left, inside[1] - top))
    return canvas


def pool_regions(
    dense: torch.Tensor,
    boxes: list[torch.Tensor],
    sizes: list[tuple[int, int]],
    roi_size: int = 7,
    sampling_ratio: int = 0,
) -> torch.Tensor:
    """RoIAlign means: dense (B, D, h, w), ``boxes[b]`` (K_b, 4) pixel xyxy in the original
    image b of size ``sizes[b]`` = (W, H) -> (sum K_b, D), in the order of the boxes."""
    h, w = dense.shape[-2:]
    rois = []
    for b, (width, height) in zip(boxes, sizes):
        scale = torch.tensor([w / width, h / height, w / width, h / height], dtype=torch.float64)
        rois.append((b.double() * scale).to(dense.device, dense.dtype))  # token-grid units
    out = roi_align(dense, rois, roi_size, 1.0, sampling_ratio, aligned=True)  # (K, D, r, r)
    return out.mean(dim=(2, 3))


def match_boxes(gt: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each ground-truth box (K, 4) the index of the predicted box (Q, 4) of highest IoU
    (IoU 0 everywhere: the nearest predicted centre) and that IoU; both normalised xyxy."""
    iou = box_iou(gt.double(), pred.double())  # (K, Q)
    best, idx = iou.max(dim=1)
    centre = lambda b: (b[:, :2] + b[:, 2:]) / 2  # noqa: E731
    nearest = torch.cdist(centre(gt.double()), centre(pred.double())).argmin(dim=1)  # (K,)
    return torch.where(best > 0, idx, nearest), best


# ---- the stream of usable boxes, image by image ------------------------------------------------
def usable_regions(ctx: EvalContext, data: RegionData, counts: Counter, desc: str) -> Stream:
    """(image index, RGB image, (K, 4) clipped float64 boxes, (K,) labels) for every image with
    a usable box; ``counts`` collects what ``clean_boxes`` skipped and clipped."""
    for i in ctx.bar(range(len(data.images)), desc, total=len(data.images)):
        if not data.boxes[i]:
            continue
        image = load_image(data.images[i])
        boxes, labels = clean_boxes(data.boxes[i], data.labels[i], *image.size, counts)
        if len(labels):
            yield i, image, boxes, labels


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---- region scores per mode: each yields ((k, C) scores, (k,) labels, (k,) image indices) ----
Scores = Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def crop_scores(ctx: EvalContext, cfg: RegionTaskConfig, stream: Stream, score: Callable) -> Scores:
    """``score((B, 3, S, S) crops) -> (B, C)`` over batches of crops (``mode=crop``)."""
    tf = eval_transform(ctx.image_size, ctx.mean, ctx.std, crop=False)
    fill = tuple(int(round(255 * v)) for v in ctx.mean)

    def crops() -> Iterator[tuple[torch.Tensor, int, int]]:
        for i, image, boxes, labels in stream:
            for box, y in zip(grow_boxes(boxes, cfg.margin).tolist(), labels.tolist()):
                yield tf(crop_region(image, box, cfg.square, fill)), y, i

    for chunk in _chunks(crops(), cfg.batch_size):
        images, labels, index = zip(*chunk)
        x = torch.stack(images).to(ctx.device)  # (B, 3, S, S)
        yield score(x).float().cpu(), torch.tensor(labels), torch.tensor(index)


def _image_chunks(ctx: EvalContext, cfg: RegionTaskConfig, stream: Stream) -> Iterator:
    """Batches of (squashed images (B, 3, S, S), boxes, labels, sizes, image indices)."""
    tf = eval_transform(cfg.image_size or ctx.image_size, ctx.mean, ctx.std, crop=False)
    for chunk in _chunks(stream, cfg.batch_size):
        x = torch.stack([tf(image) for _, image, _, _ in chunk]).to(ctx.device)
        sizes = [image.size for _, image, _, _ in chunk]
        index = torch.cat([torch.full((len(y),), i) for i, _, _, y in chunk])
        yield x, [b for _, _, b, _ in chunk], torch.cat([y for *_, y in chunk]), sizes, index


def image_digest(image: Image.Image) -> bytes:
    """A content key of an image (the same scene loaded by two tasks shares it)."""
    return hashlib.blake2b(image.tobytes(), digest_size=16, person=image.mode.encode()).digest()


def cached_dense(ctx: EvalContext, cfg: RegionTaskConfig, images: list[Image.Image]) -> list:
    """(D, h, w) dense features of each image, computed once per ``run_tasks`` call: kept on
    ``ctx`` (as the class-vector cache of ``finegrain.eval.zeroshot``; the method is in eval
    mode and unchanged) up to ``feature_cache_mb``, keyed by method, resolution and content,
    so every region task on the same images pools from the same maps."""
    size = cfg.image_size or ctx.image_size
    cache = ctx.__dict__.setdefault("_dense_feature_cache", {"bytes": 0, "maps": {}})
    keys = [(id(ctx.method), size, image_digest(im)) for im in images]
    maps = [cache["maps"].get(k) for k in keys]
    todo = [j for j, d in enumerate(maps) if d is None]
    if todo:
        tf = eval_transform(size, ctx.mean, ctx.std, crop=False)
        x = torch.stack([tf(images[j]) for j in todo]).to(ctx.device)  # (B, 3, S, S)
        dense = ctx.method.dense_features(x)  # (B, D, h, w)
        assert dense.dim() == 4, f"dense_features must be (B, D, h, w), got {tuple(dense.shape)}"
        for j, d in zip(todo, dense):
            maps[j] = d
            nbytes = d.numel() * d.element_size()
            if cache["bytes"] + nbytes <= cfg.feature_cache_mb * 2**20:
                cache["maps"][keys[j]] = d.cpu()
                cache["bytes"] += nbytes
    return maps


def roi_scores(
    ctx: EvalContext, cfg: RegionTaskConfig, stream: Stream, classes: torch.Tensor
) -> Scores:
    """``mode=roialign``: dense features once per image (``cached_dense``), pooled for every
    box of the image."""
    for chunk in _chunks(stream, cfg.batch_size):
        dense = torch.stack(
            [d.to(ctx.device) for d in cached_dense(ctx, cfg, [c[1] for c in chunk])]
        )
        sizes = [image.size for _, image, _, _ in chunk]
        grown = [clip_boxes(grow_boxes(b, cfg.margin), *s) for (_, _, b, _), s in zip(chunk, sizes)]
        pooled = pool_regions(dense, grown, sizes, cfg.roi_size, cfg.sampling_ratio)  # (K, D)
        labels = torch.cat([y for *_, y in chunk])
        index = torch.cat([torch.full((len(y),), i) for i, _, _, y in chunk])
        yield F.normalize(pooled.float(), dim=-1).cpu() @ classes.t(), labels, index


def query_scores(
    ctx: EvalContext, cfg: RegionTaskConfig, stream: Stream, classes: torch.Tensor, stats: Counter
) -> Scores:
    """``mode=regions, region_scoring=iou``: the query whose predicted box fits best."""
    m = ctx.method
    for x, boxes, labels, sizes, index in _image_chunks(ctx, cfg, stream):
        emb = F.normalize(m.region_embeddings(x).float(), dim=-1).cpu()  # (B, Q, D)
        pred = m.predict_boxes(x).float().cpu()  # (B, Q, 4) normalised xyxy
        picked = []
        for b, (gt, (width, height)) in enumerate(zip(boxes, sizes)):
            norm = gt / torch.tensor([width, height, width, height], dtype=gt.dtype)
            q, iou = match_boxes(norm, pred[b])
            picked.append(emb[b, q])  # (K_b, D)
            stats["iou_sum"] += float(iou.sum())
            stats["unmatched_regions"] += int((iou <= 0).sum())
        yield torch.cat(picked) @ classes.t(), labels, index


# ---- metrics and the task ---------------------------------------------------------------------
def region_metrics(
    top: torch.Tensor, labels: torch.Tensor, num_classes: int, frequencies: list[str] | None
) -> dict[str, float]:
    """acc1, acc5 (C > 5), mean per-class recall; per LVIS frequency group when given.
    top (K, min(5, C)) predicted classes best first, labels (K,)."""
    hit1 = (top[:, 0] == labels).double()
    hits = torch.bincount(labels, weights=hit1, minlength=num_classes)  # (C,)
    n = torch.bincount(labels, minlength=num_classes).double()

    def group(mask_c: torch.Tensor, suffix: str) -> dict[str, float]:
        rows = mask_c[labels]
        present = mask_c & (n > 0)
        if not rows.any():
            return {}
        return {
            f"acc1{suffix}": hit1[rows].mean().item(),
            f"mean_per_class_recall{suffix}": (hits[present] / n[present]).mean().item(),
        }

    out = group(torch.ones(num_classes, dtype=torch.bool), "")
    if num_classes > 5:
        out["acc5"] = (top[:, :5] == labels[:, None]).any(1).double().mean().item()
    for f in FREQUENCIES if frequencies else ():
        out.update(group(torch.tensor([g == f for g in frequencies]), f"_{f}"))
    return out


def _check(cfg: RegionTaskConfig, ctx: EvalContext) -> None:
    m, task = ctx.method, f"region/{cfg.dataset} with mode={cfg.mode}"
    if cfg.margin < 0:
        raise ValueError(f"margin must be >= 0 (a fraction of the box side), got {cfg.margin}")
    if cfg.roi_size < 1 or cfg.sampling_ratio < 0:
        raise ValueError(
            f"roi_size must be >= 1 and sampling_ratio >= 0, got {cfg.roi_size}, "
            f"{cfg.sampling_ratio}"
        )
    if cfg.mode == "roialign":
        require(m, "dense_features", task)
    if cfg.mode == "regions":
        require(m, "region_embeddings", task)
        if cfg.region_scoring == "iou" and "predict_boxes" not in m.capabilities():
            raise ValueError(
                f"method '{m.cfg.name}' has no predict_boxes, which region_scoring=iou needs; "
                "use region_scoring=released"
            )


def _scores(
    ctx: EvalContext, cfg: RegionTaskConfig, data: RegionData, stream: Stream, stats: Counter
) -> Scores:
    m, bs = ctx.method, cfg.batch_size
    if cfg.mode == "regions" and cfg.region_scoring == "released":
        desc = task_descriptions(cfg, data.classnames, data.descriptions)
        raw = [[d for d in desc[c] if d.strip()] for c in data.classnames] if desc else None
        raw = raw or [[c] for c in data.classnames]
        emb, owner = _prompt_embeddings(ctx, raw, bs, cfg.context_length)  # (P, D)

        def released(x: torch.Tensor) -> torch.Tensor:
            region = F.normalize(m.region_embeddings(x).float().cpu(), dim=-1)  # (B, Q, D)
            return released_region_scores(region, emb, owner, len(raw))

        return crop_scores(ctx, cfg, stream, released)
    prompts = prompts_for(cfg, data.classnames, data.descriptions)
    renorm = renormalize_classes(cfg, m)
    classes = class_embeddings(ctx, prompts, bs, cfg.context_length, renorm)  # (C, D)
    if cfg.mode == "crop":
        return crop_scores(
            ctx,
            cfg,
            stream,
            lambda x: F.normalize(m.encode_image(x).float().cpu(), dim=-1) @ classes.t(),
        )
    if cfg.mode == "roialign":
        return roi_scores(ctx, cfg, stream, classes)
    return query_scores(ctx, cfg, stream, classes, stats)


def protocol(
    cfg: RegionTaskConfig, ctx: EvalContext, data: RegionData, n_images: int, labels: torch.Tensor
) -> dict:
    """The settings and counts behind the numbers (Wave-3 protocol card)."""
    c = len(data.classnames)
    chance = {"acc1": 1 / c, "mean_per_class_recall": 1 / c}
    if c > 5:
        chance["acc5"] = 5 / c
    card = {
        "n_images": n_images,
        "n_regions": int(labels.numel()),
        "n_classes": c,
        "chance": chance,
        "annotation_file": data.source,
        "mode": cfg.mode,
        "margin": cfg.margin,
        "templates": cfg.templates,  # "default" = plain on the built-in scenes, else imagenet1k
        "n_templates": 0
        if cfg.templates == "cupl"
        else len(load_templates(cfg.templates, cfg.dataset)),
        "descriptions": cfg.descriptions,
        "class_vectors": "renormalized" if renormalize_classes(cfg, ctx.method) else "mean",
    }
    if cfg.mode == "crop" or (cfg.mode == "regions" and cfg.region_scoring == "released"):
        card.update(square=cfg.square, crop_size=ctx.image_size)
    else:
        card["image_size"] = cfg.image_size or ctx.image_size
    if cfg.mode == "roialign":
        card.update(roi_size=cfg.roi_size, sampling_ratio=cfg.sampling_ratio, aligned=True)
    if cfg.mode == "regions":
        card["region_scoring"] = cfg.region_scoring
    for f in FREQUENCIES if data.frequencies else ():
        in_group = torch.tensor([g == f for g in data.frequencies])[labels]
        card[f"n_regions_{f}"] = int(in_group.sum())
        chance.update({f"acc1_{f}": 1 / c, f"mean_per_class_recall_{f}": 1 / c})
    return card


@torch.no_grad()
def evaluate_regions(
    ctx: EvalContext, cfg: RegionTaskConfig, data: RegionData
) -> tuple[dict[str, float], dict]:
    """Classify every usable ground-truth box (module docstring); returns metrics and
    ``{"top": (K, k) predicted classes, "labels", "image_index", "protocol"}``."""
    _check(cfg, ctx)
    counts: Counter = Counter(skipped_box_outside=0, skipped_degenerate=0, clipped_boxes=0)
    counts.update(data.counts)
    stats: Counter = Counter()
    stream = usable_regions(ctx, data, counts, f"region/{cfg.mode}")
    k = min(5, len(data.classnames))
    tops, labels, index = [], [], []
    for scores, y, i in _scores(ctx, cfg, data, stream, stats):
        tops.append(scores.topk(k, dim=1).indices)  # keep (K, k), never (K, C): LVIS has 1203
        labels.append(y)
        index.append(i)
    if not labels:
        skipped = ", ".join(f"{n} {key}" for key, n in counts.items() if n)
        raise ValueError(
            f"region/{cfg.dataset}: no usable box among {data.num_boxes} ({skipped or 'none'})"
        )
    top, y, i = torch.cat(tops), torch.cat(labels).long(), torch.cat(index).long()
    metrics = region_metrics(top, y, len(data.classnames), data.frequencies)
    if cfg.mode == "regions" and cfg.region_scoring == "iou":
        metrics["matched_iou"] = stats["iou_sum"] / y.numel()
        metrics["unmatched_regions"] = float(stats["unmatched_regions"])
    metrics.update({key: float(n) for key, n in counts.items()})
    card = protocol(cfg, ctx, data, int(i.unique().numel()), y)
    card.update(dict(counts))
    return metrics, {"top": top, "labels": y, "image_index": i, "protocol": card}

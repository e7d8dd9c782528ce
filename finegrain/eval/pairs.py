"""Scoring chosen (visual query, text) pairs: the shared engine of the hard-negative
(``finegrain.eval.hardneg``) and compositionality (``finegrain.eval.compositional``) tasks.

A *query* is what the model looks at: a whole image, or one box of an image. Boxes are seen
through a ``region`` mode:
- ``crop``: the box grown by ``margin`` x its width/height on each side (clipped to the image),
  cut out and squashed to the model's square input (like RoIAlign, which also pools a box into
  a square grid); a crop hides the object's absolute size;
- ``image``: the whole image, centre-cropped as in every global evaluation (datasets with one
  object per image).
- ``roialign``: each distinct image is encoded once by the method's ``dense_features``
  (squashed to the square input, so a normalised box maps linearly onto the token grid) and
  every box (grown by ``margin``, clipped) is RoIAlign-pooled from that map (He et al. 2017;
  ``torchvision.ops.roi_align``, aligned, ``roi_size`` bins averaged), the region task's
  ``mode=roialign``; a whole-image query pools the whole map. The box keeps its context and
  its absolute size, and N boxes of one image cost one forward instead of N. Global scoring
  only (the pooled vector lives in the joint space; no text-conditioned pooling of it).

Scores: ``global`` = cosine of the global embeddings (every query and every distinct text
encoded once); ``conditioned`` = ``Method.score_features`` (FLAIR-like text-conditioned
pooling), evaluated only for the query chunks x the texts those queries need.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image

from finegrain.eval.common import (
    EvalContext,
    cat_features,
    chunked_scores,
    encode_texts,
    eval_transform,
    require,
    slice_features,
)
from finegrain.eval.containers import ImageItem, load_image

Box = tuple[float, float, float, float]  # normalised x0, y0, x1, y1 in [0, 1]


@dataclass(frozen=True)
class Query:
    """One visual input: ``images[image]`` (whole) or its ``box`` (normalised xyxy)."""

    image: int
    box: Box | None = None


def clip_box(box: Box) -> tuple[Box | None, bool]:
    """(box clipped to [0, 1]^2 or None when nothing of it lies inside, whether it was clipped)."""
    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in box)
    if x1 - x0 <= 1e-6 or y1 - y0 <= 1e-6:
        return None, True
    return (x0, y0, x1, y1), (x0, y0, x1, y1) != tuple(box)


def crop_box(image: Image.Image, box: Box, margin: float) -> Image.Image:
    """The pixels of ``box`` grown by ``margin`` x its size per side, clipped to the image."""
    w, h = image.size
    bw, bh = box[2] - box[0], box[3] - box[1]
    x0 = max(0.0, box[0] - margin * bw) * w
    y0 = max(0.0, box[1] - margin * bh) * h
    x1 = min(1.0, box[2] + margin * bw) * w
    y1 = min(1.0, box[3] + margin * bh) * h
    # floor/ceil (with float slack) so the crop holds every pixel the box touches; >= 1 pixel
    left, top = math.floor(x0 + 1e-6), math.floor(y0 + 1e-6)
    right = min(w, max(left + 1, math.ceil(x1 - 1e-6)))
    bottom = min(h, max(top + 1, math.ceil(y1 - 1e-6)))
    return image.crop((left, top, right, bottom))


def try_load(item: ImageItem) -> Image.Image | None:
    """The image, or None when it is missing or cannot be decoded (the caller counts it)."""
    try:
        return load_image(item)
    except (OSError, ValueError, SyntaxError):  # PIL's errors for a broken file
        return None


def query_batches(
    ctx: EvalContext,
    images: list[ImageItem],
    queries: list[Query],
    batch_size: int,
    margin: float,
    failed: set[int],
    desc: str = "regions",
) -> Iterator[torch.Tensor]:
    """(B, 3, S, S) batches of the queries' pixels on ``ctx.device``. An image that cannot be
    read adds its queries' indices to ``failed`` (a zero tensor stands in for them)."""
    whole = eval_transform(ctx.image_size, ctx.mean, ctx.std, crop=True)
    region = eval_transform(ctx.image_size, ctx.mean, ctx.std, crop=False)
    cache: tuple[int, Image.Image | None] = (-1, None)
    starts = range(0, len(queries), batch_size)
    for s in ctx.bar(starts, desc, total=len(starts)):
        out = []
        for qi in range(s, min(s + batch_size, len(queries))):
            q = queries[qi]
            if cache[0] != q.image:
                cache = (q.image, try_load(images[q.image]))
            img = cache[1]
            if img is None:
                failed.add(qi)
                out.append(torch.zeros(3, ctx.image_size, ctx.image_size))
            elif q.box is None:
                out.append(whole(img))
            else:
                out.append(region(crop_box(img, q.box, margin)))
        yield torch.stack(out).to(ctx.device)


def query_features(
    ctx: EvalContext,
    images: list[ImageItem],
    queries: list[Query],
    fn: Callable[[torch.Tensor], object],
    batch_size: int,
    margin: float,
    failed: set[int],
) -> object:
    """``fn`` (``encode_image`` or ``image_features_for_scoring``) over every query."""
    parts = [fn(b) for b in query_batches(ctx, images, queries, batch_size, margin, failed)]
    return cat_features(parts)


def roi_query_features(
    ctx: EvalContext,
    images: list[ImageItem],
    queries: list[Query],
    batch_size: int,
    margin: float,
    failed: set[int],
    roi_size: int = 7,
) -> torch.Tensor:
    """(Nq, D) RoIAlign means of ``dense_features``, one forward per distinct image."""
    from finegrain.eval.regions import clip_boxes, grow_boxes, pool_regions

    require(ctx.method, "dense_features", "region=roialign")
    by_image: dict[int, list[int]] = {}
    for qi, q in enumerate(queries):
        by_image.setdefault(q.image, []).append(qi)
    size = ctx.image_size
    tf = eval_transform(size, ctx.mean, ctx.std, crop=False)
    out: list[torch.Tensor | None] = [None] * len(queries)
    ids = list(by_image)
    starts = range(0, len(ids), batch_size)
    for s in ctx.bar(starts, "regions", total=len(starts)):
        chunk, pixels, boxes = ids[s : s + batch_size], [], []
        for i in chunk:
            img = try_load(images[i])
            if img is None:
                failed.update(by_image[i])
            pixels.append(tf(img) if img is not None else torch.zeros(3, size, size))
            b = [queries[qi].box or (0.0, 0.0, 1.0, 1.0) for qi in by_image[i]]
            boxes.append(clip_boxes(grow_boxes(torch.tensor(b, dtype=torch.float64), margin), 1, 1))
        dense = ctx.method.dense_features(torch.stack(pixels).to(ctx.device))  # (B, D, h, w)
        pooled = pool_regions(dense, boxes, [(1, 1)] * len(chunk), roi_size)  # (K, D)
        for qi, p in zip((qi for i in chunk for qi in by_image[i]), pooled.float().cpu()):
            out[qi] = p
    return torch.stack(out)  # type: ignore[arg-type]


@torch.no_grad()
def pair_scores(
    ctx: EvalContext,
    images: list[ImageItem],
    queries: list[Query],
    texts: list[str],
    pairs: torch.Tensor,
    *,
    scoring: str = "global",
    batch_size: int = 64,
    context_length: int = 0,
    margin: float = 0.0,
    budget_mb: int = 1024,
    task: str = "pairs",
    boxes: Literal["crop", "roialign"] = "crop",
    roi_size: int = 7,
) -> tuple[torch.Tensor, set[int]]:
    """(P,) float32 scores of ``pairs`` (P, 2) = (query index, text index), and the set of
    queries whose image could not be read (their scores are meaningless; callers drop them).
    ``boxes``: how a box query is seen, ``crop`` or ``roialign`` (module docstring)."""
    m, failed = ctx.method, set()
    if boxes == "roialign" and scoring != "global":
        raise ValueError(f"{task}: region=roialign scores globally only, not scoring={scoring}")
    if scoring == "global":
        if boxes == "roialign":
            q = roi_query_features(ctx, images, queries, batch_size, margin, failed, roi_size)
        else:
            q = query_features(ctx, images, queries, m.encode_image, batch_size, margin, failed)
        t = encode_texts(ctx, texts, m.encode_text, batch_size, context_length)
        q = F.normalize(q.float().cpu(), dim=-1)  # (Nq, D)
        t = F.normalize(t.float().cpu(), dim=-1)  # (Nt, D)
        return (q[pairs[:, 0]] * t[pairs[:, 1]]).sum(-1), failed  # (P,)
    require(m, "score_features", f"{task} with scoring={scoring}")
    qf = query_features(
        ctx, images, queries, m.image_features_for_scoring, batch_size, margin, failed
    )
    tf = encode_texts(ctx, texts, m.text_features_for_scoring, batch_size, context_length)
    out = torch.empty(pairs.shape[0])
    quiet = dataclasses.replace(ctx, progress=False)
    order = torch.argsort(pairs[:, 0], stable=True)
    chunk = max(1, batch_size)
    for s in ctx.bar(range(0, len(queries), chunk), "scoring", total=-(-len(queries) // chunk)):
        sel = order[(pairs[order, 0] >= s) & (pairs[order, 0] < s + chunk)]  # pairs of the chunk
        if sel.numel() == 0:
            continue
        cols, inv = pairs[sel, 1].unique(return_inverse=True)  # the texts this chunk needs
        qs = slice_features(qf, slice(s, s + chunk))
        sub = chunked_scores(quiet, qs, slice_features(tf, cols), budget_mb)
        out[sel] = sub[pairs[sel, 0] - s, inv]
    return out, failed


def usable_negatives(positive: str, negatives: list[str], skipped: Counter) -> list[int] | None:
    """Indices of the negatives worth scoring (non-empty, not the positive itself), counting
    each dropped negative in ``skipped`` (``empty_negative``, ``negative_same_as_positive``);
    None (counted as ``empty_caption`` / ``no_negatives``) when the item has nothing to score."""
    if not positive.strip():
        skipped["empty_caption"] += 1
        return None
    keep = [j for j, n in enumerate(negatives) if n.strip() and n != positive]
    skipped["empty_negative"] += sum(not n.strip() for n in negatives)
    skipped["negative_same_as_positive"] += sum(n == positive for n in negatives)
    if not keep:
        skipped["no_negatives"] += 1
        return None
    return keep


def text_index(texts: list[str]) -> tuple[list[str], dict[str, int]]:
    """Distinct texts in first-seen order and their index (each is encoded once)."""
    index: dict[str, int] = {}
    for t in texts:
        index.setdefault(t, len(index))
    return list(index), index


def count_summary(values: list[int]) -> int | dict[str, float]:
    """A protocol count: the value when all agree, else its min, max and mean."""
    if len(set(values)) == 1:
        return values[0]
    return {"min": min(values), "max": max(values), "mean": sum(values) / max(1, len(values))}

"""Attribute hard negatives: does the model prefer a box's true description over the same
description with attributes changed? (FG-OVD, Bianchi et al., "The devil is in the fine-grained
details", CVPR 2024, arXiv 2311.17518.)

Each box (or single-object image) comes with its positive description and N negatives, each
changing one or more attributes (colour, pattern, size, shape; FG-OVD: colour, material,
pattern, transparency). The model scores the box region (``region``: a crop of the box with a
margin, the box RoIAlign-pooled from the whole image's dense features, or the whole image when
the dataset has one object per image; see ``finegrain.eval.pairs``) against the N + 1 texts. Metrics:
- ``acc1``: the positive scores strictly above all N negatives (ties count as errors, as the
  rank in FG-OVD's ``evaluation/ranks.py`` counts every score >= the positive's);
- ``mean_rank``: 1 + the number of negatives scoring >= the positive (FG-OVD's position);
- ``acc1_diff<k>``: top-1 among the positive and only its negatives that differ in exactly k
  attributes (FG-OVD's difficulty benchmarks: Hard = 1, Medium = 2, Easy = 3 attributes);
- ``acc1_<kind>``: top-1 among the positive and only its negatives that change exactly that one
  attribute kind (FG-OVD's Color / Material / Pattern / Transparency benchmarks).
Chance of a top-1 among n + 1 is 1 / (n + 1), averaged over the boxes that enter the metric.
Bad input (empty negative list, box outside the image, missing or unreadable image, empty
positive) is skipped and counted as ``skipped_<reason>``, in the metrics and the protocol; an
empty negative or one equal to the positive is dropped and counted per negative.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from finegrain.eval.common import EvalContext
from finegrain.eval.config import HardNegTaskConfig
from finegrain.eval.containers import ImageItem
from finegrain.eval.pairs import (
    Box,
    Query,
    clip_box,
    count_summary,
    pair_scores,
    text_index,
    usable_negatives,
)

# every count is of boxes (an image missing from disk counts each of its boxes), except:
SKIP_REASONS = (
    "missing_image",
    "unreadable_image",
    "box_outside",
    "no_negatives",
    "few_negatives",
    "empty_caption",
    "negative_same_as_positive",  # counted per negative: the negative is dropped, not the box
    "empty_negative",  # counted per negative, as above
    "unknown_negative_category",  # FG-OVD: a neg_category_id without a category, per negative
    "bad_annotation",  # FG-OVD: unknown positive category or no bbox
    "bad_line",  # JSONL: a line that is not a JSON object with an image
)


@dataclass
class HardNegItem:
    """One box: ``images[image]``'s ``box`` (normalised xyxy; None = the whole image), its
    positive text and negatives; per negative (when known) how many attributes differ
    (``diffs``) and which ones (``kinds``: sorted names joined by '+', e.g. 'color+size')."""

    image: int
    box: Box | None
    positive: str
    negatives: list[str]
    diffs: list[int] | None = None
    kinds: list[str] | None = None


@dataclass
class HardNegData:
    images: list[ImageItem]
    items: list[HardNegItem]
    skipped: dict[str, int] = field(default_factory=dict)  # counted by the loader
    single_object: bool = False  # one object per image: region=auto scores whole images
    info: dict = field(default_factory=dict)  # protocol fields from the loader (benchmark, ...)
    num_negatives: int = 0  # the data's own protocol (FG-OVD: per benchmark file); 0 = all


def _subset(item: HardNegItem, keep: list[int]) -> HardNegItem:
    pick = lambda xs: [xs[j] for j in keep] if xs is not None else None  # noqa: E731
    negs = [item.negatives[j] for j in keep]
    return HardNegItem(
        item.image, item.box, item.positive, negs, pick(item.diffs), pick(item.kinds)
    )


def prepare_items(
    items: list[HardNegItem], num_negatives: int
) -> tuple[list[HardNegItem], Counter, int]:
    """The scorable items (boxes clipped to the image, negatives cut to the first
    ``num_negatives`` when > 0), the skip counts and the number of clipped boxes."""
    skipped: Counter = Counter()
    kept, clipped = [], 0
    for it in items:
        keep = usable_negatives(it.positive, it.negatives, skipped)
        if keep is None:
            continue
        if num_negatives > 0:
            if len(keep) < num_negatives:
                skipped["few_negatives"] += 1
                continue
            keep = keep[:num_negatives]
        box = it.box
        if box is not None:
            box, was_clipped = clip_box(box)
            if box is None:
                skipped["box_outside"] += 1
                continue
            clipped += was_clipped
        new = _subset(it, keep)
        new.box = box
        kept.append(new)
    return kept, skipped, clipped


def _top1(pos: torch.Tensor, negs: torch.Tensor) -> float:
    return float(bool((negs < pos).all()))


def hardneg_metrics(
    scores: list[torch.Tensor], items: list[HardNegItem]
) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, chance) from per-item scores ``scores[i]`` (1 + N_i,) = (positive, negatives)."""
    hits: dict[str, list[float]] = {"acc1": []}
    chance: dict[str, list[float]] = {"acc1": []}
    ranks = []
    for s, it in zip(scores, items):
        pos, negs = s[0], s[1:]
        ranks.append(1 + int((negs >= pos).sum()))
        hits["acc1"].append(_top1(pos, negs))
        chance["acc1"].append(1 / (1 + len(negs)))
        groups: dict[str, list[int]] = {}
        for j in range(len(negs)):
            if it.diffs is not None:
                groups.setdefault(f"acc1_diff{it.diffs[j]}", []).append(j)
            if it.kinds is not None and "+" not in it.kinds[j]:
                groups.setdefault(f"acc1_{it.kinds[j]}", []).append(j)
        for name, js in groups.items():
            hits.setdefault(name, []).append(_top1(pos, negs[js]))
            chance.setdefault(name, []).append(1 / (1 + len(js)))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    metrics = {k: mean(v) for k, v in sorted(hits.items())}
    metrics["mean_rank"] = mean(ranks)
    chance_out = {k: mean(v) for k, v in sorted(chance.items())}
    chance_out["mean_rank"] = mean([1 + (len(s) - 1) / 2 for s in scores])
    return metrics, chance_out


def resolve_region(cfg: HardNegTaskConfig, data: HardNegData) -> str:
    """``auto``: the whole image for one-object-per-image data (or items without boxes)."""
    if cfg.region != "auto":
        return cfg.region
    no_boxes = all(it.box is None for it in data.items)
    return "image" if data.single_object or no_boxes else "crop"


def _queries(items: list[HardNegItem], region: str) -> tuple[list[Query], list[int]]:
    """Distinct queries and each item's query index (whole images are encoded once)."""
    index: dict[Query, int] = {}
    owner = []
    for it in items:
        q = Query(it.image, it.box if region in ("crop", "roialign") else None)
        owner.append(index.setdefault(q, len(index)))
    return list(index), owner


def evaluate_hardneg(
    ctx: EvalContext, cfg: HardNegTaskConfig, data: HardNegData
) -> tuple[dict[str, float], dict]:
    if cfg.crop_margin < 0 or cfg.num_negatives < -1:
        raise ValueError(
            f"hardneg: crop_margin must be >= 0 and num_negatives >= -1 (-1 = the data's "
            f"protocol, 0 = all), got {cfg.crop_margin} and {cfg.num_negatives}"
        )
    n_neg = data.num_negatives if cfg.num_negatives < 0 else cfg.num_negatives
    items, skipped, clipped = prepare_items(data.items, n_neg)
    skipped.update(data.skipped)
    if not items:
        hint = f" (num_negatives={n_neg}; 0 = all)" if skipped["few_negatives"] else ""
        raise ValueError(
            f"hardneg/{cfg.dataset}: no box left to score; skipped: {dict(skipped) or 'none'}"
            + hint
        )
    region = resolve_region(cfg, data)
    queries, owner = _queries(items, region)
    texts, tindex = text_index([t for it in items for t in [it.positive, *it.negatives]])
    pairs = torch.tensor(
        [(owner[i], tindex[t]) for i, it in enumerate(items) for t in [it.positive, *it.negatives]]
    ).reshape(-1, 2)
    flat, failed = pair_scores(
        ctx,
        data.images,
        queries,
        texts,
        pairs,
        scoring=cfg.scoring,
        batch_size=cfg.batch_size,
        context_length=cfg.context_length,
        margin=cfg.crop_margin,
        budget_mb=cfg.memory_budget_mb,
        task=f"hardneg/{cfg.dataset}",
        boxes="roialign" if region == "roialign" else "crop",
        roi_size=cfg.roi_size,
    )
    per_item = list(flat.split([1 + len(it.negatives) for it in items]))
    ok = [i for i in range(len(items)) if owner[i] not in failed]
    skipped["unreadable_image"] += len(items) - len(ok)
    if not ok:
        raise ValueError(f"hardneg/{cfg.dataset}: no image could be read")
    items, per_item = [items[i] for i in ok], [per_item[i] for i in ok]
    metrics, chance = hardneg_metrics(per_item, items)
    reasons = dict.fromkeys([*SKIP_REASONS, *sorted(skipped)])  # loaders may add their own
    counts = {f"skipped_{r}": int(skipped[r]) for r in reasons}
    metrics.update({k: float(v) for k, v in counts.items() if v})
    protocol = _protocol(cfg, data, items, region, chance, counts, clipped, len(texts), n_neg)
    return metrics, {"scores": per_item, "items": items, "protocol": protocol}


def _protocol(cfg, data, items, region, chance, counts, clipped, n_texts, n_neg) -> dict:
    kinds = sorted({a for it in items if it.kinds for k in it.kinds for a in k.split("+")})
    diffs = sorted({d for it in items if it.diffs for d in it.diffs})
    return {
        "n_images": len({it.image for it in items}),
        "n_boxes": len(items),
        "n_distinct_texts": n_texts,
        "n_negatives": count_summary([len(it.negatives) for it in items]),
        "num_negatives": n_neg,  # 0 = all
        "num_negatives_from": "the data's protocol" if cfg.num_negatives < 0 else "option",
        "chance": chance,
        "region": region,
        **({"crop_margin": cfg.crop_margin} if region in ("crop", "roialign") else {}),
        **({"roi_size": cfg.roi_size} if region == "roialign" else {}),
        "scoring": cfg.scoring,
        "negatives": ",".join(kinds),
        "difficulty_levels": diffs,
        "ties": "error (FG-OVD rank: negatives scoring >= the positive)",
        "clipped_boxes": clipped,
        **counts,
        **data.info,
    }

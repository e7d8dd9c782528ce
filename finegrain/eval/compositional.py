"""Compositionality: does the model bind attributes to the right objects and read relations
and word order? Two protocols on one scoring engine (``finegrain.eval.pairs``, whole images):

**Caption vs negative** (SugarCrepe, Hsieh et al., NeurIPS 2023 Datasets & Benchmarks,
arXiv 2306.14610): an image, its caption and negative captions of a kind (``swap_att``,
``swap_obj``, ``replace_att``, ``replace_obj``, ``replace_rel``, ``add_att``, ``add_obj``; the
built-in scenes: swap/replace attribute, replace object, replace relation, and ``swap_obj`` =
reorder the two object phrases). A pair is right when the caption scores strictly above the
negative (SugarCrepe's ``main_eval.py``: ``pos_score > neg_score``). ``acc_<kind>`` = the
fraction right among that kind's pairs (chance 0.5); ``acc`` = the mean over kinds.

**Winoground-style 2x2 groups** (Thrush et al., CVPR 2022, Sec. 3.3): images I0, I1 and
captions C0, C1 where Ck describes Ik; with s(C, I) the score,
    text score:  s(C0, I0) > s(C1, I0) and s(C1, I1) > s(C0, I1)   (chance 1/4)
    image score: s(C0, I0) > s(C0, I1) and s(C1, I1) > s(C1, I0)   (chance 1/4)
    group score: both                                               (chance 1/6)
reported overall (``text_score``, ``image_score``, ``group_score``) and per tag
(``text_score_<tag>``...: Winoground's ``collapsed_tag``, the built-in groups' kind).
Ties are errors in both protocols. Bad input (missing or unreadable image, no negative, empty
caption) is skipped and counted as ``skipped_<reason>``; an empty negative or one equal to the
caption is dropped and counted per negative.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from finegrain.eval.common import EvalContext
from finegrain.eval.config import CompositionalTaskConfig
from finegrain.eval.containers import ImageItem
from finegrain.eval.pairs import Query, count_summary, pair_scores, text_index, usable_negatives

SKIP_REASONS = (
    "missing_image",
    "unreadable_image",
    "no_negatives",
    "empty_caption",
    "negative_same_as_positive",  # counted per negative: the negative is dropped, not the item
    "empty_negative",  # counted per negative, as above
)
WINOGROUND_CHANCE = {"text_score": 0.25, "image_score": 0.25, "group_score": 1 / 6}


@dataclass
class CompositionalItem:
    """``images[image]`` with its ``positive`` caption and ``negatives[j]`` of kind ``kinds[j]``."""

    image: int
    positive: str
    negatives: list[str]
    kinds: list[str]


@dataclass
class WinogroundGroup:
    """Two images and two captions; ``captions[k]`` describes ``images[k]``."""

    images: tuple[int, int]
    captions: tuple[str, str]
    tag: str = ""


@dataclass
class CompositionalData:
    images: list[ImageItem]
    items: list[CompositionalItem] = field(default_factory=list)
    groups: list[WinogroundGroup] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def metric_name(tag: str) -> str:
    """'Both' -> 'both', 'swap att' -> 'swap_att' (metric-key safe)."""
    return re.sub(r"[^a-z0-9]+", "_", tag.lower()).strip("_")


def pair_accuracy(
    pos: torch.Tensor, neg: torch.Tensor, kinds: list[str]
) -> tuple[dict[str, float], dict[str, int]]:
    """``acc_<kind>`` over pairs (pos[p] vs neg[p], strictly greater) and ``acc`` = the mean
    over kinds; also the number of pairs per kind."""
    right = (pos > neg).float()  # (P,)
    out, counts = {}, {}
    for k in sorted(set(kinds)):
        sel = torch.tensor([x == k for x in kinds])
        out[f"acc_{metric_name(k)}"] = right[sel].mean().item()
        counts[k] = int(sel.sum())
    out["acc"] = sum(out.values()) / len(out)
    return out, counts


def winoground_scores(s: torch.Tensor, tags: list[str] | None = None) -> dict[str, float]:
    """Text, image and group scores of (G, 2, 2) scores ``s[g, c, i]`` = s(caption c, image i),
    overall and per tag (Winoground, Thrush et al. 2022, Sec. 3.3)."""
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])  # (G,)
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])  # (G,)
    group = text & image
    out = {}
    subsets = [("", torch.ones_like(text))]
    if tags and len(set(tags)) > 1:
        subsets += [(f"_{metric_name(t)}", torch.tensor([x == t for x in tags])) for t in set(tags)]
    for suffix, sel in sorted(subsets, key=lambda x: x[0]):
        for name, ok in (("text_score", text), ("image_score", image), ("group_score", group)):
            out[f"{name}{suffix}"] = ok[sel].float().mean().item()
    return out


def prepare_items(items: list[CompositionalItem]) -> tuple[list[CompositionalItem], Counter]:
    skipped: Counter = Counter()
    kept = []
    for it in items:
        keep = usable_negatives(it.positive, it.negatives, skipped)
        if keep is None:
            continue
        negs, kinds = [it.negatives[j] for j in keep], [it.kinds[j] for j in keep]
        kept.append(CompositionalItem(it.image, it.positive, negs, kinds))
    return kept, skipped


def _score(
    ctx: EvalContext,
    cfg: CompositionalTaskConfig,
    data: CompositionalData,
    items: list[CompositionalItem],
    groups: list[WinogroundGroup],
) -> tuple[torch.Tensor, set[int], int, int]:
    """(P,) scores of every pair: items' caption + negatives in order, then each group's
    [caption][image]; the images that could not be read; the number of images and texts."""
    pairs = [(it.image, t) for it in items for t in [it.positive, *it.negatives]]
    for g in groups:
        pairs += [(i, c) for c in g.captions for i in g.images]
    texts, tindex = text_index([t for _, t in pairs])
    used = sorted({i for i, _ in pairs})
    qindex = {i: q for q, i in enumerate(used)}
    ptensor = torch.tensor([(qindex[i], tindex[t]) for i, t in pairs]).reshape(-1, 2)
    flat, failed = pair_scores(
        ctx,
        data.images,
        [Query(i) for i in used],
        texts,
        ptensor,
        scoring=cfg.scoring,
        batch_size=cfg.batch_size,
        context_length=cfg.context_length,
        budget_mb=cfg.memory_budget_mb,
        task=f"compositional/{cfg.dataset}",
    )
    return flat, {used[q] for q in failed}, len(used) - len(failed), len(texts)


def _group_counts(groups: list[WinogroundGroup]) -> dict:
    """``n_groups`` and, where scores are reported per tag, ``n_groups_per_tag`` keyed by the
    metrics' suffix (``text_score_object`` -> ``object``), for the report's N column."""
    out: dict = {"n_groups": len(groups)}
    tags = Counter(metric_name(g.tag) for g in groups)
    if len(tags) > 1:
        out["n_groups_per_tag"] = dict(sorted(tags.items()))
    return out


def evaluate_compositional(
    ctx: EvalContext, cfg: CompositionalTaskConfig, data: CompositionalData
) -> tuple[dict[str, float], dict]:
    items, skipped = prepare_items(data.items)
    groups = [g for g in data.groups if all(c.strip() for c in g.captions)]
    skipped["empty_caption"] += len(data.groups) - len(groups)
    skipped.update(data.skipped)
    if not items and not groups:
        raise ValueError(
            f"compositional/{cfg.dataset}: nothing left to score; "
            f"skipped: {dict(skipped) or 'none'}"
        )
    flat, bad, n_images, n_texts = _score(ctx, cfg, data, items, groups)
    n_item = sum(1 + len(it.negatives) for it in items)
    per_item = list(flat[:n_item].split([1 + len(it.negatives) for it in items]))
    ok = [k for k, it in enumerate(items) if it.image not in bad]
    gok = [k for k, g in enumerate(groups) if not set(g.images) & bad]
    skipped["unreadable_image"] += len(items) - len(ok) + len(groups) - len(gok)
    metrics, chance, counts = {}, {}, {}
    if ok:
        pos = torch.cat([per_item[k][0].expand(len(items[k].negatives)) for k in ok])
        neg = torch.cat([per_item[k][1:] for k in ok])
        metrics, counts = pair_accuracy(pos, neg, [x for k in ok for x in items[k].kinds])
        chance = dict.fromkeys(metrics, 0.5)
    if gok:
        s = flat[n_item:].reshape(-1, 2, 2)[gok]  # (G, caption, image)
        wino = winoground_scores(s, [groups[k].tag for k in gok])
        metrics.update(wino)
        chance.update({k: WINOGROUND_CHANCE[k.split("_score")[0] + "_score"] for k in wino})
    reasons = dict.fromkeys([*SKIP_REASONS, *sorted(skipped)])
    skips = {f"skipped_{r}": int(skipped[r]) for r in reasons}
    metrics.update({k: float(v) for k, v in skips.items() if v})
    kept_items, kept_groups = [items[k] for k in ok], [groups[k] for k in gok]
    pair_fields = {
        "n_items": len(kept_items),
        "n_pairs": sum(counts.values()),
        "n_pairs_per_kind": counts,
        "n_negatives": count_summary([len(it.negatives) for it in kept_items] or [0]),
        "negatives": ",".join(sorted(counts)),
    }
    protocol = {
        "n_images": n_images,
        **(pair_fields if kept_items else {}),
        **(_group_counts(kept_groups) if kept_groups else {}),
        "n_distinct_texts": n_texts,
        "chance": chance,
        "scoring": cfg.scoring,
        "ties": "error (caption must score strictly higher)",
        **skips,
        **data.info,
    }
    # every scored (image, text) pair: items' caption + negatives in order, then groups' [c][i]
    art = {"items": kept_items, "groups": kept_groups, "pair_scores": flat, "protocol": protocol}
    return metrics, art

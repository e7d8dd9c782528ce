"""The protocol card of every evaluation number: what was evaluated and how.

Fine-grained results are hard to compare because the settings behind them are rarely written
down (truncation length, resolution, templates, dense variant, split). ``protocol_card`` records,
per task: the dataset, split and variant, how many images and texts were scored, the input
resolution, the text context length and truncation policy, every option of the task config
(templates, descriptions, scoring, dense variant...), the checkpoint step and seed when known,
and the chance level of each metric. Evaluate functions add what only they know through
``art["protocol"]`` (e.g. ``{"n_regions": 812, "chance": {"acc1": 0.07}}``); those entries win.

Chance levels here are exact expectations under a uniform random scorer:
classification ``acc@k = min(k, C) / C`` and per-class recall ``1 / C``; text->image retrieval
``R@k = min(k, N_i) / N_i``; image->text retrieval with ``m`` correct among ``N_t`` texts
``R@k = 1 - C(N_t - m, k) / C(N_t, k)`` (averaged over images); segmentation (zero-shot and
linear probe) from the expected confusion matrix of uniform labels
(``finegrain.eval.segmentation.chance_metrics``).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

import numpy as np

from finegrain.eval.containers import (
    ClassificationData,
    RetrievalData,
    SegmentationData,
)


def classification_chance(num_classes: int) -> dict[str, float]:
    c = max(1, num_classes)
    return {"acc1": 1 / c, "acc5": min(5, c) / c, "mean_per_class_recall": 1 / c}


def _hit_chance(n: int, m: int, k: int) -> float:
    """P(at least one of ``m`` correct items among ``k`` drawn without replacement from ``n``)."""
    if k >= n or m <= 0:
        return float(m > 0)
    if n - m < k:
        return 1.0
    log_miss = (
        math.lgamma(n - m + 1)
        - math.lgamma(n - m - k + 1)
        - math.lgamma(n + 1)
        + math.lgamma(n - k + 1)
    )
    return 1.0 - math.exp(log_miss)


def retrieval_chance(num_images: int, text_to_image: list[int], ks: tuple[int, ...] = (1, 5, 10)):
    n_t = len(text_to_image)
    per_image = Counter(text_to_image)
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = min(k, num_images) / max(1, num_images)
        hits = [_hit_chance(n_t, per_image.get(i, 0), k) for i in range(num_images)]
        out[f"text_retrieval_recall@{k}"] = float(np.mean(hits)) if hits else 0.0
    return out


def data_counts(data: Any, cfg: Any = None) -> dict[str, Any]:
    """Counts and chance levels from the loaded data of the core kinds (classification,
    retrieval, zero-shot segmentation, linear-probe segmentation, grouping)."""
    out: dict[str, Any] = {}
    test = getattr(data, "test", None)
    if isinstance(test, SegmentationData):  # linear probe (chance: from its confusion)
        train = getattr(data, "train", None)
        out["n_train_images"] = len(train.images) if train is not None else 0
        out["n_classes"] = len(test.classnames)
        out["n_images"] = len(test.images)
        return out
    images = getattr(data, "images", None)
    if images is not None:
        out["n_images"] = len(images)
    if isinstance(data, ClassificationData):
        out["n_classes"] = len(data.classnames)
        out["chance"] = classification_chance(len(data.classnames))
    elif isinstance(data, RetrievalData):
        out["n_texts"] = len(data.texts)
        out["chance"] = retrieval_chance(len(data.images), list(data.text_to_image))
    elif isinstance(data, SegmentationData):  # chance: from the task's confusion
        out["n_classes"] = len(data.classnames)
    return out


def _context(method: Any, cfg: Any) -> dict[str, Any]:
    tower = method.towers().get("text")
    tok = getattr(tower, "tokenizer", None)
    native = int(getattr(tok, "context_length", 0) or 0)
    asked = int(getattr(cfg, "context_length", 0) or 0)
    length = asked or native
    return {
        "context_length": length or None,
        "truncation": f"truncate to {length} tokens" if length else "the method's own",
    }


def protocol_card(
    ctx: Any, cfg: Any, data: Any, art: dict | None, run_info: dict | None = None
) -> dict[str, Any]:
    """The protocol of one task's numbers (JSON-able); ``art["protocol"]`` entries win."""
    settings = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("task", "dataset", "split", "variant", "path", "name", "num_examples")
    }
    size = int(getattr(cfg, "image_size", 0) or 0) or ctx.image_size
    card: dict[str, Any] = {
        "task": cfg.task,
        "dataset": cfg.dataset,
        "split": cfg.split,
        "variant": cfg.variant,
        "path": cfg.path or ("built-in" if cfg.dataset == "synthetic" else ""),
        "resolution": size,
        **_context(ctx.method, cfg),
        "settings": settings,
        **data_counts(data, cfg),
        **(run_info or {}),
    }
    extra = dict((art or {}).get("protocol", {}))
    chance = {**card.get("chance", {}), **extra.pop("chance", {})}
    card.update(extra)
    card["chance"] = chance
    return card

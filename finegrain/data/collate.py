"""Collates shared by the contrastive methods: image stacking, caption picking, tokenising.

All randomness derives from the sample seed, one stream per stage
(``sample_rng(sample["seed"], "caption")``, docs/CONTRACTS.md), never the global RNG, so a batch
is reproducible with any number of workers and after resume.

Counts that are not per-sample features (samples skipped, regions kept, ...) go into
``batch["stats"]: dict[str, float]``; the trainer sums them over micro-batches and logs them
(``stats/<name>`` in TensorBoard, totals in summary.json).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from finegrain.data.schema import sample_rng


def stack_images(samples: Sequence[dict[str, Any] | torch.Tensor]) -> torch.Tensor:
    """(B, 3, H, W) from schema samples (or image tensors); every image must have one size."""
    images = [s["image"] if isinstance(s, dict) else s for s in samples]
    if not images:
        raise ValueError("cannot collate an empty batch")
    shapes = sorted({tuple(im.shape) for im in images})
    if len(shapes) != 1:
        raise ValueError(f"images in a batch must share one size, got shapes {shapes}; "
                         "set data.image_size so the transform resizes them")  # fmt: skip
    return torch.stack(images)


def stack_views(samples: Sequence[dict[str, Any]]) -> torch.Tensor | None:
    """(B, V, 3, H, W) from the ``views`` of schema samples made by a multi-view transform;
    None when the samples carry no views. Every sample needs the same number of views and
    views at one index share a size (views of different sizes: stack per index instead)."""
    if not samples or "views" not in samples[0]:
        return None
    counts = {len(s.get("views") or []) for s in samples}
    if len(counts) != 1:
        raise ValueError(f"samples in a batch must carry the same number of views, got {counts}")
    shapes = {tuple(v.shape) for s in samples for v in s["views"]}
    if len(shapes) != 1:
        raise ValueError(f"views of different sizes {sorted(shapes)} cannot be stacked into "
                         "(B, V, 3, H, W); stack them per view index")  # fmt: skip
    return torch.stack([torch.stack(list(s["views"])) for s in samples])


def add_stats(batch: dict[str, Any], **counts: float) -> dict[str, Any]:
    """Add ``counts`` to ``batch["stats"]`` (summed when a key is already there)."""
    stats = batch.setdefault("stats", {})
    for k, v in counts.items():
        stats[k] = stats.get(k, 0.0) + float(v)
    return batch


def caption_candidates(sample: dict[str, Any]) -> list[str]:
    """Non-empty captions of a sample: ``[caption] + captions``; the long caption when both
    are empty (so detailed-caption-only data still trains)."""
    pool = [sample.get("caption", "")] + list(sample.get("captions") or [])
    out = [c.strip() for c in pool if isinstance(c, str) and c.strip()]
    if not out and isinstance(sample.get("long_caption"), str) and sample["long_caption"].strip():
        out = [sample["long_caption"].strip()]
    return out


def pick_captions(candidates: list[str], k: int, rng: random.Random | None) -> list[str]:
    """``k`` captions from ``candidates``: a random draw without replacement (then with
    replacement once all are used) when ``rng`` is given, else the first ``k`` cyclically."""
    assert candidates and k >= 1, "need at least one candidate and k >= 1"
    if rng is None:
        return [candidates[i % len(candidates)] for i in range(k)]
    if len(candidates) >= k:
        return rng.sample(candidates, k)
    return rng.sample(candidates, len(candidates)) + rng.choices(candidates, k=k - len(candidates))


class ContrastiveCollate:
    """Picklable collate: schema samples -> ``image`` (B, 3, H, W), ``text`` (B, L) (or ``texts``
    (B, K, L) when ``num_captions > 1``), ``labels`` (B,) when samples carry a label.

    Training picks captions at random (seeded per sample); evaluation (``train=False``) takes
    the first ones. Samples without any caption are dropped and counted in
    ``batch["stats"]["skipped_samples"]``. Samples with extra views (``MultiViewTransform``)
    also give ``views`` (B, V, 3, H, W).
    """

    def __init__(
        self,
        tokenizer: Callable[[list[str]], torch.Tensor],
        num_captions: int = 1,
        train: bool = True,
    ) -> None:
        if num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {num_captions}")
        self.tokenizer, self.num_captions, self.train = tokenizer, num_captions, train

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        kept, captions = [], []
        for s in samples:
            cands = caption_candidates(s)
            if not cands:
                continue
            rng = sample_rng(s.get("seed", 0), "caption") if self.train else None
            captions += pick_captions(cands, self.num_captions, rng)
            kept.append(s)
        if not kept:
            raise ValueError(f"none of the {len(samples)} samples has a non-empty caption "
                             "(keys caption, captions, long_caption)")  # fmt: skip
        ids = self.tokenizer(captions)  # (B*K, L)
        batch: dict[str, Any] = {"image": stack_images(kept)}
        if self.num_captions == 1:
            batch["text"] = ids
        else:
            batch["texts"] = ids.view(len(kept), self.num_captions, -1)  # (B, K, L)
        if any("label" in s for s in kept):
            batch["labels"] = torch.tensor(
                [int(s.get("label", -1)) for s in kept], dtype=torch.long
            )
        views = stack_views(kept)
        if views is not None:
            batch["views"] = views  # (B, V, 3, H, W)
        return add_stats(batch, skipped_samples=len(samples) - len(kept))

"""Collates shared by the contrastive methods: image stacking, caption picking, tokenising.

All randomness derives from ``random.Random(sample["seed"])`` (docs/CONTRACTS.md), never the
global RNG, so a batch is reproducible with any number of workers and after resume.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch


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
    the first ones. Samples without any caption are dropped and counted in ``skipped_samples``.
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
            rng = random.Random(s.get("seed", 0)) if self.train else None
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
        batch["skipped_samples"] = len(samples) - len(kept)
        return batch

"""Worst-group accuracy on the spurious-correlation scenes (``finegrain.data.synthetic_spurious``):
the accuracy of the group (class x background tone) where a method does worst, the measure of
Waterbirds (Sagawa et al. 2020) that CLIPpy's robustness analysis reports (Ranasinghe et al.,
ICCV 2023). With balanced groups the average accuracy (``acc1``) is the mean of the group
accuracies."""

from __future__ import annotations

from typing import Any

import torch

WORST = "worst_group_acc"


def group_accuracies(correct: torch.Tensor, groups: torch.Tensor, idx: torch.Tensor | None = None
                     ) -> torch.Tensor:  # fmt: skip
    """(G,) mean of ``correct`` per group over the images ``idx`` (a resample, with repeats;
    None = all); a group without an image in ``idx`` is NaN."""
    g = int(groups.max()) + 1 if len(groups) else 0  # every group of the split
    if idx is not None:
        correct, groups = correct[idx], groups[idx]
    sums = torch.zeros(g, dtype=torch.float64).index_add_(0, groups, correct.double())
    counts = torch.bincount(groups, minlength=g).double()
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.nan)


def worst_group_accuracy(
    correct: torch.Tensor, groups: torch.Tensor, idx: torch.Tensor | None = None
) -> float:
    """The minimum over the groups present of the group's accuracy."""
    acc = group_accuracies(correct, groups, idx)
    return float(acc[~acc.isnan()].min())


def worst_group_chance(sizes: list[int], num_classes: int, draws: int = 4000) -> float:
    """Expected worst-group accuracy of a uniform random scorer (a group of n images is right
    Binomial(n, 1/C) / n times; the minimum of G of them is below 1/C), by seeded simulation."""
    g = torch.Generator().manual_seed(0)
    n = torch.tensor(sizes, dtype=torch.float64)
    hits = torch.binomial(n.expand(draws, -1), torch.full((draws, len(sizes)), 1 / num_classes,
                                                                dtype=torch.float64),
                          generator=g)  # fmt: skip
    return float((hits / n).min(1).values.mean())


def add_group_metrics(res: Any, groups: list[int], group_names: list[str]) -> None:
    """Worst-group and per-group accuracies of a zero-shot result on the spurious split:
    ``res.metrics`` gains ``worst_group_acc`` and ``acc_<group>``, ``res.per_image`` the group
    of each image (the bootstrap recomputes the worst group on every resample), the protocol
    card the chance of the worst group and the group sizes."""
    correct, _ = res.per_image["acc1"]
    g = torch.as_tensor(groups, dtype=torch.long)
    per_group = group_accuracies(correct, g)
    res.metrics[WORST] = worst_group_accuracy(correct, g)
    for name, acc in zip(group_names, per_group.tolist()):
        res.metrics[f"acc_{name.replace(' ', '_')}"] = acc
    res.per_image["groups"] = g
    sizes = torch.bincount(g, minlength=len(group_names)).tolist()
    card = res.protocol
    chance = card.setdefault("chance", {})
    chance[WORST] = worst_group_chance([s for s in sizes if s], card.get("n_classes", 2))
    card["groups"] = dict(zip(group_names, sizes))

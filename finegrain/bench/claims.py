"""The papers' directional claims, checked on one benchmark run with a paired bootstrap.

Each claim says "method X beats CLIP on task T" (metric M, higher is better). On the built-in
scenes every method is evaluated on the same images, so the difference is *paired*: one
bootstrap draw resamples the evaluation images (with replacement; a retrieval query's texts go
with their image) and recomputes M for both methods on that draw (mIoU from the drawn images'
summed confusion matrices, not a mean of per-image IoUs). The 95% interval is the 2.5 / 97.5
percentile of the drawn differences. With ``--seeds N`` (several models per method) one draw
resamples the seeds too (N of the N seed pairs, with replacement) and averages their
differences on the drawn images, so the interval pools the variation over images and over
training seeds; the spread over seeds is reported next to it. Worst-group accuracy
(``finegrain.bench.spurious``) is recomputed on every draw from the drawn images' groups.

Each claim declares its *smallest effect of interest* ``margin`` (a fraction; shown in points):
a difference smaller than that is not one the paper would call a gain. Verdicts, from the 95%
interval [lo, hi] of the difference (issue 31):

- ``tie (identical per-image values)``: both methods gave the same value on every evaluation
  image (every seed), e.g. a token grid too coarse for the methods to differ; never ``held``;
- ``held``: lo > margin (the whole interval above the smallest effect of interest);
- ``equivalent``: -margin < lo and hi < margin (any difference is smaller than the margin;
  this includes intervals just below 0: worse, but by less than an effect of interest);
- ``did not hold``: hi < 0 and lo <= -margin (the whole interval below 0, reaching past the
  margin: the method is worse);
- ``inconclusive``: anything else, e.g. an interval that excludes 0 but not the margin, or one
  that straddles 0 and a margin (the run lacks the power to tell);
- ``not run`` (a method is not registered or not selected), ``n/a (...)`` (the task is
  unavailable or one of the methods cannot do it).

The verdict is taken on the exact values; results.json keeps them unrounded. Text-conditioned methods are scored with their conditioned scores where
the task has a conditioned twin (their papers' protocol); CLIP with global scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from finegrain.bench.spurious import WORST, worst_group_accuracy
from finegrain.eval.segmentation import seg_metrics

BASELINE = "clip"
# a claim row whose two methods both score under this multiple of the task's chance level is
# flagged: at or near chance a difference says nothing about the skill the claim names
NEAR_CHANCE = 1.5


@dataclass(frozen=True)
class Claim:
    method: str
    task: str  # benchmark task key (see finegrain.bench.tasks)
    metric: str
    what: str  # the claim in words
    paper: str
    margin: float = 0.01  # smallest effect of interest (fraction: 0.01 = 1 point)
    margin_source: str = "convention: 1 point"
    source: str = ""  # where the paper makes the claim (section, table), and how it is tested
    method_task: str = ""  # the method's own reading of the task ('' = ``task``), e.g. GRAIN's
    # region queries against CLIP's crops


_CLIPPY = ("CLIPpy, ICCV 2023: abstract ('the learned representations are uniquely robust to "
           "spurious correlations in datasets designed to probe the causal behavior of vision "
           "models') and its robustness analysis on Waterbirds (worst-group accuracy); the section "
           "and table number could not be read here")  # fmt: skip
CLAIMS = (
    Claim("flair", "retrieval/sentences", "image_retrieval_recall@1",
          "FLAIR > CLIP on sentence-level retrieval (sentence -> image R@1)", "Xiao et al. 2025",
          source="abstract and its fine-grained retrieval task: text-conditioned embeddings "
                 "'excel at retrieving detailed image content' (partial image content)"),
    Claim("flair", "segmentation/zeroshot", "miou",
          "FLAIR > CLIP on zero-shot segmentation (mIoU)", "Xiao et al. 2025",
          source="abstract: zero-shot semantic segmentation, outperforming models trained on "
                 "billions of pairs"),
    Claim("flair", "hardneg/regions", "acc1",
          "FLAIR > CLIP on attribute hard negatives (a box's description vs attribute swaps, top-1)",
          "Xiao et al. 2025",
          source="abstract: 'capturing fine-grained visual information'; the paper measures it "
                 "by fine-grained retrieval, not by attribute negatives: this row is a proxy"),
    Claim("grain", "color_shape/descriptions", "acc1",
          "GRAIN > CLIP on description-aware classification (colour x shape, top-1)",
          "Halbe et al. 2024", source="abstract: zero-shot classification on 11 datasets with "
          "class descriptions"),
    Claim("grain", "novel/descriptions", "acc1",
          "GRAIN > CLIP on novel-concept classification (names + descriptions, top-1)",
          "Halbe et al. 2024", source="abstract and Products-2023: recognising novel concepts"),
    Claim("grain", "regions/crop", "acc1",
          "GRAIN > CLIP on region classification (GRAIN's region queries vs CLIP on box crops, "
          "top-1)", "Halbe et al. 2024", method_task="regions/queries",
          source="abstract: GRAIN 'learns to jointly ground textual descriptions in image "
                 "regions'; the paper reports no region-level number: this row tests that "
                 "mechanism"),
    Claim("clippy", "segmentation/zeroshot", "miou",
          "CLIPpy > CLIP on zero-shot segmentation (mIoU)", "Ranasinghe et al. 2023",
          source="abstract: state-of-the-art zero-shot (unsupervised) segmentation"),
    Claim("clippy", "grouping", "jaccard",
          "CLIPpy > CLIP on bottom-up grouping (Jaccard)", "Ranasinghe et al. 2023",
          source="abstract: 'unsupervised bottom-up and top-down semantic segmentations'"),
    Claim("clippy", "spurious", "worst_group_acc",
          "CLIPpy > CLIP on worst-group accuracy (spurious background scenes, zero-shot)",
          "Ranasinghe et al. 2023", source=_CLIPPY),
    Claim("detailclip", "segmentation/zeroshot", "miou",
          "DetailCLIP > CLIP on zero-shot segmentation (mIoU)", "Monsefi et al. 2024",
          source="abstract: better segmentation accuracy than CLIP-based models"),
    Claim("detailclip", "segmentation/linear_probe", "miou",
          "DetailCLIP > CLIP on linear-probe segmentation (mIoU)", "Monsefi et al. 2024",
          source="Table 1: ADE20K with a linear head (37.3 vs CLIP 34.2 mIoU)"),
    Claim("detailclip", "regions/roialign", "acc1",
          "DetailCLIP > CLIP on region classification from dense features (RoIAlign, top-1)",
          "Monsefi et al. 2024",
          source="Table 1: COCO detection (AP box 48.9 vs CLIP 43.6, fine-tuned); box-level "
                 "classification from the frozen feature map is this run's proxy"),
)  # fmt: skip


def resolve_task(results: dict[str, Any], task: str) -> str:
    """The conditioned twin ``task+conditioned`` when this method ran it, else ``task``."""
    twin = f"{task}+conditioned"
    r = results.get(twin)
    return twin if r is not None and not r.na else task


def _values_key(metric: str) -> str:
    """The per-image values a metric is computed from (worst-group: the images' top-1)."""
    return "acc1" if metric == WORST else metric


def statistic(per: dict[str, Any], metric: str, idx: torch.Tensor | None) -> float:
    """``metric`` on the images ``idx`` (a resample; None = all images)."""
    if metric == WORST:
        return worst_group_accuracy(per["acc1"][0], per["groups"], idx)
    if metric == "miou" and "confusions" in per:
        conf = per["confusions"]
        conf = conf.sum(0) if idx is None else conf[idx].sum(0)
        return seg_metrics(conf, ignore_background=per.get("ignore_background", True))["miou"]
    values, owner = per[metric]
    n = int(owner.max()) + 1 if len(owner) else 0
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, values.double())
    counts = torch.bincount(owner, minlength=n).double()
    if idx is None:
        return float(sums.sum() / counts.sum().clamp_min(1))
    return float(sums[idx].sum() / counts[idx].sum().clamp_min(1))


def num_images(per: dict[str, Any], metric: str) -> int:
    if metric == "miou" and "confusions" in per:
        return int(per["confusions"].shape[0])
    return int(per[_values_key(metric)][1].max()) + 1


def _na(seeds: list[dict[str, Any]], task: str) -> str:
    for res in seeds:
        r = res.get(task)
        if r is None:
            return "n/a (task not available)"
        if r.na:
            return r.na if r.na != "n/a" else "n/a (method cannot do this task)"
    return ""


def check_claim(
    claim: Claim, runs: dict[str, list[dict[str, Any]]], draws: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Verdict, difference and 95% paired-bootstrap interval of one claim.

    ``runs[method]`` is a list over training seeds of ``{task_key: TaskResult}``.
    """
    out: dict[str, Any] = {"claim": claim.what, "paper": claim.paper, "method": claim.method,
                           "metric": claim.metric, "task": claim.task, "margin": claim.margin,
                           "margin_source": claim.margin_source, "source": claim.source}  # fmt: skip
    missing = [m for m in (claim.method, BASELINE) if m not in runs]
    if missing:
        return {**out, "verdict": "not run", "note": f"{', '.join(missing)} not run"}
    mine, base = runs[claim.method], runs[BASELINE]
    tm, tb = resolve_task(mine[0], claim.method_task or claim.task), claim.task
    out["task_method"], out["task_baseline"] = tm, tb
    na = _na(mine, tm) or _na(base, tb)
    if na:
        return {**out, "verdict": na}
    pairs = [(m[tm], b[tb]) for m, b in zip(mine, base)]
    if any(claim.metric not in r.metrics for pair in pairs for r in pair):
        return {**out, "verdict": f"n/a (task reports no '{claim.metric}')"}
    point = [(m.metrics[claim.metric], b.metrics[claim.metric]) for m, b in pairs]
    diffs = [a - b for a, b in point]
    out.update(value=sum(a for a, _ in point) / len(point),
               baseline=sum(b for _, b in point) / len(point),
               diff=sum(diffs) / len(diffs), seeds=len(diffs),
               seeds_held=sum(d > claim.margin for d in diffs),
               seed_std=_std(diffs) if len(diffs) > 1 else None)  # fmt: skip
    chance = pairs[0][1].protocol.get("chance", {}).get(claim.metric)
    if chance is not None:
        out["chance"] = chance
        if max(out["value"], out["baseline"]) < NEAR_CHANCE * chance:
            out["note"] = (f"both methods within {NEAR_CHANCE:g}x chance ({100 * chance:.1f}): "
                           "neither has learned this skill at this budget, so the row cannot "
                           "show a difference in it")  # fmt: skip
    need = {WORST: ("acc1", "groups")}.get(claim.metric, (claim.metric,))
    have = all(all(k in m.per_image for k in need) or "confusions" in m.per_image
               for pair in pairs for m in pair)  # fmt: skip
    lo = hi = None
    if have and draws > 0:
        lo, hi = paired_interval(pairs, claim.metric, draws, seed)
    tie = have and all(identical(m.per_image, b.per_image, claim.metric) for m, b in pairs)
    half = None if lo is None else (hi - lo) / 2
    out.update(ci_low=lo, ci_high=hi, half_width=half, verdict=verdict(lo, hi, claim.margin, tie))
    if tie:
        out["note"] = ("both methods gave the same value on every evaluation image (e.g. both "
                       "predict the same class everywhere, or a token grid too coarse for them "
                       "to differ): no evidence either way")  # fmt: skip
    return out


def paired_interval(pairs: list[tuple[Any, Any]], metric: str, draws: int, seed: int = 0
                    ) -> tuple[float, float]:  # fmt: skip
    """95% percentile interval of the seed-averaged difference; each draw resamples the images
    and, with several seeds, the seeds (both with replacement)."""
    n = num_images(pairs[0][0].per_image, metric)
    for m, b in pairs:
        assert num_images(m.per_image, metric) == n == num_images(b.per_image, metric), (
            "methods were evaluated on different image sets"
        )
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (draws, n), generator=g)
    s = len(pairs)
    per_seed = torch.zeros(s, draws, dtype=torch.float64)  # difference of seed j on draw k
    for j, (m, b) in enumerate(pairs):
        for k in range(draws):
            per_seed[j, k] = statistic(m.per_image, metric, idx[k]) - statistic(
                b.per_image, metric, idx[k]
            )
    if s == 1:
        d = per_seed[0]
    else:  # the seeds of each draw: s of the s seed pairs, with replacement
        pick = torch.randint(0, s, (draws, s), generator=g)
        d = per_seed.t().gather(1, pick).mean(1)
    q = torch.quantile(d, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(q[0]), float(q[1])


TIE = "tie (identical per-image values)"


def verdict(lo: float | None, hi: float | None, margin: float, tie: bool = False) -> str:
    """One of the four verdicts (or the tie) from the 95% interval ``[lo, hi]`` and the claim's
    smallest effect of interest ``margin`` (see the module docstring)."""
    if tie:
        return TIE
    if lo is None or hi is None:
        return "inconclusive (no interval)"
    if lo > margin:
        return "held"
    if -margin < lo and hi < margin:
        return "equivalent"
    if hi < 0:
        return "did not hold"
    return "inconclusive"


def identical(a: dict[str, Any], b: dict[str, Any], metric: str, atol: float = 1e-6) -> bool:
    """Whether two methods' per-image values of ``metric`` are the same on every image (the same
    items of the same images; values within ``atol``, float rounding, of each other; confusion
    counts exactly), read off the values themselves, not off the aggregated metric."""
    key = "confusions" if metric == "miou" and "confusions" in a else _values_key(metric)
    if key not in a or key not in b:
        return False
    if key == "confusions":
        return a[key].shape == b[key].shape and bool(torch.equal(a[key], b[key]))
    (va, oa), (vb, ob) = a[key], b[key]
    if va.shape != vb.shape or not torch.equal(oa, ob):
        return False
    return bool(((va.double() - vb.double()).abs() <= atol).all())


def _std(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def check_claims(runs: dict[str, list[dict[str, Any]]], draws: int = 1000) -> list[dict[str, Any]]:
    return [check_claim(c, runs, draws) for c in CLAIMS]

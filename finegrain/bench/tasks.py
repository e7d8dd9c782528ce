"""The benchmark's evaluation: every task whose truth the built-in scenes know, run through the
evaluation suite (``finegrain.eval``), keeping per-image results for the paired bootstrap.

Task keys (``<task>/<setting>``) and their headline metric:
- ``shape/names`` ... ``novel/descriptions``: zero-shot top-1 (``acc1``); ``names`` = class
  names in the templates, ``descriptions`` = names + the built-in class descriptions (GRAIN's
  description-aware protocol, given to every method alike);
- ``retrieval/caption|sentences|long``: text-to-image and image-to-text R@1, global scoring,
  plus ``+conditioned`` twins for methods with text-conditioned scoring;
- ``segmentation/zeroshot``: mIoU (object classes) of the raw patch tokens;
  ``segmentation/zeroshot+maskclip`` the same through the MaskCLIP readout of the tower's last
  block (``finegrain.encoders.dense``; methods whose image tower makes their dense features);
  ``segmentation/linear_probe`` and
  ``grouping`` when those evaluation tasks are registered;
- ``boxes``: for methods that predict boxes, Hungarian-matched IoU and recall@0.5 against the
  scenes' ground-truth object boxes;
- ``spurious``: zero-shot top-1 over the two classes of the spurious-correlation scenes
  (``finegrain.data.synthetic_spurious``; balanced class x background groups) and the
  worst-group accuracy ``worst_group_acc`` (``finegrain.bench.spurious``);
- region level (``finegrain.eval.regions``, ``hardneg``, ``compositional``), per box or pair
  with the image it comes from (the bootstrap resamples images): ``regions/crop`` (every method:
  the box cropped and encoded), ``regions/roialign`` (methods with dense features: the box
  pooled from the whole image's feature map), ``regions/queries`` (methods with region queries
  and boxes, GRAIN: the query whose box matches), top-1 shape of each ground-truth box;
  ``hardneg/regions``: a box's true description vs the same with attributes changed (top-1);
  ``compositional/pairs``: a two-object caption vs attribute/object/relation swaps
  (``acc`` = mean over kinds, per-pair ``acc_<kind>``); ``+conditioned`` twins as above.
A task a method cannot do is "n/a" (its capability is checked before running).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from finegrain.eval.common import EvalContext, image_batches
from finegrain.eval.config import EvalTaskConfig, task_config_class
from finegrain.eval.datasets import load_task_data
from finegrain.eval.protocol import protocol_card
from finegrain.eval.task import generic_per_image_values, task_object
from finegrain.registry import EVAL_TASK_CONFIGS, EVAL_TASKS

NA = "n/a"
# why a method cannot do a task, by what the task needs (shown in the report's cells)
CANNOT = {
    "conditioned": "no text-conditioned scoring",
    "dense": "no dense features",
    "regions": "no region queries",
    "boxes": "predicts no boxes",
}


def cannot(needs: str) -> str:
    """'n/a (<why>)' for a method that lacks what a task needs."""
    return f"{NA} ({CANNOT[needs]})"


CORE_TASKS = ("zeroshot", "retrieval", "segmentation")  # errors there are bugs: raised


@dataclass
class TaskSpec:
    key: str
    task: str  # registered evaluation task
    fields: dict[str, Any]
    needs: str = ""  # "" | conditioned | dense | regions | boxes
    headline: tuple[str, ...] = ("acc1",)
    region_level: bool = False  # sized by the budget's region_images (images_for)


@dataclass
class TaskResult:
    """One task of one method: metrics, per-image values for the bootstrap, or why n/a."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_image: dict[str, Any] = field(default_factory=dict)  # see ``per_image_values``
    na: str = ""
    seconds: float = 0.0
    protocol: dict[str, Any] = field(default_factory=dict)  # finegrain.eval.protocol card


def _registered(*names: str) -> str:
    """The first of ``names`` registered as an evaluation task, else ''."""
    return next((n for n in names if n in EVAL_TASKS), "")


def task_specs() -> list[TaskSpec]:
    """All benchmark tasks, in report order."""
    specs = []
    for variant in ("shape", "color_shape", "novel"):
        for mode in ("names", "descriptions"):
            desc = {"descriptions": "builtin"} if mode == "descriptions" else {}
            specs.append(TaskSpec(f"{variant}/{mode}", "zeroshot", {"variant": variant, **desc}))
    specs.append(TaskSpec("novel/descriptions+fusion", "zeroshot",
                          {"variant": "novel", "descriptions": "builtin", "fusion_alpha": 0.5},
                          needs="regions"))  # fmt: skip
    r_head = ("image_retrieval_recall@1", "text_retrieval_recall@1")
    for variant, key in (("retrieval", "caption"), ("sentences", "sentences"), ("long", "long")):
        specs.append(TaskSpec(f"retrieval/{key}", "retrieval", {"variant": variant}, "", r_head))
        specs.append(TaskSpec(f"retrieval/{key}+conditioned", "retrieval",
                              {"variant": variant, "scoring": "conditioned"}, "conditioned", r_head))  # fmt: skip
    specs.append(TaskSpec("segmentation/zeroshot", "segmentation", {}, "dense", ("miou",)))
    # the training-free dense readout of CLIP-style towers (MaskCLIP, Zhou et al. 2022: the last
    # block's value path, no attention pooling), beside the raw patch tokens the claims compare
    specs.append(TaskSpec("segmentation/zeroshot+maskclip", "segmentation",
                          {"dense_variant": "maskclip"}, "dense", ("miou",)))  # fmt: skip
    probe = _registered("linear_probe", "linear_probe_segmentation", "segmentation_probe", "probe")
    specs.append(TaskSpec("segmentation/linear_probe", probe or "linear_probe", {}, "", ("miou",)))
    specs.append(TaskSpec("grouping", _registered("grouping") or "grouping", {}, "", ("jaccard",)))
    specs.append(TaskSpec("boxes", "", {}, "boxes", ("matched_iou", "recall@0.5")))
    specs.append(TaskSpec("spurious", "zeroshot", {"variant": "spurious"},
                          headline=("acc1", "worst_group_acc")))  # fmt: skip
    for mode, needs in (("crop", ""), ("roialign", "dense"), ("queries", "regions")):
        fields = {"variant": "shape", "mode": "regions" if mode == "queries" else mode}
        specs.append(TaskSpec(f"regions/{mode}", "region", fields, needs, region_level=True))
    for task, variant, head in (("hardneg", "regions", "acc1"), ("compositional", "pairs", "acc")):
        for scoring in ("global", "conditioned"):
            twin = "+conditioned" if scoring == "conditioned" else ""
            specs.append(TaskSpec(f"{task}/{variant}{twin}", task,
                                  {"variant": variant, "scoring": scoring},
                                  "conditioned" if twin else "", (head,), True))  # fmt: skip
    return specs


def images_for(spec: TaskSpec, budget: Any) -> int:
    """Evaluation images of a task under ``budget``: ``eval_images``, or for the region-level
    tasks (several boxes per image, each cropped and encoded) ``region_images`` at most."""
    if spec.region_level:
        return min(budget.region_images, budget.eval_images)
    return budget.eval_images


# a task spec's ``needs`` -> the method capability (``Method.capabilities()``) it names
NEEDS = {
    "conditioned": "score_features",
    "dense": "dense_features",
    "regions": "region_embeddings",
    "boxes": "predict_boxes",
}


def capability(method: Any, needs: str) -> bool:
    return not needs or NEEDS[needs] in method.capabilities()


def _task_config(spec: TaskSpec, num: int, num_train: int | None = None) -> EvalTaskConfig:
    """``num`` evaluation images; a task that trains on a split of its own (the linear probe's
    ``num_train``) gets ``num_train`` training images (default ``num``), so a small budget
    shrinks the whole task, not only its test split, and a large test split (power) does not
    grow the probe's training (its cost: 30 epochs per training scene)."""
    sized = {"num_samples": num}
    if "num_train" in {f.name for f in dataclasses.fields(task_config_class(spec.task))}:
        sized["num_train"] = num if num_train is None else num_train
    return EvalTaskConfig(task=spec.task, dataset="synthetic", batch_size=64, name=spec.key,
                          num_examples=4, **sized, **spec.fields)  # fmt: skip


def per_image_values(task: str, data: Any, art: dict, metrics: dict) -> dict[str, Any]:
    """Per-image results of one task for the bootstrap over evaluation images, from its task
    object (``EvalTask.per_image_values``: ``{metric: (values (M,), image of each (M,))}``,
    ``{"confusions": (N, C, C)}`` for mIoU); a task registered as a plain function gets the
    generic reading of ``art["per_image"]``, ``art["per_item"]`` and ``art["confusions"]``."""
    obj = task_object(task)
    if obj is None:
        return generic_per_image_values(art, metrics)
    return obj.per_image_values(data, art, metrics)


def run_suite_task(ctx: EvalContext, spec: TaskSpec, num: int, num_train: int | None = None
                   ) -> tuple[TaskResult, Any, dict]:  # fmt: skip
    """One registered evaluation task; returns the result, its data and its artefacts."""
    if spec.task not in EVAL_TASKS or spec.task not in EVAL_TASK_CONFIGS:
        return TaskResult(na=f"{NA} (task not available)"), None, {}
    if not capability(ctx.method, spec.needs):
        return TaskResult(na=cannot(spec.needs)), None, {}
    t0 = time.perf_counter()
    try:
        cfg = _task_config(spec, num, num_train)
        data = load_task_data(cfg, ctx.image_size)
        with torch.no_grad():
            metrics, art = EVAL_TASKS.get(spec.task)(ctx, cfg, data)
    except (ValueError, NotImplementedError) as e:
        if spec.task in CORE_TASKS:
            raise
        # a task added by another module that cannot run here: said in the report, not fatal
        return TaskResult(na=f"{NA} (failed: {str(e).splitlines()[0][:80]})"), None, {}
    res = TaskResult({k: float(v) for k, v in metrics.items()},
                     per_image_values(spec.task, data, art, metrics), seconds=time.perf_counter() - t0,
                     protocol=protocol_card(ctx, cfg, data, art))  # fmt: skip
    if spec.key == "spurious":  # the groups of the split the task just scored (memoised)
        from finegrain.bench.spurious import add_group_metrics
        from finegrain.data.synthetic_sets import eval_split

        d = eval_split("spurious", num, image_size=ctx.image_size)
        add_group_metrics(res, d["groups"], d["group_names"])
    return res, data, art


# ---- box quality (methods with region heads that predict boxes) --------------------------------
def box_split(num: int, image_size: int) -> dict[str, Any]:
    """The segmentation split's scenes with their ground-truth object boxes (normalised xyxy)."""
    from finegrain.data.synthetic_sets import eval_split

    return eval_split("segmentation", num, image_size=image_size)


def match_boxes(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(R,) IoU of each ground-truth box with the prediction assigned to it by a one-to-one
    Hungarian matching that maximises total IoU; pred (Q, 4), gt (R, 4) normalised xyxy.
    Ground-truth boxes left without a prediction (R > Q) get IoU 0."""
    from scipy.optimize import linear_sum_assignment

    from finegrain.losses.matching import pairwise_iou

    iou = pairwise_iou(pred.double(), gt.double())  # (Q, R)
    rows, cols = linear_sum_assignment(-iou.numpy())
    out = torch.zeros(gt.shape[0], dtype=torch.float64)
    out[torch.as_tensor(cols)] = iou[torch.as_tensor(rows), torch.as_tensor(cols)]
    return out


@torch.no_grad()
def run_boxes(ctx: EvalContext, num: int) -> tuple[TaskResult, dict]:
    """Box quality of ``method.predict_boxes`` on the segmentation split's scenes."""
    if not capability(ctx.method, "boxes"):
        return TaskResult(na=cannot("boxes")), {}
    t0 = time.perf_counter()
    d = box_split(num, ctx.image_size)
    preds = torch.cat([ctx.method.predict_boxes(b).float().cpu()
                       for b in image_batches(ctx, d["images"], 64, "boxes", crop=False)])  # fmt: skip
    ious, owner = [], []
    for i, boxes in enumerate(d["boxes"]):
        ious.append(match_boxes(preds[i], torch.tensor(boxes, dtype=torch.float64)))
        owner.append(torch.full((len(boxes),), i))
    iou, own = torch.cat(ious), torch.cat(owner)
    hit = (iou >= 0.5).double()
    metrics = {"matched_iou": iou.mean().item(), "recall@0.5": hit.mean().item()}
    per = {"matched_iou": (iou, own), "recall@0.5": (hit, own)}
    art = {
        "images": d["images"][:4],
        "pred": preds[:4],
        "gt": [np.asarray(b) for b in d["boxes"][:4]],
    }
    return TaskResult(metrics, per, seconds=time.perf_counter() - t0), art

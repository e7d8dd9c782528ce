"""Objectives that compose: a method's loss is a weighted list of objectives.

An ``Objective`` is one paper's loss term(s) over named features (``methods.vocab``): it
declares the ``batch_fields`` its features come from and the ``features`` it reads, returns
its named ``*_loss`` terms (plus metrics and stats), and reads the method's parts (the one
``temperature``, FLAIR's ``pooling``, DetailCLIP's centres) through the method it is given.
``Objectives`` weighs and sums the terms in list order, so the six papers' methods, built as
presets of these (each method file lists its objectives), give the same numbers as their
hand-written sums did; ``finegrain.methods.composed`` combines them into recipes no paper
defines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from finegrain.losses.contrastive import clip_loss, multi_positive_sigmoid_loss, siglip_loss
from finegrain.losses.distillation import dino_cls_loss, ibot_patch_loss
from finegrain.losses.flair import flair_multi_positive_loss, text_conditioned_sigmoid_loss
from finegrain.losses.matching import (
    box_cxcywh_to_xyxy,
    box_losses,
    elementwise_giou,
    hungarian_match,
    num_boxes_over_ranks,
)
from finegrain.losses.reconstruction import masked_mse
from finegrain.losses.region import region_description_loss
from finegrain.methods.vocab import l2
from finegrain.outputs import MethodOutput


@dataclass
class Terms:
    """What one objective returns: named loss terms, metrics, stats."""

    losses: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


class Objective:
    """One loss (one or more named terms) over features; subclasses set the declarations."""

    batch_fields: tuple[str, ...] = ()  # batch keys the features of this objective come from
    features: tuple[str, ...] = ()  # feature names (methods.vocab.FEATURES) it reads

    def __call__(self, method: Any, feats: dict[str, torch.Tensor]) -> Terms:
        raise NotImplementedError


class Objectives:
    """A weighted list of objectives: ``[(objective, {term: weight})]`` (a missing term
    weighs 1); the total sums ``weight * term`` in list order."""

    def __init__(self, items: list[tuple[Objective, dict[str, float]]]) -> None:
        if not items:
            raise ValueError("a method needs at least one objective")
        self.items = items

    @property
    def batch_fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for o, _ in self.items for f in o.batch_fields))

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for o, _ in self.items for f in o.features))

    def check(self, feats: dict[str, torch.Tensor], where: str) -> None:
        missing = [f for f in self.features if f not in feats]
        if missing:
            raise ValueError(f"{where}: the objectives need features {missing}, the method's "
                             f"features() gave {sorted(feats)}")  # fmt: skip

    def __call__(self, method: Any, feats: dict[str, torch.Tensor]) -> MethodOutput:
        """The weighted sum of every objective's terms, the terms (logged), the temperature's
        and the objectives' metrics and stats."""
        self.check(feats, f"method '{method.cfg.name}'")
        losses: dict[str, torch.Tensor] = {}
        metrics = dict(method.temperature.metrics()) if method.temperature is not None else {}
        stats: dict[str, float] = {}
        total: torch.Tensor | None = None
        for objective, weights in self.items:
            terms = objective(method, feats)
            for name, value in terms.losses.items():
                w = weights.get(name, 1.0)
                total = w * value if total is None else total + w * value
            losses.update(terms.losses)
            metrics.update(terms.metrics)
            stats.update(terms.stats)
        assert total is not None, "the objectives returned no loss term"
        return MethodOutput(loss=total, losses=losses, metrics=metrics, stats=stats)


# ---- global image-text objectives -------------------------------------------------------------
class ClipObjective(Objective):
    """Symmetric softmax InfoNCE (CLIP Fig. 3); ``image`` (B, V, E): the mean over V views."""

    features = ("image", "text")

    def __init__(self, local_loss: bool = True, gather: bool = True) -> None:
        self.local_loss, self.gather = local_loss, gather

    def __call__(self, method: Any, feats: dict[str, torch.Tensor]) -> Terms:
        img, text, scale = feats["image"], feats["text"], method.temperature.scale()
        kw = {"local_loss": self.local_loss, "gather": self.gather}
        if img.dim() == 3:  # (B, V, E): DetailCLIP's views
            loss = sum(clip_loss(img[:, i], text, scale, **kw) for i in range(img.shape[1]))
            return Terms({"clip_loss": loss / img.shape[1]})
        return Terms({"clip_loss": clip_loss(img, text, scale, **kw)})


class SigmoidObjective(Objective):
    """Pairwise sigmoid loss (SigLIP Eq. 1); multi-positive with ``text`` (B, K, E)."""

    features = ("image", "text")

    def __init__(self, exchange: str = "ring") -> None:
        self.exchange = exchange

    def __call__(self, method: Any, feats: dict[str, torch.Tensor]) -> Terms:
        image, text = feats["image"], feats["text"]
        scale, bias = method.temperature.scale(), method.temperature.bias()
        if text.dim() == 3:
            loss = multi_positive_sigmoid_loss(image, text, scale, bias, exchange=self.exchange)
        else:
            loss = siglip_loss(image, text, scale, bias, exchange=self.exchange)
        return Terms({"siglip_loss": loss})


# ---- FLAIR ------------------------------------------------------------------------------------
class TextConditionedObjective(Objective):
    """FLAIR's L^tcs: ``method.pooling`` pools ``image_tokens`` with each of ``texts``."""

    batch_fields = ("image", "texts", "pair_seed")
    features = ("image_tokens", "texts", "pair_seed")

    def __init__(self, exchange: str = "gather", normalization: str = "released") -> None:
        self.exchange, self.normalization = exchange, normalization

    def __call__(self, method: Any, feats: dict[str, torch.Tensor]) -> Terms:
        t = method.temperature
        tcs = text_conditioned_sigmoid_loss(
            method.pooling, feats["image_tokens"], feats["texts"], t.scale(), t.bias(),
            pair_seed=feats["pair_seed"], exchange=self.exchange, normalization=self.normalization,
        )  # fmt: skip
        return Terms({"tcs_loss": tcs})


class MultiPositiveObjective(Objective):
    """FLAIR's L^mps: the global image embedding against all K sub-captions."""

    batch_fields = ("image", "texts")
    features = ("image", "texts")

    def __init__(self, exchange: str = "gather", normalization: str = "released") -> None:
        self.exchange, self.normalization = exchange, normalization

    def __call__(self, method: Any, feats: dict[str, torch.Tensor]) -> Terms:
        t = method.temperature
        mps = flair_multi_positive_loss(
            l2(feats["image"]), l2(feats["texts"]), t.scale(), t.bias(),
            exchange="ring" if self.exchange == "ring" else "gather",
            normalization=self.normalization,
        )  # fmt: skip
        return Terms({"mps_loss": mps})


# ---- GRAIN ------------------------------------------------------------------------------------
class RegionObjective(Objective):
    """GRAIN: Hungarian-matched box L1 + GIoU (and per intermediate layer with ``aux``) and the
    region-query to description contrastive loss over the matched queries."""

    batch_fields = ("image", "boxes", "region_mask", "region_text")
    features = ("regions", "pred_boxes", "descriptions", "boxes", "region_mask", "region_text")

    def __init__(self, cost_l1: float = 5.0, cost_giou: float = 2.0, aux: bool = False,
                 over_ranks: bool = False, dedup: bool = False, symmetric: bool = False,
                 gather: bool = False) -> None:  # fmt: skip
        self.cost_l1, self.cost_giou, self.aux, self.over_ranks = (
            cost_l1,
            cost_giou,
            aux,
            over_ranks,
        )
        self.dedup, self.symmetric, self.gather = dedup, symmetric, gather

    def box_terms(
        self, pred: torch.Tensor, f: dict[str, torch.Tensor], n_boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, torch.Tensor]:
        """Match one decoder layer's boxes (B, Q, 4): (l1, giou, match, iou)."""
        match = hungarian_match(pred, f["boxes"], f["region_mask"], self.cost_l1, self.cost_giou)
        bi, qi, ti = match
        src, tgt = pred[bi, qi], f["boxes"][bi, ti]  # (M, 4)
        l1, giou = box_losses(src, tgt, n_boxes)
        with torch.no_grad():
            iou = elementwise_giou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))[0]
        return l1, giou, match, iou

    def __call__(self, method: Any, f: dict[str, torch.Tensor]) -> Terms:
        mask = f["region_mask"]
        n_local = mask.sum().float()
        n_boxes = (num_boxes_over_ranks(n_local, mask.device) if self.over_ranks
                   else n_local.clamp(min=1))  # fmt: skip
        l1, giou, (bi, qi, ti), iou = self.box_terms(f["pred_boxes"][:, -1], f, n_boxes)
        b, r, d = f["descriptions"].shape
        slot_regions = torch.zeros_like(f["descriptions"])  # (B, R, D) region matched to a slot
        slot_regions[bi, ti] = f["regions"][bi, qi].to(slot_regions.dtype)
        matched = torch.zeros_like(mask)
        matched[bi, ti] = True
        rd = region_description_loss(
            slot_regions.reshape(b * r, d), f["descriptions"].reshape(b * r, d), matched.reshape(-1),
            mask.reshape(-1), method.temperature.scale(), f["region_text"].reshape(b * r, -1),
            dedup=self.dedup, symmetric=self.symmetric, gather=self.gather,
        )  # fmt: skip
        # keep the region projection in the graph (DDP) even for a batch without regions
        rd = rd + 0.0 * f["regions"].sum()
        losses = {"box_l1_loss": l1, "box_giou_loss": giou, "region_loss": rd}
        if self.aux and f["pred_boxes"].shape[1] > 1:
            aux = [self.box_terms(f["pred_boxes"][:, i], f, n_boxes)
                   for i in range(f["pred_boxes"].shape[1] - 1)]  # fmt: skip
            losses["aux_box_l1_loss"] = sum(a[0] for a in aux)
            losses["aux_box_giou_loss"] = sum(a[1] for a in aux)
        metrics = {"matched_iou": iou.mean() if iou.numel() else torch.zeros(())}
        stats = {"target_boxes": float(n_local), "matched_boxes": float(bi.numel())}
        return Terms(losses, metrics, stats)


# ---- DetailCLIP -------------------------------------------------------------------------------
class DistillationObjective(Objective):
    """DetailCLIP / iBOT: patch self-distillation on removed tokens and DINO CLS distillation
    across views, against ``method.center_patch`` / ``center_cls`` at ``method.temperatures()``."""

    features = ("s_cls", "t_cls", "s_patch", "t_patch")

    def __init__(self, student_temp: float = 0.1) -> None:
        self.student_temp = student_temp

    def __call__(self, method: Any, feats: dict[str, torch.Tensor]) -> Terms:
        tau_cls, tau_patch = method.temperatures()
        patch = ibot_patch_loss(feats["s_patch"], feats["t_patch"], method.center_patch,
                                self.student_temp, tau_patch)  # fmt: skip
        cls = dino_cls_loss(
            feats["s_cls"], feats["t_cls"], method.center_cls, self.student_temp, tau_cls
        )
        metrics = {"teacher_temp": tau_cls, "teacher_patch_temp": tau_patch}
        return Terms({"ibot_patch_loss": patch, "ibot_cls_loss": cls}, metrics)


class ReconstructionObjective(Objective):
    """MAE-style pixel reconstruction of the removed patches (DetailCLIP's ``reconstLoss``)."""

    features = ("pixels", "pixel_target")

    def __call__(self, method: Any, feats: dict[str, torch.Tensor]) -> Terms:
        pixels = feats["pixels"]
        removed = float(pixels[..., 0].numel())  # over every view of the batch
        return Terms({"recon_loss": masked_mse(pixels, feats["pixel_target"])},
                     stats={"removed_tokens": removed})  # fmt: skip

"""Bottom-up grouping: unsupervised segmentation from patch features alone, no text (CLIPpy,
Ranasinghe et al., ICCV 2023, Sec. 4 "bottom-up segmentation", reported as the Jaccard index
on PASCAL VOC). Works for every method with ``dense_features``.

Per image, with z_p (p = 1..N) the L2-normalised patch features:
1. centres: the top-k (k = 8) principal directions v_1..v_k of the features, from the SVD of
   Z (N, D). The SVD is *uncentred* by default (the second-moment matrix Z^T Z): cosine
   assignment compares directions on the unit sphere, and subtracting the image's mean
   feature breaks it (measured on oracle one-hot features of the built-in scenes: Jaccard 1.0
   uncentred vs 0.84 centred); ``center=True`` gives the centred (covariance) PCA. Each v_j's
   sign is fixed so the features project positively on it on average (SVD signs are arbitrary).
2. assignment: group(p) = argmax_j cos(z_p, v_j); the (k, h, w) similarity maps are upsampled
   bilinearly to the mask size before the argmax (as zero-shot segmentation does).
3. score: for every ground-truth instance (ids > 0; 0 is background, 255 ignored pixels, as
   VOC ``SegmentationObject``), J = max over groups of IoU(instance, group) ("best overlap"
   matching: groups may serve several instances). The task's ``jaccard`` is the mean of J over
   all instances of all images, regardless of their class. The replication (kahnchana/clippy)
   reports VOC JI 47.5 but releases no code for it, so this matching is the common one of the
   unsupervised-segmentation literature, stated here rather than copied.

Data: the built-in scenes' instance masks (``dataset=synthetic``) or a VOC-style folder with
``SegmentationObject/<id>.png`` instance masks, ``JPEGImages/<id>.jpg`` and an optional
``ImageSets/Segmentation/<split>.txt`` (``dataset=voc``). Config: ``GroupingTaskConfig``
(``task: grouping``; ``num_groups``, ``center``, ``image_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from finegrain.config import finegrain_home
from finegrain.data.synthetic_sets import eval_split
from finegrain.eval.common import EvalContext, image_batches, require
from finegrain.eval.config import GroupingTaskConfig
from finegrain.eval.containers import ImageItem, load_mask

IGNORE = 255
GROUPING_DATASETS = ("synthetic", "voc")


@dataclass
class InstanceData:
    """``masks[i]``: (H, W) instance ids, 0 = background, 255 = ignore."""

    images: list[ImageItem]
    masks: list[np.ndarray | Path]

    def __post_init__(self) -> None:
        assert len(self.images) == len(self.masks), "one instance mask per image"
        if not self.images:
            raise ValueError("grouping dataset is empty")


def group_patches(feats: torch.Tensor, k: int = 8, center: bool = False) -> torch.Tensor:
    """feats (D, h, w) -> (k', h, w) cosine similarity of every patch to each of the top
    k' = min(k, N, D) principal directions (see module docstring)."""
    d, h, w = feats.shape
    z = F.normalize(feats.reshape(d, h * w).t().double(), dim=1)  # (N, D)
    x = z - z.mean(0, keepdim=True) if center else z
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # vh: (min(N, D), D)
    v = vh[:k]  # (k', D)
    sign = torch.where((x @ v.t()).sum(0) < 0, -1.0, 1.0).to(v)  # (k',) towards the data
    v = v * sign[:, None]
    sim = F.normalize(x, dim=1) @ v.t()  # (N, k'): cos(z_p, v_j), |v_j| = 1
    return sim.t().reshape(-1, h, w).float()


def assign_groups(sim: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(k, h, w) similarity maps -> (H, W) group ids, bilinear upsampling then argmax."""
    up = F.interpolate(sim[None], size=size, mode="bilinear", align_corners=False)[0]
    return up.argmax(0)


def instance_jaccards(groups: torch.Tensor, instances: torch.Tensor) -> list[float]:
    """Best-overlap Jaccard of every instance (ids not 0 / 255) with the groups (H, W)."""
    valid = instances != IGNORE
    inst, grp = instances[valid].long(), groups[valid].long()
    ids = [int(i) for i in inst.unique().tolist() if i != 0]
    if not ids:
        return []
    ng = int(grp.max()) + 1 if grp.numel() else 1
    out = []
    grp_area = torch.bincount(grp, minlength=ng).double()  # (G,)
    for i in ids:
        m = inst == i
        inter = torch.bincount(grp[m], minlength=ng).double()  # (G,)
        union = grp_area + m.sum() - inter
        out.append(float((inter / union.clamp_min(1)).max()))
    return out


@torch.no_grad()
def evaluate_grouping(
    ctx: EvalContext, g: GroupingTaskConfig, data: InstanceData
) -> tuple[dict, dict]:
    if g.num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {g.num_groups}")
    require(ctx.method, "dense_features", f"grouping/{g.dataset}")
    scores: list[float] = []
    per_image: list[float] = []
    keep: dict = {"preds": [], "masks": [], "indices": []}
    owners: list[int] = []  # the image of each instance score (bootstrap over images)
    s = 0
    for batch in image_batches(ctx, data.images, g.batch_size, "grouping", False, g.image_size):
        dense = ctx.method.dense_features(batch)  # (B, D, h, w)
        assert dense.dim() == 4, f"dense_features must be (B, D, h, w), got {tuple(dense.shape)}"
        for j in range(dense.shape[0]):
            mask = torch.from_numpy(load_mask(data.masks[s + j]))
            pred = assign_groups(group_patches(dense[j].cpu(), g.num_groups, g.center), mask.shape)
            js = instance_jaccards(pred, mask)
            scores += js
            owners += [s + j] * len(js)
            if js:
                per_image.append(sum(js) / len(js))
            if len(keep["preds"]) < g.num_examples:
                keep["preds"].append(pred.numpy().astype(np.uint8))
                keep["masks"].append(mask.numpy())
                keep["indices"].append(s + j)
        s += dense.shape[0]
    if not scores:
        raise ValueError(f"grouping/{g.dataset}: no ground-truth instances in {s} masks")
    metrics = {
        "jaccard": float(np.mean(scores)),  # over instances, regardless of label
        "jaccard_image_mean": float(np.mean(per_image)),
        "instances": float(len(scores)),
    }
    keep["per_item"] = {"jaccard": (torch.tensor(scores), torch.tensor(owners))}
    return metrics, keep


# ---- data -------------------------------------------------------------------------------------
def load_voc_instances(path: Path, split: str) -> InstanceData:
    """A VOC-style folder: ``SegmentationObject/*.png`` + ``JPEGImages/*.jpg``."""
    masks_dir, images_dir = path / "SegmentationObject", path / "JPEGImages"
    split_file = path / "ImageSets" / "Segmentation" / f"{split}.txt"
    if split_file.is_file():
        ids = [t.strip() for t in split_file.read_text().splitlines() if t.strip()]
    else:
        ids = sorted(p.stem for p in masks_dir.glob("*.png"))
    if not ids:
        raise ValueError(f"no instance masks under {masks_dir} (split '{split}')")
    masks = [masks_dir / f"{i}.png" for i in ids]
    images = [images_dir / f"{i}.jpg" for i in ids]
    missing = [p for p in masks + images if not p.is_file()]
    if missing:
        ann = split_file if split_file.is_file() else masks_dir
        raise ValueError(f"{len(missing)} files listed by {ann} are missing, e.g. {missing[0]}")
    return InstanceData(images, masks)


def load_grouping_data(g: GroupingTaskConfig, image_size: int) -> InstanceData:
    """The instance-mask dataset a grouping task names."""
    if g.dataset == "synthetic":
        d = eval_split("segmentation", g.num_samples, image_size=image_size)
        data = InstanceData(list(d["images"]), list(d["instance_masks"]))
    elif g.dataset == "voc":
        path = Path(g.path).expanduser() if g.path else finegrain_home() / "data" / "voc"
        data = load_voc_instances(path, g.split)
    else:
        raise ValueError(
            f"unknown grouping dataset '{g.dataset}'; valid choices: {', '.join(GROUPING_DATASETS)}"
        )
    if g.limit > 0:
        data = InstanceData(data.images[: g.limit], data.masks[: g.limit])
    return data

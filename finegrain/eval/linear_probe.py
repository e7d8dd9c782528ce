"""Linear-probe semantic segmentation: the frozen model's patch features, a linear head trained
on one split, mIoU on another.

The small-scale stand-in for the linear protocol of DetailCLIP's Table 3 (Monsefi et al. 2024:
ADE20K "linear" mIoU, after iBOT/BEiT, Zhou et al. 2022 App. C; DINOv2, Oquab et al. 2023,
Sec. 7.4: "a linear layer is trained to predict class logits from patch tokens ... upsampled to
full resolution"). Works for every method with ``dense_features``:

    z = dense_features(x)                (B, D, h, w), frozen, computed once per image
    z' = (z - mu) / sigma                 per-channel statistics of the training features
                                          (the BatchNorm of the mmseg/DINOv2 linear head, in eval form)
    logits = W z' + b                     (B, C + 1, h, w), a 1x1 convolution
    loss = CE(upsample(logits -> S x S), mask)   label 255 ignored

The head is trained with AdamW on mini-batches of images, shuffled by a seeded generator (the
result does not depend on the global RNG). Class 0 (background) is one of the C + 1 outputs
and of the mIoU (VOC-21 / ADE-150 style: every class present in ground truth or prediction).

Data: the built-in scenes (``dataset="synthetic"``: two disjoint generated splits, ``num_train``
and ``num_samples`` images) or a VOC-style folder (``dataset="voc"``: ``train_split`` /
``split`` lists of ``ImageSets/Segmentation``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from finegrain.eval.common import EvalContext, image_batches, require
from finegrain.eval.config import LinearProbeTaskConfig
from finegrain.eval.containers import SegmentationData, load_mask
from finegrain.eval.datasets import ProbeData
from finegrain.eval.segmentation import IGNORE, chance_metrics, confusion, seg_metrics


def _resized_masks(data: SegmentationData, size: int) -> torch.Tensor:
    """(N, S, S) long masks, nearest-resized to the model input (the images are squashed)."""
    out = []
    for mk in data.masks:
        m = load_mask(mk).astype(np.uint8)
        m = np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST))
        out.append(torch.from_numpy(m.astype(np.int64)))
    return torch.stack(out)


@torch.no_grad()
def _features(ctx: EvalContext, data: SegmentationData, batch_size: int) -> torch.Tensor:
    feats = []
    for batch in image_batches(ctx, data.images, batch_size, "linear probe", crop=False):
        # a method may probe other features than its text-aligned dense ones (DetailCLIP:
        # the backbone's tokens, as the dense protocols of iBOT / DetailCLIP)
        dense = ctx.method.probe_features(batch)
        assert dense.dim() == 4, f"dense_features must be (B, D, h, w), got {tuple(dense.shape)}"
        feats.append(dense.float().cpu())
    return torch.cat(feats)  # (N, D, h, w)


def train_probe(
    feats: torch.Tensor, masks: torch.Tensor, num_labels: int, cfg: LinearProbeTaskConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Conv2d]:
    """Fit the standardised 1x1-conv head; returns (mu, sigma, head)."""
    mu = feats.mean(dim=(0, 2, 3), keepdim=True)  # (1, D, 1, 1)
    sigma = feats.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    g = torch.Generator().manual_seed(cfg.seed)
    head = torch.nn.Conv2d(feats.shape[1], num_labels, 1)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, size = feats.shape[0], masks.shape[-1]
    steps = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            for idx in torch.randperm(n, generator=g).split(cfg.batch_size):
                z = (feats[idx] - mu) / sigma
                logits = F.interpolate(head(z), size=(size, size), mode="bilinear",
                                       align_corners=False)  # fmt: skip
                loss = F.cross_entropy(logits, masks[idx], ignore_index=IGNORE)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return mu, sigma, head


@torch.no_grad()
def evaluate_linear_probe(
    ctx: EvalContext, cfg: LinearProbeTaskConfig, data: ProbeData
) -> tuple[dict[str, float], dict]:
    require(ctx.method, "dense_features", f"linear_probe/{cfg.dataset}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"linear_probe needs epochs >= 1 and batch_size >= 1, "
                         f"got {cfg.epochs} / {cfg.batch_size}")  # fmt: skip
    names = data.train.classnames
    if list(data.test.classnames) != list(names):
        raise ValueError("linear_probe train and test splits have different class lists")
    num_labels = len(names) + 1  # 0 = background
    size = ctx.image_size
    train_f = _features(ctx, data.train, cfg.batch_size)
    mu, sigma, head = train_probe(train_f, _resized_masks(data.train, size), num_labels, cfg)
    test_f = _features(ctx, data.test, cfg.batch_size)
    conf = torch.zeros(num_labels, num_labels, dtype=torch.long)
    keep: dict = {"preds": [], "masks": [], "indices": [], "confusions": []}
    for i in range(test_f.shape[0]):
        gt = torch.from_numpy(load_mask(data.test.masks[i]).astype(np.int64))
        logits = head((test_f[i : i + 1] - mu) / sigma)  # (1, C+1, h, w)
        logits = F.interpolate(logits, size=tuple(gt.shape), mode="bilinear", align_corners=False)
        pred = logits[0].argmax(0)
        image_conf = confusion(pred, gt, num_labels, ignore_background=False)
        conf += image_conf
        keep["confusions"].append(image_conf)  # per image: bootstrap over images
        if len(keep["preds"]) < cfg.num_examples:
            keep["preds"].append(pred.numpy().astype(np.uint8))
            keep["masks"].append(gt.numpy())
            keep["indices"].append(i)
    n = test_f.shape[0]
    keep["confusions"] = (
        torch.stack(keep["confusions"]) if n else torch.zeros(0, num_labels, num_labels).long()
    )
    keep["protocol"] = {"chance": chance_metrics(conf, num_labels, ignore_bg=False)}
    return seg_metrics(conf, ignore_background=False), keep

"""The one vocabulary of method files: tower, feature and loss-term names, one L2 helper,
checkpoint key migrations.

A diff of two methods should show what their papers differ in, not names: every method calls
its towers ``image`` and ``text``, returns the features below from ``features(batch)`` (the
ones it has), logs the loss terms below (``MethodOutput`` detaches them, once, for logging),
normalises with ``l2`` and keeps one ``finegrain.heads.logit_scale.LogitScale`` as
``self.temperature``. ``tests/test_method_vocabulary.py`` checks the six methods against it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

TOWERS = ("image", "text")  # the attribute names of the image and text towers

# feature name -> what it holds (leading dim the batch, so micro-batches concatenate)
FEATURES = {
    "image": "(B, E) or (B, V, E) L2-normalised global image embedding (V views)",
    "text": "(B, E) L2-normalised caption embedding",
    "texts": "(B, K, E) K caption embeddings per image (FLAIR: not normalised, pooling queries)",
    "image_tokens": "(B, N, E) projected patch tokens",
    "pair_seed": "(B,) the samples' seeds (FLAIR's negative-caption choice)",
    "regions": "(B, Q, E) L2-normalised region-query embeddings",
    "pred_boxes": "(B, L, Q, 4) predicted boxes of every decoder layer, cxcywh",
    "descriptions": "(B, R, E) region-description embeddings (zeros where region_mask is False)",
    "boxes": "(B, R, 4) target boxes, cxcywh",
    "region_mask": "(B, R) bool, True for a real region",
    "region_text": "(B, R, L) region-description token ids",
    "s_cls": "(B, V, K) student iBOT CLS logits",
    "s_patch": "(B, V, R, K) student iBOT logits of the removed patches",
    "t_cls": "(B, V, K) teacher iBOT CLS logits",
    "t_patch": "(B, V, R, K) teacher iBOT logits of the removed patches",
    "t_patch_mean": "(B, V, K) teacher patch logits averaged (the patch centre)",
    "pixels": "(B, V, R, p*p*3) reconstructed pixels of the removed patches",
    "pixel_target": "(B, V, R, p*p*3) their (normalised) targets",
}

# loss-term name -> what it is; ``MethodOutput.losses`` keys
LOSS_TERMS = {
    "clip_loss": "symmetric softmax InfoNCE between images and captions (CLIP Fig. 3)",
    "siglip_loss": "pairwise sigmoid loss (SigLIP Eq. 1; multi-positive with K captions)",
    "tcs_loss": "FLAIR's text-conditioned sigmoid loss",
    "mps_loss": "FLAIR's multi-positive sigmoid loss",
    "box_l1_loss": "Hungarian-matched box L1 (GRAIN, DETR)",
    "box_giou_loss": "Hungarian-matched 1 - GIoU",
    "aux_box_l1_loss": "box L1 summed over the intermediate decoder layers",
    "aux_box_giou_loss": "1 - GIoU summed over the intermediate decoder layers",
    "region_loss": "region-query to description contrastive loss (GRAIN)",
    "ibot_patch_loss": "iBOT patch self-distillation on removed tokens (DetailCLIP)",
    "ibot_cls_loss": "DINO CLS self-distillation across views (DetailCLIP)",
    "recon_loss": "normalised-pixel MSE on removed patches (DetailCLIP)",
}


def l2(x: torch.Tensor) -> torch.Tensor:
    """L2 normalisation over the last dim (the one spelling every method uses)."""
    return F.normalize(x, dim=-1)


def rename_prefixes(state: dict[str, Any], renames: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """``state`` with every key starting with an old prefix moved to its new prefix (the
    first matching rename wins); other keys unchanged, order kept."""
    renames = tuple(renames)
    out = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out

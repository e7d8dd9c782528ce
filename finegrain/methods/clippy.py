"""CLIPpy: perceptual grouping in contrastive vision-language models (Ranasinghe et al.,
ICCV 2023, "Perceptual Grouping in Contrastive Vision-Language Models", arXiv 2210.09996).

CLIPpy is CLIP with three changes (paper Sec. 3):

1. **Pretrained towers**: a self-supervised image tower (DINO ViT-B/16) and a pretrained
   sentence encoder (Sentence-T5-base) as text tower, both trained further.
2. **Spatial max pooling**: the image embedding is the per-channel maximum over the
   *projected* spatial tokens, x = max_p W_i z_p (no CLS token), so every channel of the
   embedding is owned by one patch and the contrastive gradient reaches that patch only
   (``finegrain.heads.pooling.max_pool``). The text embedding is the mean over the sentence
   encoder's real tokens (sentence-transformers' pooling), then ``W_t``.
3. **Token sub-sampling** (Sec. 3.4): training at up to 2x the resolution while keeping only a
   random 20% of the patch tokens, so the high-resolution step costs less than the full 1x
   step. Here ``token_keep`` is the kept fraction; the keep set is drawn per sample from the
   sample's own stream (``sample_rng(seed, "keep")``) in the collate, so it is
   identical after a resume and with any number of loader workers, and it goes through the
   image tower's ``keep=`` argument (native ViT, timm and open_clip ViTs alike).

The loss is CLIP's symmetric InfoNCE (``finegrain.losses.contrastive.clip_loss``), learnable
temperature, no extra term. ``dense_features`` are the projected patch tokens (B, E, h, w): the
same space the max pooling draws from, which is what makes zero-shot segmentation by
patch-text similarity work (paper Sec. 3.3 / Fig. 1).

**Paper vs the public replication** (kahnchana/clippy, an unofficial OpenCLIP fork; there is
no official code). Both are reachable by config:

| what | paper | replication | here |
|---|---|---|---|
| CLS token, training | "no CLS token" | max-pooled with the patches (timm trunk output incl. CLS) | ``cls_token="exclude"`` (default) / ``"train"`` (replication) |
| CLS token, zero-shot classification | - | in the max (``encode_image`` pools the whole trunk output) | ``classify_cls=False`` (default) / ``True`` (replication; ``clippy_vitb16``) |
| CLS token, segmentation | - | dropped (``encode_image(..., pool=False)[:, 1:]``) | never in ``dense_features`` |
| sub-sampling | up to 2x res., 80% dropped | ``patch_dropout=0.5`` configured but ignored by its timm tower (so: none, 224 px) | ``token_keep`` (1.0 default; ``clippy_vitb16_paper``: 448 px, 0.2) |
| image projection | linear head | none (``timm_pool=global_max`` drops ``timm_proj``) | ``projection="none"`` in both ``clippy_vitb16*`` (``"linear"``: a learned head) |
| text head | Sentence-T5 | ``SentenceTransformer``: T5 encoder, mean pooling, ``2_Dense`` (768 x 768, no bias), normalise | ``text.name=st`` loads and uses ``2_Dense`` (``clippy_vitb16*``); ``text.name=hf``: encoder + mean pooling only |

Remaining differences from the replication (no option): its DINO trunk is timm's
``vit_base_patch16_224_dino`` (same weights and function as our ``timm`` tower with
``dino_vitbase16_pretrain.pth``); its ``SentenceTransformer`` L2-normalises after ``2_Dense``
and OpenCLIP normalises again (a no-op); we normalise once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from finegrain.data.collate import ContrastiveCollate, caption_candidates
from finegrain.data.schema import sample_rng
from finegrain.encoders.base import num_kept
from finegrain.heads.pooling import max_pool
from finegrain.methods.clip import CLIP, CLIPConfig
from finegrain.methods.vocab import l2
from finegrain.registry import METHODS

CLS_CHOICES = ("exclude", "train")


@dataclass
class CLIPpyConfig(CLIPConfig):
    name: str = "clippy"
    # exclude: max over patch tokens only, in training and inference (the paper's "no CLS");
    # train: the CLS token joins the maximum in training only (the replication)
    cls_token: Literal["exclude", "train"] = "exclude"
    # zero-shot classification (encode_image) takes the max over the CLS token too, as the
    # replication's eval (``encode_image`` pools the timm trunk's output incl. CLS); dense
    # features (segmentation) never include it
    classify_cls: bool = False
    token_keep: float = 1.0  # fraction of patch tokens kept in training (paper: 0.2 at 2x res.)


def check_keep_fraction(fraction: float, what: str = "token_keep") -> float:
    """A keep fraction must lie in (0, 1]; returns it as a float."""
    f = float(fraction)
    if not (0.0 < f <= 1.0) or math.isnan(f):
        raise ValueError(
            f"{what} must be in (0, 1] (fraction of patch tokens kept), got {fraction}"
        )
    return f


def sample_keep(seed: int, n: int, m: int) -> list[int]:
    """The sorted indices of ``m`` of ``n`` patches, drawn from the sample's own seed."""
    return sorted(sample_rng(int(seed), "keep").sample(range(n), m))


class CLIPpyCollate(ContrastiveCollate):
    """``ContrastiveCollate`` plus, when ``keep_fraction < 1``, ``keep`` (B, M): the patch
    indices (row-major over the image's full grid) each sample keeps, from its own seed."""

    def __init__(
        self, tokenizer: Any, patch_size: int, keep_fraction: float = 1.0, train: bool = True
    ) -> None:
        super().__init__(tokenizer, 1, train=train)
        self.patch_size, self.keep_fraction = patch_size, check_keep_fraction(keep_fraction)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(samples)
        if not self.train or self.keep_fraction >= 1.0:
            return batch
        kept = [s for s in samples if caption_candidates(s)]  # the samples the batch holds
        _, _, hh, ww = batch["image"].shape
        p = self.patch_size
        if hh % p or ww % p:
            raise ValueError(f"image size {hh}x{ww} is not divisible by patch size {p}")
        n = (hh // p) * (ww // p)
        m = num_kept(n, self.keep_fraction)
        batch["keep"] = torch.tensor(
            [sample_keep(s.get("seed", 0), n, m) for s in kept], dtype=torch.long
        )  # (B, M)
        return batch


def tower_has_cls(tower: torch.nn.Module) -> bool:
    """Whether an image tower's ``pooled`` output is a CLS token (native / open_clip ViTs,
    timm ViTs with a class token) rather than a mean of its tokens (convnets)."""
    has = getattr(tower, "has_cls", None)
    if has is not None:
        return bool(has)
    return hasattr(tower, "class_embedding") or hasattr(
        getattr(tower, "visual", None), "class_embedding"
    )


def tower_patch_size(tower: torch.nn.Module) -> int | None:
    """The (square) patch size of a ViT tower, None for towers without patches."""
    p = getattr(tower, "patch_size", None)
    if p is None and hasattr(getattr(tower, "model", None), "patch_embed"):
        p = tower.model.patch_embed.patch_size
    if isinstance(p, (tuple, list)):
        if len(set(p)) != 1:
            raise ValueError(f"token sub-sampling needs square patches, got {tuple(p)}")
        p = p[0]
    return None if p is None else int(p)


@METHODS.register("clippy")
class CLIPpy(CLIP):
    """CLIPpy (see module docstring): CLIP's towers, projections, temperature and loss, with
    the image embedding max-pooled over projected patch tokens."""

    Config = CLIPpyConfig

    def __init__(self, cfg: CLIPpyConfig) -> None:
        if cfg.cls_token not in CLS_CHOICES:
            raise ValueError(
                f"unknown cls_token '{cfg.cls_token}'; valid choices: {', '.join(CLS_CHOICES)}"
            )
        check_keep_fraction(cfg.token_keep)
        super().__init__(cfg)
        if (cfg.cls_token == "train" or cfg.classify_cls) and not tower_has_cls(self.image):
            raise ValueError(
                f"cls_token='train' / classify_cls=True need an image tower whose pooled output "
                f"is a CLS token; image tower '{cfg.image.name}' has none (or pools with "
                "pool_type=avg; use cls_token='exclude', classify_cls=False)"
            )
        self.patch_size = tower_patch_size(self.image)
        if cfg.token_keep < 1.0 and self.patch_size is None:
            raise ValueError(
                f"image tower '{cfg.image.name}' does not support keep= (token subsets), which "
                f"token_keep={cfg.token_keep} needs; use a ViT tower or token_keep=1"
            )

    # ---- image embedding ---------------------------------------------------------------
    def _pooled_image(
        self, images: torch.Tensor, keep: torch.Tensor | None, with_cls: bool
    ) -> torch.Tensor:
        """(B, E) max over the projected patch tokens (the kept ones when ``keep`` (B, M) is
        given; the CLS token joins them when ``with_cls``), not normalised."""
        out = self.image(images) if keep is None else self.image(images, keep=keep)
        tokens = out.tokens  # (B, N or M, D)
        if with_cls:
            tokens = torch.cat([out.pooled.unsqueeze(1), tokens], dim=1)  # (B, 1 + N, D)
        return max_pool(self.image_proj(tokens))  # (B, N, E) -> (B, E)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Inference embedding: max over all projected patch tokens, and the CLS token with
        ``classify_cls`` (the replication's zero-shot classification)."""
        x = self._pooled_image(images, None, with_cls=self.cfg.classify_cls)
        return l2(x) if normalize else x

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, E, h, w): the projected patch tokens, the space the max pooling draws from.

        Any input size the tower accepts works (more patches at higher resolution)."""
        return super().dense_features(images)

    # ---- training ----------------------------------------------------------------------
    def make_collate(self, train: bool = True) -> CLIPpyCollate:
        keep = self.cfg.token_keep if train else 1.0
        return CLIPpyCollate(self.text.tokenizer, self.patch_size or 1, keep, train=train)

    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``image`` (B, E) max-pooled over the kept tokens (+ CLS with ``cls_token='train'``),
        ``text`` (B, E) mean-pooled sentence embedding; both L2-normalised."""
        if "text" not in batch:
            raise ValueError(f"method 'clippy' needs batch['text']; got keys {sorted(batch)}")
        keep = batch.get("keep") if self.training else None
        image = self._pooled_image(batch["image"], keep, with_cls=self.cfg.cls_token == "train")
        return {"image": l2(image), "text": self.encode_text(batch["text"])}

"""The two baseline methods: CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023).

Both are dual encoders: image tower + text tower, each followed by a bias-free linear
projection into ``embed_dim``, L2-normalised. They differ only in the loss:

- ``clip``: symmetric softmax InfoNCE (CLIP Fig. 3), learnable logit scale ``t = exp(s)``
  (``finegrain.heads.logit_scale``), initialised to t = 1/0.07 and clamped to t <= 100 after
  every optimizer step (CLIP Sec. 2.5). Across ranks: local loss with gather-with-grad by default.
- ``siglip``: pairwise sigmoid loss (SigLIP Eq. 1), learnable ``t`` (init 10) and bias ``b``,
  no clamp; ring exchange across ranks as big_vision. ``b`` starts at -10 (SigLIP Sec. 3.2,
  ``logit_bias_init="fixed"``, kept by ``siglip_vitb16``); the paper chose -10 as the prior
  log-odds of a positive pair at its 32k batch (-ln 32767 = -10.4), so by default
  (``"prior"``) the first training batch sets b to that prior at its own size, -ln(B - 1)
  (``finegrain.heads.logit_scale``): at B = 64, b = -10 cannot reach -4.1 in a short run and
  the embeddings stall at a constant-logit saddle (docs/flair_scenes.md, FLAIR's same fix).
  With ``num_captions > 1`` the batch carries K captions per image (``texts`` (B, K, L)) and
  the multi-positive sigmoid loss treats all K as positives.

``features`` returns only per-sample tensors (normalised embeddings); the logit scale/bias are
module parameters read in ``loss_from_features``, so micro-batch features concatenate for
exact gradient accumulation.

Locked-tower feature caching (``data.feature_cache``): a batch may carry ``image_prefix`` (the
image tower's ``frozen_prefix`` output) instead of ``image``, and ``text_prefix`` next to the
token ids; ``features`` then runs only the towers' ``trainable_suffix`` (the same code as the
uncached forward).

Remaining differences from the reference code (OpenCLIP's ``ClipLoss`` and training loop for
CLIP, big_vision's sigmoid loss for SigLIP; the losses are tested against naive references from
the papers in ``tests/test_contrastive.py``): none in the losses, the scale/bias, their
initialisation or the clamp; ``clip_vitb16`` / ``siglip_vitb16`` train in bf16 where
OpenCLIP's default is fp16 AMP (``train.precision=fp16``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from finegrain.data.collate import ContrastiveCollate
from finegrain.encoders.base import build_image_tower, build_text_tower
from finegrain.heads.projection import Projection
from finegrain.methods.base import Method, MethodConfig
from finegrain.methods.objectives import ClipObjective, Objectives, SigmoidObjective
from finegrain.methods.vocab import l2
from finegrain.registry import METHODS


@dataclass
class CLIPConfig(MethodConfig):
    name: str = "clip"
    projection: Literal["linear", "none"] = "linear"  # none: towers' width must equal embed_dim
    local_loss: bool = True  # each rank: its rows vs all columns (O(B N) memory)
    gather: bool = True  # negatives from all ranks (gathered with gradient)


@dataclass
class SigLIPConfig(MethodConfig):
    name: str = "siglip"
    projection: Literal["linear", "none"] = "linear"
    init_logit_scale: float = 10.0  # t at init
    init_logit_bias: float = -10.0  # b at construction (SigLIP Sec. 3.2)
    # "prior": the first training forward sets b to -ln(B - 1) at the joined batch size B;
    # "fixed": b starts at init_logit_bias as released (siglip_vitb16)
    logit_bias_init: Literal["prior", "fixed"] = "prior"
    max_logit_scale: float = 0.0  # big_vision does not clamp; > 0 clamps t <= this
    num_captions: int = 1  # K > 1: multi-positive sigmoid loss over `texts` (B, K, L)
    exchange: Literal["ring", "gather"] = "ring"  # ring: big_vision chunked


class DualEncoder(Method):
    """Towers + projections + the Method contract shared by CLIP and SigLIP."""

    Config = CLIPConfig
    num_captions = 1
    supports_feature_cache = True  # features() reads image_prefix / text_prefix

    def __init__(self, cfg: CLIPConfig | SigLIPConfig) -> None:
        super().__init__(cfg)
        self.image = build_image_tower(cfg.image)
        self.text = build_text_tower(cfg.text)
        self.image_proj = Projection(
            self.image.width, cfg.embed_dim, cfg.projection, where="image tower"
        )
        self.text_proj = Projection(
            self.text.width, cfg.embed_dim, cfg.projection, where="text tower"
        )
        # open_clip towers keep their pretrained projections: start from them when they fit
        self.image_proj.init_from(getattr(self.image, "pretrained_proj", None))
        self.text_proj.init_from(getattr(self.text, "pretrained_proj", None))
        self.make_temperature(*self._bias_init(cfg))  # self.logit_scale (s = ln t), logit_bias

    @staticmethod
    def _bias_init(cfg: CLIPConfig | SigLIPConfig) -> tuple[float | None, bool]:
        """(b at construction or None for no bias, whether the first batch sets b's prior)."""
        return None, False

    # ---- encoders -------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_proj(self.image(images).pooled)  # (B, E)
        return l2(x) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        lead = tokens.shape[:-1]  # (B,) or (B, K)
        x = self.text_proj(self.text(tokens.reshape(-1, tokens.shape[-1])).pooled)  # (B*K, E)
        x = x.reshape(*lead, -1)
        return l2(x) if normalize else x

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, E, h, w): patch tokens through the image projection (not normalised).

        For a CLS-trained CLIP/SigLIP this is the naive MaskCLIP-style dense feature (Zhou et
        al. 2022 use the value path of the last block; we use the final patch tokens): the
        patches were never trained to align with text, so expect coarse segmentation."""
        out = self.image(images)
        return out.token_map(self.image_proj(out.tokens))  # (B, N, E) -> (B, E, h, w)

    # ---- training -------------------------------------------------------------------
    def make_collate(self, train: bool = True) -> ContrastiveCollate:
        return ContrastiveCollate(self.text.tokenizer, self.num_captions, train=train)

    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        key = "texts" if self.num_captions > 1 else "text"
        if key not in batch:
            raise ValueError(
                f"method '{self.cfg.name}' needs batch['{key}']; got keys {sorted(batch)}"
            )
        if "text_prefix" in batch:  # cached frozen bottom: (B[, K], L, D)
            ids = batch[key]
            h = batch["text_prefix"].reshape(-1, *batch["text_prefix"].shape[-2:])
            pooled = self.text.trainable_suffix(h, ids.reshape(-1, ids.shape[-1])).pooled
            text = l2(self.text_proj(pooled).reshape(*ids.shape[:-1], -1))  # (B[, K], E)
        else:
            text = self.encode_text(batch[key])  # (B, E) or (B, K, E)
        if "image_prefix" in batch:  # cached frozen bottom of the image tower
            image = l2(self.image_proj(self.image.trainable_suffix(batch["image_prefix"]).pooled))
        else:
            image = self.encode_image(batch["image"])
        return {"image": image, "text": text}


@METHODS.register("clip")
class CLIP(DualEncoder):
    """CLIP: softmax InfoNCE over image-text pairs (Radford et al. 2021, Fig. 3)."""

    Config = CLIPConfig

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__(cfg)
        self.objectives = Objectives([(ClipObjective(cfg.local_loss, cfg.gather), {})])


@METHODS.register("siglip")
class SigLIP(DualEncoder):
    """SigLIP: pairwise sigmoid loss (Zhai et al. 2023, Eq. 1); multi-positive with K captions."""

    Config = SigLIPConfig

    def __init__(self, cfg: SigLIPConfig) -> None:
        if cfg.num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {cfg.num_captions}")
        super().__init__(cfg)
        self.num_captions = cfg.num_captions
        self.objectives = Objectives([(SigmoidObjective(cfg.exchange), {})])

    @staticmethod
    def _bias_init(cfg: CLIPConfig | SigLIPConfig) -> tuple[float | None, bool]:
        return cfg.init_logit_bias, cfg.logit_bias_init == "prior"

"""The method contract: every training objective is a ``Method`` registered by name.

The trainer only ever calls:
- ``forward(batch) -> MethodOutput`` (== ``loss_from_features(features(batch))``);
- ``features(batch) -> dict[str, Tensor]`` and ``loss_from_features(feats)``, which split the
  forward so the trainer can do *exact* gradient accumulation for contrastive losses: every
  tensor in ``feats`` has the batch as its leading dim (pad ragged things), so micro-batch
  features can be concatenated along dim 0;
- ``param_groups(weight_decay)``, ``after_optimizer_step(step)``, ``make_collate(train)``.
Evaluation calls ``encode_image``, ``encode_text``, ``tokenize``, and where a method supports
them ``score_features`` (text-conditioned scoring) and ``dense_features`` (segmentation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from finegrain.config import Checked
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.outputs import MethodOutput
from finegrain.registry import METHODS


@dataclass
class MethodConfig(Checked):
    """Fields every method has; methods subclass this with their own fields."""

    __registry__ = METHODS

    name: str = "clip"
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 128


# Parameters whose names contain one of these never get weight decay (norms, biases, logit
# scale/bias, position/token embeddings, learned queries), as in CLIP/OpenCLIP and the papers.
NO_DECAY_KEYS = ("bias", "norm", "ln_", "logit_scale", "logit_bias", "embed", "cls_token",
                 "pos", "query", "queries", "gamma", "scale")


class Method(nn.Module):
    """Base class. Subclasses set ``Config`` and implement ``features`` and
    ``loss_from_features``; everything else has a sensible default."""

    Config: type[MethodConfig] = MethodConfig

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__()
        self.cfg = cfg

    # ---- training -------------------------------------------------------------------
    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss_from_features(self, feats: dict[str, torch.Tensor]) -> MethodOutput:
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> MethodOutput:
        return self.loss_from_features(self.features(batch))

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim < 2 or any(k in name for k in NO_DECAY_KEYS):
                no_decay.append(p)
            else:
                decay.append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def after_optimizer_step(self, step: int) -> None:
        """Hook for EMA teachers, clamping, etc. Called after every optimizer step."""

    def make_collate(self, train: bool = True) -> Callable[[list[dict]], dict[str, Any]]:
        """A picklable collate turning schema samples into this method's batch."""
        raise NotImplementedError

    # ---- inference ------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def image_features_for_scoring(self, images: torch.Tensor) -> Any:
        """Whatever ``score_features`` needs from images (default: global embeddings)."""
        return self.encode_image(images)

    def text_features_for_scoring(self, tokens: torch.Tensor) -> Any:
        return self.encode_text(tokens)

    def score_features(self, image_feats: Any, text_feats: Any) -> torch.Tensor:
        """(Ni, Nt) similarity; text-conditioned methods override this."""
        return image_feats @ text_feats.t()

    @property
    def has_conditioned_score(self) -> bool:
        return type(self).score_features is not Method.score_features

    def score(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(Ni, Nt) similarity of every image with every text."""
        return self.score_features(
            self.image_features_for_scoring(images), self.text_features_for_scoring(tokens)
        )

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) per-patch features in the text embedding space (segmentation)."""
        raise NotImplementedError(f"method '{self.cfg.name}' has no dense_features")

    def region_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) normalized region embeddings, for methods with region queries."""
        raise NotImplementedError(f"method '{self.cfg.name}' has no region embeddings")

    @property
    def has_regions(self) -> bool:
        return type(self).region_embeddings is not Method.region_embeddings


def build_method(cfg: MethodConfig) -> Method:
    return METHODS.get(cfg.name)(cfg)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)

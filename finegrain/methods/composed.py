"""Composed methods: towers + pooling/heads + a weighted list of objectives (#28 item 6).

The six papers' methods are presets of ``finegrain.methods.objectives`` (each file lists its
objectives); this file combines the same objectives and heads into recipes no paper defines:

- ``flair_grain``: FLAIR's K sub-captions, text-conditioned pooling (L_tcs) and multi-positive
  loss (L_mps) together with GRAIN's region queries, box losses and region-description loss;
- ``clippy_recon``: CLIPpy's max pooling over projected patch tokens with DetailCLIP's MAE
  pixel reconstruction of the patches removed from the image tower's input (no teacher: the
  keep set is drawn per sample from its seed, as CLIPpy's token sub-sampling).

Parts, built only where an objective needs them: ``image``/``text`` towers, ``image_proj``
(tower width -> E, for the global embedding and the patch tokens), ``text_proj``; ``pooling``
(``tcs``); ``decoder`` + ``region_proj`` (``regions``, GRAIN's ``RegionDecoder``);
``pixel_decoder`` + ``pixel_head`` (``recon``). The global image embedding is the projected
CLS token (``pooling="cls"``) or the max over the projected patch tokens (``"max"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from finegrain.data.collate import ContrastiveCollate, caption_candidates
from finegrain.encoders.base import build_image_tower, build_text_tower, num_kept
from finegrain.heads.pixel_decoder import MAEDecoder, PixelHead
from finegrain.heads.pooling import TextConditionedPooling, max_pool
from finegrain.heads.projection import Projection
from finegrain.heads.region_decoder import RegionDecoder
from finegrain.heads.token_removal import removed_from_keep
from finegrain.losses.matching import box_cxcywh_to_xyxy
from finegrain.losses.reconstruction import norm_pix_target, patchify
from finegrain.methods.base import Method, MethodConfig
from finegrain.methods.clippy import sample_keep, tower_patch_size
from finegrain.methods.flair import FLAIRCollate, caption_pool
from finegrain.methods.grain import WEIGHTINGS, GRAINCollate
from finegrain.methods.objectives import (
    ClipObjective,
    MultiPositiveObjective,
    Objective,
    Objectives,
    ReconstructionObjective,
    RegionObjective,
    SigmoidObjective,
    TextConditionedObjective,
)
from finegrain.methods.vocab import l2
from finegrain.registry import METHODS

OBJECTIVES = ("clip", "siglip", "tcs", "mps", "regions", "recon")
MULTI_CAPTION = ("tcs", "mps")  # objectives over K sub-captions (``texts``)
SIGMOID = ("siglip", "tcs", "mps")  # objectives with a logit bias


@dataclass
class ComposedConfig(MethodConfig):
    name: str = "composed"
    pooling: Literal["cls", "max"] = "cls"  # global image embedding: CLS or CLIPpy's max
    objectives: list[str] = field(default_factory=lambda: ["clip"])
    weights: list[float] = field(default_factory=list)  # per objective (empty: all 1)
    # sub-captions (tcs, mps): FLAIR's sampling
    num_subcaptions: int = 4
    max_sentences: int = 2
    pool_heads: int = 4
    init_logit_bias: float = -10.0  # sigmoid objectives; "prior": -ln(B - 1) at the first step
    logit_bias_init: Literal["prior", "fixed"] = "prior"
    # regions: GRAIN's decoder and its released term weights (box L1, GIoU 1.5, region 1)
    num_region_queries: int = 4
    decoder_width: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 4
    # recon: DetailCLIP's light decoder on the kept patches
    keep_ratio: float = 0.5
    recon_depth: int = 1
    recon_heads: int = 4
    norm_pix_loss: bool = True


def check_composed(cfg: ComposedConfig) -> None:
    bad = [o for o in cfg.objectives if o not in OBJECTIVES]
    if bad or not cfg.objectives or len(set(cfg.objectives)) != len(cfg.objectives):
        raise ValueError(f"method.objectives={cfg.objectives}: list each of "
                         f"{', '.join(OBJECTIVES)} at most once (at least one)")  # fmt: skip
    if cfg.weights and len(cfg.weights) != len(cfg.objectives):
        raise ValueError(f"method.weights has {len(cfg.weights)} values for "
                         f"{len(cfg.objectives)} objectives; give one per objective or none")  # fmt: skip
    if not 0.0 < cfg.keep_ratio < 1.0:
        raise ValueError(f"method.keep_ratio must be in (0, 1), got {cfg.keep_ratio}")


def composed_objectives(cfg: ComposedConfig) -> Objectives:
    """The configured objectives with their weights (a multi-term objective's weight scales
    each of its terms; ``regions`` inside: GRAIN's released 1.5 / 1.5 / 1)."""
    _, w_l1, w_giou, w_rd = WEIGHTINGS["released"]
    terms = {"clip": ("clip_loss",), "siglip": ("siglip_loss",), "tcs": ("tcs_loss",),
             "mps": ("mps_loss",), "recon": ("recon_loss",),
             "regions": ("box_l1_loss", "box_giou_loss", "region_loss")}  # fmt: skip
    inner = {"box_l1_loss": w_l1, "box_giou_loss": w_giou, "region_loss": w_rd}
    items: list[tuple[Objective, dict[str, float]]] = []
    for i, name in enumerate(cfg.objectives):
        w = cfg.weights[i] if cfg.weights else 1.0
        objective: Objective = {
            "clip": ClipObjective, "siglip": SigmoidObjective,
            "tcs": TextConditionedObjective, "mps": MultiPositiveObjective,
            "regions": RegionObjective, "recon": ReconstructionObjective,
        }[name]()  # fmt: skip
        items.append((objective, {t: w * inner.get(t, 1.0) for t in terms[name]}))
    return Objectives(items)


class ComposedCollate:
    """Picklable: the caption collate (FLAIR's sub-captions or one caption), plus GRAIN's
    region fields and a per-sample ``keep`` (B, M) where the objectives need them."""

    def __init__(self, method: ComposedMethod, train: bool) -> None:
        c, tok = method.cfg, method.text.tokenizer
        self.multi = method.multi_caption
        self.captions = (FLAIRCollate(tok, c.num_subcaptions, c.max_sentences, "diverse", "auto")
                         if self.multi else ContrastiveCollate(tok, 1, train=train))  # fmt: skip
        regions = "regions" in c.objectives
        self.regions = (
            GRAINCollate(tok, c.num_region_queries, "alt", int(method.text.pad_id))
            if regions
            else None
        )
        self.keep = (
            (method.num_patches, num_kept(method.num_patches, c.keep_ratio))
            if method.recon
            else None
        )

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        has = caption_pool if self.multi else caption_candidates
        samples = [s for s in samples if has(s)] or samples  # the collate names an empty batch
        batch = self.captions(samples)
        if self.regions is not None:
            extra = self.regions(samples)
            batch.update({k: extra[k] for k in ("boxes", "region_mask", "region_text")})
        if self.keep is not None:
            n, m = self.keep
            batch["keep"] = torch.tensor([sample_keep(s.get("seed", 0), n, m) for s in samples])
        return batch


class ComposedMethod(Method):
    """Towers + pooling/heads + ``composed_objectives`` (see module docstring)."""

    Config = ComposedConfig
    in_default_benchmark = False  # a recipe no paper defines: ``finegrain demo --methods``

    def __init__(self, cfg: ComposedConfig) -> None:
        check_composed(cfg)
        super().__init__(cfg)
        self.image = build_image_tower(cfg.image)
        self.text = build_text_tower(cfg.text)
        e, width = cfg.embed_dim, self.image.width
        self.image_proj = Projection(width, e, where="image tower")
        self.text_proj = Projection(self.text.width, e, where="text tower")
        used = set(cfg.objectives)
        self.multi_caption, self.recon = bool(used & set(MULTI_CAPTION)), "recon" in used
        if "tcs" in used:
            self.pooling = TextConditionedPooling(e, heads=cfg.pool_heads)
        if "regions" in used:
            w = cfg.decoder_width
            self.decoder = RegionDecoder(width, w, cfg.decoder_depth, cfg.decoder_heads,
                                         cfg.num_region_queries, 2 * w, 0.0, 3)  # fmt: skip
            self.region_proj = Projection(w, e)
        self.num_patches = self._recon_heads(cfg) if self.recon else 0
        bias = cfg.init_logit_bias if used & set(SIGMOID) else None
        self.make_temperature(bias, bias_prior=bias is not None and cfg.logit_bias_init == "prior")
        self.objectives = composed_objectives(cfg)

    def _recon_heads(self, cfg: ComposedConfig) -> int:
        """The pixel decoder and head; returns the number of patches of the input grid."""
        self.patch = tower_patch_size(self.image)
        if self.patch is None or not hasattr(self.image, "num_patches"):
            raise ValueError(f"objective 'recon' needs a ViT image tower that takes keep= "
                             f"(token subsets); '{cfg.image.name}' has none")  # fmt: skip
        self.pixel_decoder = MAEDecoder(self.image.width, cfg.recon_depth, cfg.recon_heads)
        self.pixel_head = PixelHead(self.image.width, self.patch)
        gh, gw = self.image.num_patches((cfg.image.image_size, cfg.image.image_size))
        return gh * gw

    def capabilities(self) -> frozenset[str]:
        """Text-conditioned scoring and attention maps with ``tcs``, regions and boxes with
        ``regions``: the hooks below exist on the class, the objectives decide."""
        used = set(self.cfg.objectives)
        drop = set() if "tcs" in used else {"score_features", "attention_maps"}
        drop |= set() if "regions" in used else {"region_embeddings", "predict_boxes"}
        return super().capabilities() - drop

    # ---- encoders ---------------------------------------------------------------------
    def _image(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> tuple:
        """(tower output, global embedding (B, E) not normalised, projected tokens (B, N, E))."""
        out = self.image(images) if keep is None else self.image(images, keep=keep)
        tokens = self.image_proj(out.tokens)
        pooled = max_pool(tokens) if self.cfg.pooling == "max" else self.image_proj(out.pooled)
        return out, pooled, tokens

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self._image(images)[1]
        return l2(x) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_proj(self.text(tokens).pooled)  # (N, E)
        return l2(x) if normalize else x

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.image(images)
        return out.token_map(self.image_proj(out.tokens))  # (B, E, h, w)

    def image_features_for_scoring(self, images: torch.Tensor) -> Any:
        return self._image(images)[2] if "tcs" in self.cfg.objectives else self.encode_image(images)

    def text_features_for_scoring(self, tokens: torch.Tensor) -> Any:
        return self.encode_text(tokens, normalize="tcs" not in self.cfg.objectives)

    def score_features(self, image_feats: Any, text_feats: Any) -> torch.Tensor:
        """FLAIR's cos(pool(text | image), text) with ``tcs``, else the cosine."""
        if "tcs" not in self.cfg.objectives:
            return image_feats @ text_feats.t()
        return self.pooling.similarity(text_feats, image_feats, 2**25)

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        out, _, patches = self._image(images)
        text = self.encode_text(tokens, normalize=False)
        q = text.unsqueeze(0).expand(patches.shape[0], *text.shape)
        h, w = out.grid_hw
        att = self.pooling.attention_weights(q, patches)[..., : h * w]
        return att.reshape(att.shape[0], att.shape[1], h, w)

    def _decode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.image(images)
        return self.decoder(torch.cat([out.pooled.unsqueeze(1), out.tokens], dim=1))

    def region_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return l2(self.region_proj(self._decode(images)["regions"]))

    def predict_boxes(self, images: torch.Tensor) -> torch.Tensor:
        return box_cxcywh_to_xyxy(self._decode(images)["boxes"][-1])

    # ---- training ---------------------------------------------------------------------
    def make_collate(self, train: bool = True) -> ComposedCollate:
        return ComposedCollate(self, train)

    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The vocabulary's features the objectives declare (``Objectives.features``)."""
        keep = batch.get("keep") if self.recon else None
        if self.recon and keep is None:
            raise ValueError(f"objective 'recon' needs batch['keep'] from the method's collate; "
                             f"got keys {sorted(batch)}")  # fmt: skip
        images = batch["image"]
        out, pooled, tokens = self._image(images, keep)
        feats = {"image": l2(pooled), "image_tokens": tokens}
        if self.multi_caption:
            ids = batch["texts"]  # (B, K, L)
            b, k, length = ids.shape
            texts = self.encode_text(ids.reshape(b * k, length), normalize=False).view(b, k, -1)
            feats.update(texts=texts, text=l2(texts[:, 0]), pair_seed=batch["pair_seed"])
        else:
            feats["text"] = self.encode_text(batch["text"])
        if "regions" in self.cfg.objectives:
            feats.update(self._region_features(out, batch, images.dtype))
        if self.recon:
            feats.update(self._recon_features(out, images, keep))
        return feats

    def _region_features(self, out: Any, batch: dict[str, Any], dtype: torch.dtype) -> dict:
        dec = self.decoder(torch.cat([out.pooled.unsqueeze(1), out.tokens], dim=1))
        mask, rt = batch["region_mask"].bool(), batch["region_text"]  # (B, R), (B, R, L)
        desc = torch.zeros(*mask.shape, self.cfg.embed_dim, device=rt.device, dtype=dtype)
        if mask.any():
            desc[mask] = self.encode_text(rt[mask]).to(desc.dtype)
        # the global query is GRAIN's image embedding; unused here, kept in the graph (DDP)
        regions = l2(self.region_proj(dec["regions"])) + 0.0 * dec["global"].sum()
        return {"regions": regions, "pred_boxes": dec["boxes"].transpose(0, 1),
                "descriptions": desc, "boxes": batch["boxes"].to(dec["boxes"].dtype),
                "region_mask": mask, "region_text": rt}  # fmt: skip

    def _recon_features(self, out: Any, images: torch.Tensor, keep: torch.Tensor) -> dict:
        removed = removed_from_keep(keep, self.num_patches)  # (B, R)
        enc = torch.cat([out.pooled[:, None], out.tokens], dim=1)  # (B, 1 + M, D)
        dec = _gather(self.pixel_decoder(enc, keep, out.grid_hw)[:, 1:], removed)  # (B, R, D)
        target = _gather(patchify(images, self.patch), removed)  # (B, R, p*p*3)
        if self.cfg.norm_pix_loss:
            target = norm_pix_target(target)
        return {"pixels": self.pixel_head(dec), "pixel_target": target}


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (B, R) -> (B, R, D)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


@dataclass
class FlairGrainConfig(ComposedConfig):
    name: str = "flair_grain"
    objectives: list[str] = field(default_factory=lambda: ["tcs", "mps", "regions"])
    weights: list[float] = field(default_factory=lambda: [0.5, 0.5, 1.0])


@dataclass
class ClippyReconConfig(ComposedConfig):
    name: str = "clippy_recon"
    pooling: Literal["cls", "max"] = "max"
    objectives: list[str] = field(default_factory=lambda: ["clip", "recon"])


@METHODS.register("flair_grain")
class FlairGrain(ComposedMethod):
    """FLAIR's text-conditioned pooling + multi-positive loss with GRAIN's region queries."""

    Config = FlairGrainConfig


@METHODS.register("clippy_recon")
class ClippyRecon(ComposedMethod):
    """CLIPpy's max pooling with DetailCLIP's pixel reconstruction of removed patches."""

    Config = ClippyReconConfig

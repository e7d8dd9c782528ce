"""GRAIN (Halbe et al., "Grounding Descriptions in Images informs Zero-Shot Visual Recognition",
arXiv 2412.04429; code shaunak27/grain-clip).

Model: every image token (CLS + patches, after the ViT's final norm) is projected and used as
memory of a DETR-style pre-norm decoder (``finegrain.heads.region_decoder``) with ``Q`` learned
region queries and one global query. The global query gives the image embedding, the region
queries give region embeddings and (through a 3-layer MLP + sigmoid) boxes.

Loss (paper: ``L_total = L_ic + L_box + L_rd``):

- ``L_ic`` global image-caption InfoNCE, gathered across ranks (``clip_loss``);
- ``L_box`` = w_l1 * L1 + w_giou * (1 - GIoU) over Hungarian-matched pairs (cost
  5 * L1 - 2 * GIoU), each normalised by the number of target boxes;
- ``L_rd`` region-to-description InfoNCE of matched regions against every description in the
  batch (``finegrain.losses.region``), scaled by the CLIP logit scale (as the released code).

Where the released code and the paper text differ, the default follows the code and the
paper is an option (``GRAINConfig``):

- ``weighting="released"``: the code's ``compute_box_loss`` divides the weighted box sum by
  ``len(weight_dict) / 3``, i.e. the box terms get weight 1.5 each; ``"paper"`` uses 1/1;
  ``"custom"`` uses the ``*_weight`` fields as given;
- ``aux_loss=False``: the code computes per-layer box losses and then drops them (their keys
  are not in ``weight_dict``); ``True`` adds them (DETR's auxiliary decoding losses);
- ``num_boxes_over_ranks=False`` (default, as the code: ``SetCriterion.forward`` normalises
  by the local box count, its DETR all_reduce is commented out; we clamp it to >= 1 where the
  code would divide by 0); ``True`` averages the count over ranks as DETR does;
- ``region_dedup=False`` (default, as the code: ``WordContrastiveLoss`` treats identical
  descriptions of other slots as negatives); ``True`` keeps them out of each other's
  negatives; ``region_symmetric`` / ``region_gather`` default off as in the code;
- the paper's composition ``L_ic + L_box + L_rd`` with unit box weights:
  ``method.weighting=paper`` (with ``aux_loss=True``, every intermediate decoder layer adds
  its own matched box terms at the final layer's weights, DETR's auxiliary losses; the
  released ``/(len(weight_dict)/3)`` factor is kept as the constant 1.5 of its two-key dict);
- weight decay (``train.no_decay="released"``): the decoder's norm weights and region
  queries are decayed, as the code's ``optim_policy`` (see ``GRAIN.no_decay``);
- backbone: the released ``CLIP_VITB16`` is timm's ViT-B/16 with per-head q/k LayerNorm
  (eps 1e-6 everywhere, no ``ln_pre``, patch bias) and OpenAI CLIP's QuickGELU text tower,
  trained at 2 x 8 GPUs x 128 = 2,048 per step; ``grain_vitb16`` builds exactly that (native
  ``vit`` tower with ``qk_norm``; ``finegrain.recipes.grain`` lists what it does not copy:
  the warm-up start and the default-init ViT blocks);
- ``caption="random"``: each sample's caption is the alt-text or an MLLM caption with
  probability 1/2 (the code's ``--is_gala``), drawn from the sample's ``"caption"`` stream
  (``sample_rng``).

Remaining differences from the released code: bf16 in ``grain_vitb16`` (released: fp16 AMP,
``train.precision=fp16``); without an option: the warm-up starts at ``lr / warmup_steps``
(released ``--lr-start`` 1e-6), the ViT blocks start from CLIP's init and the text MLP
biases from 0 (released: PyTorch's defaults; initialisation only), and ``finegrain eval`` resizes and
centre-crops where the released eval squashes (the same on square images). Released
checkpoints load as ``grain:FILE`` (``finegrain.interop.grain``).

Bad input handled in the collate and counted in ``batch["stats"]`` (logged as ``stats/<name>``,
totals in summary.json): zero-area boxes are dropped (``dropped_boxes``); images with more than ``Q`` regions keep the ``Q`` highest-scoring ones
(``truncated_regions``; the released loader does the same top-k by detector score); images
with zero regions contribute only to ``L_ic``; descriptions longer than the context are
truncated by the tokenizer. The collate also counts ``regions`` (kept) and
``images_without_regions``; the loss counts ``target_boxes`` and ``matched_boxes``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

import torch

from finegrain.data.collate import add_stats, stack_images
from finegrain.data.schema import sample_rng
from finegrain.encoders.base import build_image_tower, build_text_tower
from finegrain.heads.projection import Projection
from finegrain.heads.region_decoder import RegionDecoder
from finegrain.losses.matching import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from finegrain.methods.base import Method, MethodConfig
from finegrain.methods.objectives import ClipObjective, Objectives, RegionObjective
from finegrain.methods.vocab import l2
from finegrain.registry import METHODS

WEIGHTINGS = {"released": (1.0, 1.5, 1.5, 1.0), "paper": (1.0, 1.0, 1.0, 1.0)}
CAPTION_MODES = ("random", "alt", "mllm")
GRAIN_DECODER_NO_DECAY_KEYS = (".ln_", ".bn", ".bias", ".logit_scale", ".entropy_scale")


@dataclass
class GRAINConfig(MethodConfig):
    name: str = "grain"
    embed_dim: int = 512
    num_region_queries: int = 5  # Q; the batch keeps the top-Q regions by score
    decoder_width: int = 512
    decoder_depth: int = 6
    decoder_heads: int = 8
    decoder_ffn_dim: int = 2048
    decoder_dropout: float = 0.1
    box_mlp_layers: int = 3
    cost_l1: float = 5.0  # Hungarian matching cost weights (released matcher)
    cost_giou: float = 2.0
    weighting: Literal["released", "paper", "custom"] = "released"  # custom: the *_weight fields
    global_weight: float = 1.0
    box_l1_weight: float = 1.5
    box_giou_weight: float = 1.5
    region_weight: float = 1.0
    aux_loss: bool = False  # box losses on every intermediate decoder layer
    num_boxes_over_ranks: bool = False  # released: local count (DETR: mean over ranks)
    region_dedup: bool = False  # released: identical descriptions are negatives
    region_symmetric: bool = False
    region_gather: bool = False
    caption: Literal["random", "alt", "mllm"] = "random"  # random: --is_gala
    # init_logit_scale 1/0.07, max_logit_scale 100 (released code: s <= 4.6052 = ln 100)


def loss_weights(cfg: GRAINConfig) -> tuple[float, float, float, float]:
    """(global, box L1, box GIoU, region) weights for ``cfg.weighting``."""
    if cfg.weighting == "custom":
        return cfg.global_weight, cfg.box_l1_weight, cfg.box_giou_weight, cfg.region_weight
    return WEIGHTINGS[cfg.weighting]


def choose_caption(sample: dict[str, Any], mode: str, rng: random.Random) -> str:
    """Alt-text or an MLLM caption (``captions`` / ``long_caption``), as GRAIN's ``--is_gala``."""
    alt = str(sample.get("caption") or "")
    mllm = [c for c in list(sample.get("captions") or []) + [sample.get("long_caption") or ""] if c]
    if mode == "alt" or not mllm:
        return alt or (mllm[0] if mllm else "")
    if mode == "mllm" or not alt:
        return rng.choice(mllm)
    return rng.choice([alt, rng.choice(mllm)])


def select_regions(
    regions: list[dict[str, Any]], max_regions: int
) -> tuple[list[str], list[list[float]], int, int]:
    """Valid regions (positive area, clipped to the image), top ``max_regions`` by score.

    Returns (texts, xyxy boxes, dropped zero-area count, truncated count).
    """
    kept, dropped = [], 0
    for r in regions or []:
        box = [min(max(float(v), 0.0), 1.0) for v in r.get("box", [])]
        text = str(r.get("text") or "")
        if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1] or not text:
            dropped += 1
            continue
        kept.append((float(r.get("score", 1.0)), text, box))
    kept.sort(key=lambda x: -x[0])  # stable: equal scores keep annotation order
    truncated = max(0, len(kept) - max_regions)
    kept = kept[:max_regions]
    return [k[1] for k in kept], [k[2] for k in kept], dropped, truncated


class GRAINCollate:
    """Picklable collate: schema samples -> GRAIN batch (see docs/CONTRACTS.md)."""

    def __init__(self, tokenizer: Any, max_regions: int, caption: str, pad_id: int = 0) -> None:
        if caption not in CAPTION_MODES:
            raise ValueError(
                f"unknown caption mode '{caption}'; valid choices: {', '.join(CAPTION_MODES)}"
            )
        self.tokenizer, self.max_regions, self.caption, self.pad_id = (
            tokenizer,
            max_regions,
            caption,
            pad_id,
        )

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        b, r = len(samples), self.max_regions
        captions, texts, slots = [], [], []
        boxes = torch.zeros(b, r, 4)
        mask = torch.zeros(b, r, dtype=torch.bool)
        dropped = truncated = empty = 0
        for i, s in enumerate(samples):
            rng = sample_rng(s.get("seed", 0), "caption")
            captions.append(choose_caption(s, self.caption, rng))
            t, bx, n_dropped, n_truncated = select_regions(s.get("regions") or [], r)
            dropped, truncated = dropped + n_dropped, truncated + n_truncated
            empty += not t
            if t:
                boxes[i, : len(t)] = box_xyxy_to_cxcywh(torch.tensor(bx))
                mask[i, : len(t)] = True
                texts += t
                slots += [(i, j) for j in range(len(t))]
        text = self.tokenizer(captions)  # (B, L)
        region_text = torch.full((b, r, text.shape[1]), self.pad_id, dtype=text.dtype)
        if texts:
            tok = self.tokenizer(texts)  # (M, L), truncated to the context by the tokenizer
            idx = torch.tensor(slots)
            region_text[idx[:, 0], idx[:, 1]] = tok
        batch = {
            "image": stack_images(samples),
            "text": text,
            "boxes": boxes,
            "region_mask": mask,
            "region_text": region_text,
        }
        if all("label" in s for s in samples):
            batch["labels"] = torch.tensor([int(s["label"]) for s in samples])
        return add_stats(batch, regions=len(texts), dropped_boxes=dropped,
                         truncated_regions=truncated, images_without_regions=empty)  # fmt: skip


@METHODS.register("grain")
class GRAIN(Method):
    """Global + region-query contrastive pretraining with box supervision (see module doc)."""

    Config = GRAINConfig
    key_renames = (("visual.", "image."),)  # the image tower was ``visual`` before the vocabulary
    # the released eval averages normalised prompt embeddings without renormalising the mean
    zeroshot_class_vectors = "mean"

    def __init__(self, cfg: GRAINConfig) -> None:
        super().__init__(cfg)
        self.weights = loss_weights(cfg)
        self.image = build_image_tower(cfg.image)
        self.text = build_text_tower(cfg.text)
        self.decoder = RegionDecoder(
            self.image.width, cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads,
            cfg.num_region_queries, cfg.decoder_ffn_dim, cfg.decoder_dropout, cfg.box_mlp_layers,
        )  # fmt: skip
        w, tw, d = cfg.decoder_width, self.text.width, cfg.embed_dim
        # initial weights drawn as the released (width, D) matrices ``x @ P``: same draws as before
        self.image_proj = Projection(w, d, weight=(torch.randn(w, d) * w**-0.5).t())
        self.region_proj = Projection(w, d, weight=(torch.randn(w, d) * w**-0.5).t())
        self.text_proj = Projection(tw, d, weight=(torch.randn(tw, d) * tw**-0.5).t())
        self.make_temperature()
        self.objectives = grain_objectives(cfg)

    def migrate_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """Also checkpoints from before ``Projection``: ``image_proj`` etc. were (width, D)
        matrices ``x @ P``."""
        state = super().migrate_state_dict(state)
        for name in ("image_proj", "region_proj", "text_proj"):
            if name in state and name + ".weight" not in state:
                state[name + ".weight"] = state.pop(name).t()
        return state

    # ---- encoders ---------------------------------------------------------------------
    def _decode(self, images: torch.Tensor, return_all: bool = False) -> dict[str, torch.Tensor]:
        out = self.image(images)
        tokens = torch.cat([out.pooled.unsqueeze(1), out.tokens], dim=1)  # (B, 1+N, C)
        return self.decoder(tokens, return_all=return_all)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_proj(self.text(tokens).pooled)  # (B, D)
        return l2(x) if normalize else x

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_proj(self._decode(images)["global"])  # (B, D)
        return l2(x) if normalize else x

    def region_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) normalised region-query embeddings."""
        return l2(self.region_proj(self._decode(images)["regions"]))

    def predict_boxes(self, images: torch.Tensor) -> torch.Tensor:
        """(B, Q, 4) final-layer boxes as normalised xyxy."""
        return box_cxcywh_to_xyxy(self._decode(images)["boxes"][-1])

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w): patch tokens through the decoder's memory projection and image_proj."""
        out = self.image(images)
        mem = self.decoder.memory_norm(self.decoder.proj(out.tokens))  # (B, N, W)
        return out.token_map(l2(self.image_proj(mem)))  # (B, N, D) -> (B, D, h, w)

    def make_collate(self, train: bool = True) -> GRAINCollate:
        mode = self.cfg.caption if train else "alt"
        return GRAINCollate(
            self.text.tokenizer, self.cfg.num_region_queries, mode, int(self.text.pad_id)
        )

    def no_decay(self, name: str, p: torch.Tensor, rule: str) -> bool:
        """Released rule (grain-clip ``utils/train_utils.optim_policy``): the CLIP backbone
        (towers, text projection, logit scale) follows OpenCLIP's rule, but the decoder
        model is split by name only, so its norm weights and region queries ARE decayed and
        only biases (and ".ln_", ".bn", ".logit_scale" names) are not."""
        if rule == "released" and name.startswith(("decoder.", "image_proj.", "region_proj.")):
            return any(k in name for k in GRAIN_DECODER_NO_DECAY_KEYS)
        return super().no_decay(name, p, rule)

    # ---- training ---------------------------------------------------------------------
    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        dec = self._decode(batch["image"], return_all=self.cfg.aux_loss)
        mask = batch["region_mask"].bool()  # (B, R)
        rt = batch["region_text"]  # (B, R, L)
        b, r, length = rt.shape
        desc = torch.zeros(b, r, self.cfg.embed_dim, device=rt.device, dtype=dec["global"].dtype)
        if mask.any():  # only real descriptions go through the text tower
            desc[mask] = self.encode_text(rt[mask]).to(desc.dtype)
        return {
            "image": l2(self.image_proj(dec["global"])),  # (B, D)
            "text": self.encode_text(batch["text"]),  # (B, D)
            "regions": l2(self.region_proj(dec["regions"])),  # (B, Q, D)
            "pred_boxes": dec["boxes"].transpose(0, 1),  # (B, L, Q, 4) cxcywh
            "descriptions": desc,  # (B, R, D)
            "boxes": batch["boxes"].to(dec["boxes"].dtype),  # (B, R, 4) cxcywh
            "region_mask": mask,
            "region_text": rt,
        }


def grain_objectives(cfg: GRAINConfig) -> Objectives:
    """Global InfoNCE, then the region objective (boxes, descriptions), weighted by
    ``cfg.weighting``; the auxiliary box terms share the final layer's box weights."""
    w_g, w_l1, w_giou, w_rd = loss_weights(cfg)
    region = RegionObjective(cfg.cost_l1, cfg.cost_giou, aux=cfg.aux_loss,
                             over_ranks=cfg.num_boxes_over_ranks, dedup=cfg.region_dedup,
                             symmetric=cfg.region_symmetric, gather=cfg.region_gather)  # fmt: skip
    weights = {"box_l1_loss": w_l1, "box_giou_loss": w_giou, "region_loss": w_rd,
               "aux_box_l1_loss": w_l1, "aux_box_giou_loss": w_giou}  # fmt: skip
    return Objectives([(ClipObjective(local_loss=True, gather=True), {"clip_loss": w_g}),
                       (region, weights)])  # fmt: skip

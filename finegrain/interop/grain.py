"""GRAIN's training checkpoints (shaunak27/grain-clip ``train.py``) -> the ``grain`` method, for
evaluation.

Spec: ``grain:FILE``. The released code saves ``{"state_dict": ObjDecoder, "backbone_state_dict":
CLIP_VITB16, "epoch", "iteration", "best_acc", "optimizer"}`` (both models DDP-wrapped: keys under
``module.``), read with ``weights_only=True``. No trained checkpoint is published (the
repository's README, checked 2026-12: code and training commands only); the layout is the one
its ``train.py`` writes and its ``evaluate.py --resume`` reads. Layout:

=============================================  ===============================================
released key                                   finegrain ``grain`` key
=============================================  ===============================================
backbone ``visual.*`` (timm ViT, qk_norm)      ``image.*`` (native ``vit``: ``qk_norm``,
                                               ``ln_pre=False, norm_eps=1e-6, patch_bias``)
backbone text (``token_embedding``, ...)       ``text.*`` (native ``transformer``, QuickGELU)
backbone ``text_projection`` (W, E)            ``text_proj.weight`` (E, W), transposed
backbone ``logit_scale``                       ``logit_scale``
backbone ``image_projection``                  dropped: GRAIN's image embedding is the
                                               decoder's global query (``img_proj``)
``proj.weight``                                ``decoder.proj.weight``
``transformer.pre_norm.*``                     ``decoder.memory_norm.*``
``transformer.decoder.layers.i.self_attn.*``   ``decoder.layers.i.self_attn.*``
``...layers.i.multihead_attn.*``               ``decoder.layers.i.cross_attn.*``
``...layers.i.linear1`` / ``linear2``          ``decoder.layers.i.ffn.0`` / ``ffn.3``
``...layers.i.norm1..3``                       ``decoder.layers.i.norm1..3``
``transformer.decoder.norm.*``                 ``decoder.norm.*``
``query_embed.weight`` (Q+1, W), last global   ``decoder.query_embed``
``bbox_embed.layers.i.*``                      ``decoder.box_head.layers.i.*``
``img_proj`` / ``obj_proj`` (W, E)             ``image_proj.weight`` / ``region_proj.weight``
``class_embed``, ``pos_embed``,                dropped (built, never used in the forward)
``temporal_embed``
=============================================  ===============================================

Heads are not stored in the weights: the image tower's come from the q/k norm's size (its
head dim), the text tower's are width / 64 (8 at 512, ``CLIP_VITB16``), the decoder's are the
released ``Cross_Attention`` default, 8. Preprocessing: ImageNet mean/std at the checkpoint's
size (the released ``_transform``); the released eval squashes the image to a square where
``finegrain eval`` resizes and centre-crops (the same on square images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.encoders.timm_keys import timm_vit_to_native
from finegrain.encoders.weights import flat_state_dict, load_into, read_weights
from finegrain.interop import run_config
from finegrain.interop.detailclip import IMAGENET_MEAN, IMAGENET_STD, text_keys
from finegrain.methods.base import build_method
from finegrain.methods.grain import GRAINConfig

DECODER_HEADS = 8  # grain-clip Cross_Attention(nhead=8), as train.py builds it
UNUSED = ("class_embed.", "pos_embed", "temporal_embed")
_LAYER = (("multihead_attn.", "cross_attn."), ("linear1.", "ffn.0."), ("linear2.", "ffn.3."))


def check(backbone: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor]) -> None:
    """One line naming what is missing when the file is not a GRAIN training checkpoint."""
    need = [f"backbone_state_dict.{k}" for k in ("visual.cls_token", "token_embedding.weight",
                                                 "text_projection") if k not in backbone]  # fmt: skip
    need += [f"state_dict.{k}" for k in ("query_embed.weight", "proj.weight", "img_proj",
                                         "obj_proj") if k not in decoder]  # fmt: skip
    if need:
        raise ValueError(f"not a GRAIN (grain-clip train.py) checkpoint: no {need}")


def decoder_keys(decoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released ``ObjDecoder`` state dict in ``grain``'s ``decoder.*`` / projection keys."""
    out = {
        "decoder.query_embed": decoder["query_embed.weight"],
        "image_proj.weight": decoder["img_proj"].t().contiguous(),
        "region_proj.weight": decoder["obj_proj"].t().contiguous(),
    }
    for k, v in decoder.items():
        if k.startswith(UNUSED) or k in ("query_embed.weight", "img_proj", "obj_proj"):
            continue
        if k.startswith("transformer.pre_norm."):
            k = "memory_norm." + k[len("transformer.pre_norm.") :]
        elif k.startswith("transformer.decoder."):
            k = k[len("transformer.decoder.") :]
            for a, b in _LAYER:
                k = k.replace(a, b)
        elif k.startswith("bbox_embed."):
            k = "box_head." + k[len("bbox_embed.") :]
        out["decoder." + k] = v
    return out


def to_finegrain(
    backbone: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Both released state dicts (``module.`` stripped) in ``grain``'s keys."""
    check(backbone, decoder)
    out = {f"image.{k}": v for k, v in timm_vit_to_native(backbone, "visual.").items()}
    out.update(text_keys(backbone, "transformer."))
    out["text_proj.weight"] = backbone["text_projection"].t().contiguous()
    out["logit_scale"] = backbone["logit_scale"].reshape(())
    out.update(decoder_keys(decoder))
    return out


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})


def method_config(
    backbone: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor]
) -> GRAINConfig:
    """The ``grain`` config whose towers and decoder have the checkpoint's shapes."""
    width = int(backbone["visual.cls_token"].shape[-1])
    patch = int(backbone["visual.patch_embed.proj.weight"].shape[-1])
    n = int(backbone["visual.pos_embed"].shape[1]) - 1
    qk = backbone.get("visual.blocks.0.attn.q_norm.weight")
    image = ImageTowerConfig(name="vit", image_size=round(n**0.5) * patch, patch_size=patch,
                             width=width, depth=_count(backbone, "visual.blocks."),
                             heads=width // int(qk.shape[0]) if qk is not None else width // 64,
                             qk_norm=qk is not None, ln_pre=False, norm_eps=1e-6,
                             patch_bias=True, init="timm")  # fmt: skip
    tw = int(backbone["ln_final.weight"].shape[0])
    text = TextTowerConfig(name="transformer", vocab_size=int(backbone["token_embedding.weight"].shape[0]),
                           context_length=int(backbone["positional_embedding"].shape[0]), width=tw,
                           depth=_count(backbone, "transformer.resblocks."), heads=max(1, tw // 64),
                           activation="quick_gelu")  # fmt: skip
    queries, dw = decoder["query_embed.weight"].shape
    return GRAINConfig(image=image, text=text, embed_dim=int(decoder["img_proj"].shape[1]),
                       num_region_queries=int(queries) - 1, decoder_width=int(dw),
                       decoder_depth=_count(decoder, "transformer.decoder.layers."),
                       decoder_heads=DECODER_HEADS,
                       decoder_ffn_dim=int(decoder["transformer.decoder.layers.0.linear1.weight"].shape[0]),
                       box_mlp_layers=_count(decoder, "bbox_embed.layers."))  # fmt: skip


def load(rest: str, strict: bool = True) -> tuple[Any, Any]:
    """``FILE`` -> (grain method, RunConfig)."""
    obj = read_weights(rest)
    backbone = flat_state_dict(obj, rest, "backbone_state_dict")
    decoder = flat_state_dict(obj, rest, "state_dict")
    check(backbone, decoder)
    cfg = method_config(backbone, decoder)
    method = build_method(cfg)
    load_into(method, to_finegrain(backbone, decoder), rest, strict=strict)
    return method.eval(), run_config(cfg, f"grain:{Path(rest).stem}", IMAGENET_MEAN, IMAGENET_STD)

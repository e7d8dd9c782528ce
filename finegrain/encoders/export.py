"""Export a trained image backbone as a timm ``VisionTransformer`` state dict, for dense
downstream protocols run in other frameworks (DetailCLIP Table 3: UperNet on ADE20K in
mmsegmentation, Mask R-CNN on COCO in mmdetection, following BEiT/iBOT's ViT-B/16 setups).

The native ``vit`` tower is OpenAI-CLIP shaped, which timm expresses as
``VisionTransformer(pre_norm=True, class_token=True, global_pool="token", qkv_bias=True)`` with
a bias-free patch embedding and LayerNorm eps 1e-5 (timm's ``vit_*_clip_*`` models); the
layout options map to ``qk_norm``, ``pre_norm=ln_pre`` (timm's patch bias is ``not pre_norm``)
and ``act_layer``; pass ``norm_layer`` with the tower's ``norm_eps``. ``timm`` towers are
exported as they are.

Usage (writes ``backbone.pth`` = ``{"state_dict": ..., "timm_kwargs": ...}``; the command lives in
``finegrain.interop.backbone`` because it loads a run)::

    python -m finegrain.interop.backbone runs/detailclip_vitb16 backbone.pth

Load in timm::

    import functools, timm, torch
    ck = torch.load("backbone.pth")
    vit = timm.models.vision_transformer.VisionTransformer(
        **ck["timm_kwargs"], norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5))
    vit.load_state_dict(ck["state_dict"])

mmsegmentation (UperNet, the paper's ADE20K protocol): convert the timm keys with mmseg's
``tools/model_converters/vit2mmseg.py`` and use ``VisionTransformer(pre_norm=True,
final_norm=True, with_cls_token=True, out_indices=(3, 5, 7, 11), norm_cfg=dict(type="LN",
eps=1e-5))`` as the backbone of ``configs/_base_/models/upernet_vit-b16_ln_mln.py``, 512 x 512
crops, 160k iterations (BEiT/iBOT recipe). The position embedding is resized by mmseg.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

NATIVE_RENAMES = (
    ("conv1.", "patch_embed.proj."),
    ("ln_pre.", "norm_pre."),
    ("ln_post.", "norm."),
    ("transformer.blocks.", "blocks."),
    (".ln_1.", ".norm1."),
    (".ln_2.", ".norm2."),
    (".mlp.0.", ".mlp.fc1."),
    (".mlp.2.", ".mlp.fc2."),
)


def image_backbone_to_timm(tower: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(timm state dict, timm ``VisionTransformer`` keyword arguments) of an image tower."""
    from finegrain.encoders.vit import QuickGELU, VisionTransformer

    if isinstance(tower, VisionTransformer):
        pre_norm = not isinstance(tower.ln_pre, nn.Identity)
        if (tower.conv1.bias is not None) == pre_norm:  # timm: patch bias = not pre_norm
            raise ValueError(
                "native vit with ln_pre and patch_bias both on (or both off) has no timm "
                "VisionTransformer equivalent; valid: ln_pre=True, patch_bias=False (CLIP) or "
                "ln_pre=False, patch_bias=True (timm)"
            )
        sd: dict[str, torch.Tensor] = {}
        for k, v in tower.state_dict().items():
            if k == "class_embedding":
                sd["cls_token"] = v.reshape(1, 1, -1).clone()
                continue
            if k == "positional_embedding":
                sd["pos_embed"] = v.clone()
                continue
            for a, b in NATIVE_RENAMES:
                k = k.replace(a, b)
            sd[k] = v.clone()
        blocks = tower.transformer.blocks
        n = tower.positional_embedding.shape[1] - 1
        p = tower.patch_size if isinstance(tower.patch_size, int) else tower.patch_size[0]
        sd.pop("mask_token", None)  # iBOT's learned mask embedding: not part of a timm ViT
        kwargs = {
            "img_size": int(round(n**0.5)) * p,
            "patch_size": p,
            "embed_dim": tower.width,
            "depth": len(blocks),
            "num_heads": blocks[0].attn.heads,
            "mlp_ratio": blocks[0].mlp[0].out_features / tower.width,
            "qkv_bias": True,
            "qk_norm": not isinstance(blocks[0].attn.q_norm, nn.Identity),
            "pre_norm": pre_norm,
            "class_token": True,
            "global_pool": "token",
            "num_classes": 0,
        }
        if isinstance(blocks[0].mlp[1], QuickGELU):
            kwargs["act_layer"] = "quick_gelu"
        return sd, kwargs
    model = getattr(tower, "model", None)
    if model is not None and type(model).__module__.startswith("timm"):
        return {k: v.clone() for k, v in model.state_dict().items()}, {
            "model_name": _timm_name(model)
        }
    raise ValueError(
        f"image tower {type(tower).__name__} cannot be exported to timm; valid towers: vit, timm"
    )


def _timm_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture", type(model).__name__))


def export_image_backbone(method: nn.Module, path: str) -> dict[str, Any]:
    """Write ``{"state_dict", "timm_kwargs"}`` of ``method.image`` to ``path`` (torch.save)."""
    tower = method.image  # every method's image tower (finegrain.methods.vocab.TOWERS)
    sd, kwargs = image_backbone_to_timm(tower)
    out = {"state_dict": sd, "timm_kwargs": kwargs}
    torch.save(out, path)
    return out

"""Released DetailCLIP checkpoints (KishoreP1/DetailCLIP, ``main.py``'s ``checkpoint*.pt``) ->
the ``clip`` method with native towers, for evaluation.

Spec: ``detailclip:FILE`` (the student) or ``detailclip:teacher=FILE`` (the EMA model the
released code evaluates as ``ema_test_*``: ``visual_ema``, ``transformer_e`` and the ``*_e``
projections; token / position embeddings and ``ln_final`` are shared, as in its
``encode_text(ema=True)``).

The file is ``{"state_dict": DDP state dict, "args": Namespace, ...}`` (read with
``weights_only=True``; ``argparse.Namespace`` is allowed as plain data). Layout:

==================================  ==============================================
released key                        finegrain ``clip`` key
==================================  ==============================================
``visual.*`` (timm ViT)             ``image.*`` (native ``vit``, timm layout:
                                    ``ln_pre=False, norm_eps=1e-6, patch_bias=True``)
``token_embedding``, ``positional_embedding``, ``ln_final``
                                    ``text.<same>`` (native ``transformer``, QuickGELU)
``transformer.resblocks.i.attn.in_proj_*`` / ``out_proj`` / ``mlp.c_fc`` / ``mlp.c_proj``
                                    ``text.transformer.blocks.i.attn.qkv`` / ``proj`` /
                                    ``mlp.0`` / ``mlp.2``
``image_projection`` (W, E)         ``image_proj.weight`` (E, W), transposed
``text_projection`` (W, E)          ``text_proj.weight`` (E, W), transposed
``logit_scale``                     ``logit_scale``
decoder, pixel head, iBOT heads     dropped (training-only)
==================================  ==============================================

Heads are not stored in the weights: the image tower uses the released ViTs' 12 (ViT-S/B) or
16 (ViT-L) heads, the text tower width / 64 (8 at 512). Preprocessing: 224 px, ImageNet mean/std
(the released ``val_transform``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.encoders.timm_keys import timm_vit_to_native
from finegrain.encoders.weights import load_into, load_state_dict_file
from finegrain.interop import run_config
from finegrain.methods.base import build_method
from finegrain.methods.clip import CLIPConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_HEADS = {384: 12, 768: 12, 1024: 16}  # mask_vit_{small,base,large}_patch16_224
TRAINING_ONLY = ("decoder_", "mask_token", "reconstruction_pred.", "ibot_head", "image_mlp.",
                 "im_proj_byol", "im_pred_byol")  # fmt: skip
_TEXT_BLOCK = (("attn.in_proj_weight", "attn.qkv.weight"), ("attn.in_proj_bias", "attn.qkv.bias"),
               ("attn.out_proj.", "attn.proj."), ("mlp.c_fc.", "mlp.0."),
               ("mlp.c_proj.", "mlp.2."))  # fmt: skip


def text_keys(sd: dict[str, torch.Tensor], blocks: str) -> dict[str, torch.Tensor]:
    """The released CLIP text tower (blocks under ``blocks``, e.g. ``"transformer."``) in the
    native ``text.*`` keys."""
    out = {f"text.{k}": sd[k] for k in ("token_embedding.weight", "positional_embedding",
                                        "ln_final.weight", "ln_final.bias")}  # fmt: skip
    for k, v in sd.items():
        if k.startswith(blocks + "resblocks."):
            k = "text.transformer.blocks." + k[len(blocks + "resblocks.") :]
            for a, b in _TEXT_BLOCK:
                k = k.replace(a, b)
            out[k] = v
    return out


def check(sd: dict[str, torch.Tensor]) -> None:
    """One line naming what is missing when ``sd`` is not a released DetailCLIP state dict."""
    need = ("visual.cls_token", "token_embedding.weight", "image_projection", "text_projection")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not a DetailCLIP checkpoint: no {missing} (keys {sorted(sd)[:5]}...)")


def to_finegrain(sd: dict[str, torch.Tensor], teacher: bool = False) -> dict[str, torch.Tensor]:
    """A released DetailCLIP state dict (``module.`` already stripped) in ``clip``'s keys."""
    check(sd)
    e = "_e" if teacher else ""
    if teacher and "visual_ema.cls_token" not in sd:
        raise ValueError("detailclip:teacher= needs visual_ema.* (the EMA model) in the file")
    image = timm_vit_to_native(sd, "visual_ema." if teacher else "visual.")
    out = {f"image.{k}": v for k, v in image.items()}
    out.update(text_keys(sd, "transformer_e." if teacher else "transformer."))
    out["image_proj.weight"] = sd["image_projection" + e].t().contiguous()
    out["text_proj.weight"] = sd["text_projection" + e].t().contiguous()
    out["logit_scale"] = sd["logit_scale"].reshape(())
    return out


def method_config(sd: dict[str, torch.Tensor]) -> CLIPConfig:
    """The ``clip`` config whose towers have the checkpoint's shapes (released layout)."""
    width = int(sd["visual.cls_token"].shape[-1])
    patch = int(sd["visual.patch_embed.proj.weight"].shape[-1])
    n = int(sd["visual.pos_embed"].shape[1]) - 1
    depth = len({k.split(".")[2] for k in sd if k.startswith("visual.blocks.")})
    image = ImageTowerConfig(name="vit", image_size=round(n**0.5) * patch, patch_size=patch,
                             width=width, depth=depth, heads=VIT_HEADS.get(width, width // 64),
                             ln_pre=False, norm_eps=1e-6, patch_bias=True, init="timm")  # fmt: skip
    tw = int(sd["ln_final.weight"].shape[0])
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    text = TextTowerConfig(name="transformer", context_length=int(sd["positional_embedding"].shape[0]),
                           vocab_size=int(sd["token_embedding.weight"].shape[0]), width=tw,
                           depth=layers, heads=max(1, tw // 64), activation="quick_gelu")  # fmt: skip
    return CLIPConfig(image=image, text=text, embed_dim=int(sd["image_projection"].shape[1]))


def load(rest: str, strict: bool = True) -> tuple[Any, Any]:
    """``FILE`` or ``teacher=FILE`` / ``student=FILE`` -> (clip method, RunConfig)."""
    which, eq, file = rest.partition("=")
    if not eq:
        which, file = "student", rest
    if which not in ("student", "teacher"):
        raise ValueError(
            f"detailclip spec '{rest}': valid forms are FILE, student=FILE, teacher=FILE"
        )
    sd = load_state_dict_file(file)
    sd = {k: v for k, v in sd.items() if not k.startswith(TRAINING_ONLY)}
    check(sd)
    cfg = method_config(sd)
    method = build_method(cfg)
    load_into(method, to_finegrain(sd, teacher=which == "teacher"), file, strict=strict)
    name = f"detailclip:{Path(file).stem}" + ("/teacher" if which == "teacher" else "")
    return method.eval(), run_config(cfg, name, IMAGENET_MEAN, IMAGENET_STD)

"""timm ``VisionTransformer`` state dicts in the native ``vit`` tower's keys (the inverse of
``finegrain.encoders.export.image_backbone_to_timm``), and where released vision-language
checkpoints keep them. A leaf module: only torch."""

from __future__ import annotations

import torch

# prefixes under which released training checkpoints keep a timm ViT: bare (timm files,
# DetailCLIP's extract_backbone_weights.py output), ``visual.`` (DetailCLIP's student, GRAIN's
# CLIP_VITB16), ``visual.trunk.`` (the CLIPpy replication's OpenCLIP TimmModel)
TIMM_PREFIXES = ("", "visual.", "visual.trunk.")
_BLOCK_RENAMES = ((".norm1.", ".ln_1."), (".norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.0."),
                  (".mlp.fc2.", ".mlp.2."))  # fmt: skip
_TOP_RENAMES = (("patch_embed.proj.", "conv1."), ("norm_pre.", "ln_pre."), ("norm.", "ln_post."))


def timm_vit_prefix(sd: dict[str, torch.Tensor]) -> str | None:
    """The prefix under which ``sd`` holds a timm ``VisionTransformer`` (``cls_token`` and
    ``blocks.*``), or None when it holds none."""
    for p in sorted(TIMM_PREFIXES, key=len, reverse=True):
        if f"{p}cls_token" in sd and f"{p}pos_embed" in sd:
            return p
    return None


def timm_vit_to_native(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict (keys under ``prefix``; others dropped) in the
    native ``vit`` tower's keys: the inverse of ``image_backbone_to_timm``. Classifier keys
    (``head.*``, ``fc_norm`` as identity) are dropped; the tower must use the timm layout
    (``ln_pre=False, patch_bias=True, norm_eps=1e-6``) for the weights to mean the same."""
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix) :]
        if k.startswith(("head.", "head_dist.", "pre_logits.")):
            continue
        if k == "cls_token":
            out["class_embedding"] = v.reshape(-1).clone()
            continue
        if k == "pos_embed":
            out["positional_embedding"] = v.reshape(1, -1, v.shape[-1]).clone()
            continue
        if k.startswith("blocks."):
            k = "transformer." + k
            for a, b in _BLOCK_RENAMES:
                k = k.replace(a, b)
        else:
            for a, b in _TOP_RENAMES:
                if k.startswith(a):
                    k = b + k[len(a) :]
                    break
        out[k] = v.clone()
    return out

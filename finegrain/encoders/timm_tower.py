"""timm image towers by architecture name (``vit_base_patch16_224``, ``vit_small_patch16_224``
(the DINO architecture), convnets such as ``resnet50``), random init or local weights.

``timm.create_model(cfg.model, pretrained=False, num_classes=0, img_size=cfg.image_size,
dynamic_img_size=True)`` (the last two only for models that accept them), weights from
``cfg.pretrained`` (safetensors or torch file, ``weights_only=True``; the absolute position
embedding is resampled when the checkpoint was trained at another size).
ViTs: ``forward_features`` (after the final norm) split into ``num_prefix_tokens`` prefix
tokens (CLS, registers) and patch tokens; pooled = CLS (or the patch mean for models without
a class token). Convnets: the last feature map (B, C, h, w) as tokens, pooled = mean.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from finegrain.encoders.base import ImageTowerConfig
from finegrain.encoders.vit import freeze_except_last
from finegrain.outputs import VisionOutput
from finegrain.registry import IMAGE_TOWERS


def _create(name: str, image_size: int) -> nn.Module:
    import timm

    if not name:
        raise ValueError("image tower 'timm' needs image.model, e.g. vit_base_patch16_224")
    arch = name.split(".")[0]  # 'vit_small_patch16_224.dino': architecture + weight tag
    if not timm.is_model(arch):
        from finegrain.registry import suggest

        raise ValueError(f"unknown timm model '{arch}'{suggest(arch, timm.list_models())}")
    try:
        return timm.create_model(
            name, pretrained=False, num_classes=0, img_size=image_size, dynamic_img_size=True
        )
    except TypeError:  # not a ViT: no img_size / dynamic_img_size arguments
        return timm.create_model(name, pretrained=False, num_classes=0)


def load_timm_weights(model: nn.Module, path: str) -> None:
    """Load a local checkpoint; drops classifier keys, resamples ``pos_embed`` if needed.

    Self-supervised checkpoints load as they are released: DINO's backbone files
    (``dino_deitsmall16_pretrain.pth``: timm ViT keys) and DINO training checkpoints
    (``{"teacher": {"backbone.*", "head.*"}, ...}``: the teacher backbone, projection head
    dropped)."""
    from finegrain.encoders.weights import load_into, load_state_dict_file

    sd = load_state_dict_file(path)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc.", "classifier."))}
    if sd and all(k.startswith("backbone.") for k in sd):  # DINO/iBOT training checkpoints
        sd = {k[len("backbone.") :]: v for k, v in sd.items()}
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        npt = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        grid = model.patch_embed.grid_size
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(grid), num_prefix_tokens=npt)
    load_into(model, sd, path)


class TimmTower(nn.Module):
    """Wraps a timm model; see the module docstring for what is returned."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        self.model = _create(cfg.model, cfg.image_size)
        if cfg.pretrained:
            load_timm_weights(self.model, cfg.pretrained)
        self.width = int(self.model.num_features)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        self.has_cls = bool(getattr(self.model, "cls_token", None) is not None)
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        blocks = getattr(self.model, "blocks", None)
        if cfg.trainable_blocks >= 0:
            if blocks is None:
                raise ValueError(
                    f"trainable_blocks is only supported for timm ViTs, not {cfg.model}"
                )
            norm = getattr(self.model, "norm", None)
            freeze_except_last(
                self, blocks, cfg.trainable_blocks, [norm] if norm is not None else []
            )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> VisionOutput:
        feats = self.model.forward_features(images)
        if feats.dim() == 4:  # convnet: (B, C, h, w)
            _, _, h, w = feats.shape
            tokens = feats.flatten(2).transpose(1, 2)  # (B, h*w, C)
            return VisionOutput(pooled=tokens.mean(1), tokens=tokens, grid_hw=(h, w))
        if feats.dim() == 3 and hasattr(self.model, "patch_embed"):  # ViT: (B, P + N, D)
            ph, pw = self.model.patch_embed.patch_size
            if images.shape[-2] % ph or images.shape[-1] % pw:
                raise ValueError(
                    f"image size {tuple(images.shape[-2:])} is not divisible by patch size {(ph, pw)}"
                )
            grid = (images.shape[-2] // ph, images.shape[-1] // pw)
            tokens = feats[:, self.num_prefix_tokens :]  # (B, N, D)
            pooled = feats[:, 0] if self.has_cls else tokens.mean(1)
            return VisionOutput(pooled=pooled, tokens=tokens, grid_hw=grid)
        raise ValueError(f"unsupported timm features of shape {tuple(feats.shape)}")


@IMAGE_TOWERS.register("timm")
def build_timm_tower(cfg: ImageTowerConfig) -> TimmTower:
    return TimmTower(cfg)

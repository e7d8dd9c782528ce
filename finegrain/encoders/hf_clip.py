"""Hugging Face CLIP / SigLIP towers (``transformers`` ``CLIPModel`` / ``SiglipModel`` folders).

``ImageTowerConfig(name="hf_clip", pretrained=DIR)`` / ``TextTowerConfig(name="hf_clip",
path=DIR)``: the vision / text half of the model in ``DIR`` (``config.json`` of a ``clip`` or
``siglip`` model, weights ``model.safetensors`` or ``pytorch_model.bin``), built from the
config and loaded with finegrain's safe loader. The tower takes only its own keys
(``vision_model.*`` / ``text_model.*``); the other tower, the projections and the logit
scale/bias are the method's (``finegrain.interop.hf`` maps them). No hub access.

What the towers return (``VisionOutput`` / ``TextOutput`` contract: tokens after the final norm):
- CLIP image: ``post_layernorm`` applied to every token (HF applies it to CLS only);
  pooled = CLS, tokens = patches. SigLIP image: no CLS; pooled = the MAP head's output
  (``pooler_output``), tokens = ``last_hidden_state`` (already post-normed).
- CLIP text: causal; pooled = the first EOS token (HF's rule), mask = positions up to it.
  SigLIP text: bidirectional, no attention mask (as trained: fixed-length padding); pooled =
  ``head(last token)``, i.e. ``pooler_output``; the head is part of the tower.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from finegrain.data.tokenizers import HFTokenizer
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig, reject_token_options
from finegrain.encoders.vit import freeze_except_last
from finegrain.encoders.weights import load_into, load_state_dict_file
from finegrain.outputs import TextOutput, VisionOutput
from finegrain.registry import IMAGE_TOWERS, TEXT_TOWERS

KINDS = ("clip", "siglip")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_config(path: str) -> Any:
    """The ``CLIPConfig`` / ``SiglipConfig`` of a local folder (one-line errors otherwise)."""
    d = Path(path).expanduser()
    if not path or not (d / "config.json").is_file():
        raise ValueError(f"hf_clip tower needs a local CLIPModel/SiglipModel folder with "
                         f"config.json (got '{path}')")  # fmt: skip
    from transformers import CLIPConfig, SiglipConfig

    kind = json.loads((d / "config.json").read_text()).get("model_type", "")
    if kind not in KINDS:
        raise ValueError(f"{d}: model_type '{kind}' is not supported; valid: {', '.join(KINDS)}")
    return (CLIPConfig if kind == "clip" else SiglipConfig).from_pretrained(str(d))


def weights_file(path: str) -> Path | None:
    for name in WEIGHT_FILES:
        if (Path(path) / name).is_file():
            return Path(path) / name
    return None


def load_part(module: nn.Module, path: str, prefix: str) -> None:
    """Load the ``prefix``-keys of the folder's weights into ``module`` (strict within them)."""
    f = weights_file(path)
    if f is None:
        return  # a config-only folder: random init (finegrain.interop loads the weights)
    sd = load_state_dict_file(f)
    part = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    part = {k: v for k, v in part.items() if not k.endswith("position_ids")}  # old buffers
    load_into(module, part, f"{f} ({prefix}*)")


class HFClipVision(nn.Module):
    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        from transformers import CLIPVisionModel, SiglipVisionModel

        conf = read_config(cfg.pretrained)
        self.kind = conf.model_type
        vc = conf.vision_config
        model_cls = CLIPVisionModel if self.kind == "clip" else SiglipVisionModel
        m = model_cls(vc)
        self.vision_model = getattr(m, "vision_model", m)  # transformers 4 wraps, 5 is flat
        load_part(self.vision_model, cfg.pretrained, "vision_model.")
        self.width, self.patch_size = int(vc.hidden_size), int(vc.patch_size)
        self.native_size = int(vc.image_size)
        enc = self.vision_model.encoder
        if cfg.grad_checkpointing:
            enc.gradient_checkpointing = True
        freeze_except_last(
            self, enc.layers, cfg.trainable_blocks, [self.vision_model.post_layernorm]
        )

    def forward(self, images: torch.Tensor, *, keep: Any = None, mask: Any = None,
                return_attention: Any = False) -> VisionOutput:  # fmt: skip
        reject_token_options("hf_clip", keep, mask, return_attention)
        p = self.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by patch {p}")
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        other = tuple(images.shape[-2:]) != (self.native_size, self.native_size)
        out = self.vision_model(pixel_values=images, interpolate_pos_encoding=other)
        x = out.last_hidden_state  # (B, [1 +] N, D)
        if self.kind == "clip":
            x = self.vision_model.post_layernorm(x)  # HF: CLS only; finegrain: every token
            return VisionOutput(pooled=x[:, 0], tokens=x[:, 1:], grid_hw=grid)
        return VisionOutput(pooled=out.pooler_output, tokens=x, grid_hw=grid)


class HFClipText(nn.Module):
    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        from transformers import CLIPTextModel, SiglipTextModel

        conf = read_config(cfg.path)
        self.kind = conf.model_type
        tc = conf.text_config
        model_cls = CLIPTextModel if self.kind == "clip" else SiglipTextModel
        m = model_cls(tc)
        self.text_model = getattr(m, "text_model", m)
        load_part(self.text_model, cfg.path, "text_model.")
        max_pos = int(tc.max_position_embeddings)
        if cfg.context_length > max_pos:
            raise ValueError(f"context_length {cfg.context_length} exceeds the model's {max_pos}")
        # SigLIP was trained on fixed-length padded text: always use its full length
        self.context_length = max_pos if self.kind == "siglip" else cfg.context_length
        self.tokenizer = HFTokenizer(cfg.path, self.context_length)
        self.eos_id = int(tc.eos_token_id)
        self.pad_id = int(tc.pad_token_id if tc.pad_token_id is not None else 0)
        head = getattr(self.text_model, "head", None)
        self.width = int(head.out_features) if head is not None else int(tc.hidden_size)
        enc = self.text_model.encoder
        if cfg.grad_checkpointing:
            enc.gradient_checkpointing = True
        freeze_except_last(
            self, enc.layers, cfg.trainable_blocks, [self.text_model.final_layer_norm]
        )

    def forward(self, ids: torch.Tensor) -> TextOutput:
        out = self.text_model(input_ids=ids)
        x = out.last_hidden_state  # (B, L, D)
        length = ids.shape[1]
        is_eos = ids == self.eos_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), length - 1)  # (B,)
        mask = torch.arange(length, device=ids.device)[None] <= first[:, None]  # (B, L)
        if self.kind == "siglip":
            mask = torch.ones_like(mask)  # every position is attended (no attention mask)
        return TextOutput(pooled=out.pooler_output, tokens=x, mask=mask)


@IMAGE_TOWERS.register("hf_clip")
def build_hf_clip_vision(cfg: ImageTowerConfig) -> HFClipVision:
    """``cfg.pretrained``: a local CLIPModel / SiglipModel folder."""
    return HFClipVision(cfg)


@TEXT_TOWERS.register("hf_clip")
def build_hf_clip_text(cfg: TextTowerConfig) -> HFClipText:
    """``cfg.path``: a local CLIPModel / SiglipModel folder (tokenizer files included)."""
    return HFClipText(cfg)

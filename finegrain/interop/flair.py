"""Released FLAIR checkpoints (Xiao et al., CVPR 2025; ExplainableML/flair) -> finegrain ``flair``.

FLAIR's model (``src/flair/model.py``, class ``FLAIR``) is OpenCLIP's CLIP with the image
projection removed from the ViT (``text_con``), two post-projections and an attention pooler.
Spec: ``flair:[MODEL=]FILE``; ``MODEL`` defaults to ``ViT-B-16`` (FLAIR's
``ViT-B-16-FLAIR.json`` is ``ViT-B-16`` plus ``init_logit_bias``). Key mapping:

====================================  ============================================
FLAIR key                             finegrain ``flair`` key
====================================  ============================================
``visual.<rest>`` (no ``proj``)        ``image.visual.<rest>``
``image_post.proj`` (W, E)            ``image_proj.weight`` (E, W), transposed; applied to CLS and patches
``text_post.proj`` (W, E)             ``text_proj.weight`` (E, W), transposed
``visual_proj.attn.*``                ``pooling.attn.*`` (``nn.MultiheadAttention``, 8 heads, add_zero_attn)
``visual_proj.ln_q/ln_k/ln_v.*``      ``pooling.ln_q/ln_k/ln_v.*``
``token_embedding``, ``positional_embedding``, ``transformer.*``, ``ln_final.*``
                                      ``text.<same>``
``logit_scale``, ``logit_bias``       the method's log scale and bias
``attn_mask``                         dropped (constant causal mask)
====================================  ============================================

FLAIR's ``image_post`` / ``text_post`` are built with ``skip_ln=True`` (no LayerNorm, so no
``ln_post`` keys) and ``text_projection`` is None; a checkpoint with ``*.ln_post.*`` under the
post-projections does not fit and is refused (strict) or listed (``strict=False``). Training
checkpoints (``{"state_dict": {"module.…"}}``) are unwrapped by the safe loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.encoders.weights import load_into, load_state_dict_file
from finegrain.interop import OPENAI_MEAN, OPENAI_STD, run_config
from finegrain.interop.common import place_scale_bias, rename
from finegrain.interop.open_clip import TEXT_KEYS, resolve_model
from finegrain.methods.base import build_method
from finegrain.methods.flair import FLAIRConfig

DEFAULT_MODEL = "ViT-B-16"
_PROJ = {"image_post.proj": "image_proj.weight", "text_post.proj": "text_proj.weight"}


def _fg_key(k: str) -> str | None:
    if k in _PROJ:
        return _PROJ[k]
    if k.startswith("visual_proj."):
        return "pooling." + k[len("visual_proj.") :]
    if k.startswith("visual."):
        return "image." + k
    if k.startswith(TEXT_KEYS):
        return "text." + k
    return None if k == "attn_mask" else k


def to_finegrain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = rename(sd, _fg_key)
    for k in _PROJ.values():
        if k in out:
            out[k] = out[k].t().contiguous()
    for k in ("logit_scale", "logit_bias"):
        if k in out:
            out[k] = out[k].reshape(())
    return out


def load(rest: str, strict: bool = True) -> tuple[Any, Any]:
    """``[MODEL=]FILE`` -> (flair method, RunConfig)."""
    name, eq, file = rest.partition("=")
    if not eq:
        name, file = DEFAULT_MODEL, rest
    oc_name, model_cfg, pre = resolve_model(name)
    sd = to_finegrain(load_state_dict_file(file))
    size = model_cfg["vision_cfg"].get("image_size", 224)
    size = int(size[0] if isinstance(size, list | tuple) else size)
    mcfg = FLAIRConfig(
        image=ImageTowerConfig(name="open_clip", model=oc_name, image_size=size),
        text=TextTowerConfig(name="open_clip", model=oc_name,
                             context_length=int(model_cfg["text_cfg"].get("context_length", 77))),
        embed_dim=int(model_cfg["embed_dim"]),
    )  # fmt: skip
    method = build_method(mcfg)
    load_into(method, place_scale_bias(sd, method), file, strict=strict)
    mean, std = pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD)
    return method.eval(), run_config(mcfg, f"flair:{Path(file).stem}", mean, std)

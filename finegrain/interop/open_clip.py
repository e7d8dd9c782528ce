"""OpenCLIP <-> finegrain.

Import (``open_clip:MODEL=FILE`` or ``open_clip:DIR`` with ``open_clip_config.json``): the
checkpoint's state dict (OpenAI-style keys ``visual.*``, ``token_embedding``, ``transformer.*``,
``ln_final``, ``text_projection``, ``logit_scale``; or OpenCLIP's custom-text layout ``text.*``)
is loaded into the ``clip`` method (``siglip`` when the file has ``logit_bias``) with
``open_clip`` image/text towers:

==============================  ==========================================
OpenCLIP key                    finegrain key
==============================  ==========================================
``visual.proj`` (W, E)          ``image_proj.weight`` (E, W), transposed
``visual.<rest>``               ``image.visual.<rest>``
``text_projection`` (W, E)      ``text_proj.weight`` (E, W), transposed
``token_embedding.*``, ``positional_embedding``, ``transformer.*``, ``ln_final.*``
                                ``text.<same>``
``logit_scale``, ``logit_bias`` the method's logit scale (log t) and bias
``attn_mask``                   dropped (a constant causal mask, rebuilt)
==============================  ==========================================

Export (``finegrain export RUN --format open_clip``): the reverse for open_clip towers, and for
finegrain's native ``vit`` / ``transformer`` towers (same CLIP layout: fused qkv ->
``attn.in_proj_*``, ``attn.proj`` -> ``attn.out_proj``, ``mlp.0/2`` -> ``mlp.c_fc/c_proj``,
``transformer.blocks`` -> ``transformer.resblocks``) with a generated model config. The output
folder is an OpenCLIP ``local-dir``: ``open_clip.create_model_and_transforms('local-dir:OUT')``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from finegrain.data.tokenizers import ClipTokenizer
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.encoders.weights import load_into, load_state_dict_file
from finegrain.interop import OPENAI_MEAN, OPENAI_STD, run_config
from finegrain.interop.common import (
    image_tower,
    place_scale_bias,
    projection_weight,
    read_scale_bias,
    rename,
)
from finegrain.methods.base import build_method
from finegrain.methods.clip import CLIPConfig, SigLIPConfig
from finegrain.registry import suggest

TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
_PROJ = {"visual.proj": "image_proj.weight", "text_projection": "text_proj.weight"}


# ---- import --------------------------------------------------------------------------
def _fg_key(k: str) -> str | None:
    if k.startswith("text.") and not k.startswith("text.text_projection"):
        k = k[len("text.") :]  # OpenCLIP's custom-text layout
    if k == "text.text_projection":
        k = "text_projection"
    if k in _PROJ:
        return _PROJ[k]
    if k.startswith("visual."):
        return "image." + k
    if k.startswith(TEXT_KEYS):
        return "text." + k
    if k == "attn_mask":
        return None
    return k  # logit_scale, logit_bias; anything else is reported as unexpected


def to_finegrain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP state dict -> finegrain ``clip``/``siglip`` keys (projections transposed)."""
    out = rename(sd, _fg_key)
    for k in _PROJ.values():
        if k in out:
            out[k] = out[k].t().contiguous()
    for k in ("logit_scale", "logit_bias"):
        if k in out:
            out[k] = out[k].reshape(())
    return out


def resolve_model(name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(name for ``open_clip.create_model``, model config, preprocess config) of an OpenCLIP
    model name, a model-config ``.json`` file or a ``local-dir`` folder."""
    import open_clip

    path = Path(name).expanduser()
    if path.is_dir():
        full = (
            json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else None
        )
        if not full or "model_cfg" not in full:
            raise ValueError(f"{path} has no {CONFIG_FILE} with a model_cfg")
        return f"local-dir:{path}", full["model_cfg"], full.get("preprocess_cfg", {})
    if path.suffix == ".json" and path.is_file():
        cfg = json.loads(path.read_text())
        return str(path), cfg.get("model_cfg", cfg), cfg.get("preprocess_cfg", {})
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model '{name}'{suggest(name, open_clip.list_models())}"
                         "; give an open_clip.list_models() name or a model-config .json")  # fmt: skip
    return name, cfg, {}


def method_config(name: str, cfg: dict[str, Any], siglip: bool) -> Any:

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    size = v.get("image_size", 224)
    size = size[0] if isinstance(size, list | tuple) else size
    image = ImageTowerConfig(name="open_clip", model=name, image_size=int(size))
    text = TextTowerConfig(name="open_clip", model=name,
                           context_length=int(t.get("context_length", 77)))  # fmt: skip
    kind = SigLIPConfig if siglip else CLIPConfig
    return kind(image=image, text=text, embed_dim=int(cfg["embed_dim"]))


def load(rest: str, strict: bool = True) -> tuple[Any, Any]:
    """``MODEL=FILE`` or ``DIR`` (an OpenCLIP local-dir) -> (clip/siglip method, RunConfig)."""
    name, eq, file = rest.partition("=")
    if not eq:
        from open_clip.factory import _find_checkpoint_in_dir

        if not Path(rest).is_dir():
            raise ValueError(f"open_clip spec '{rest}' must be MODEL=FILE or an OpenCLIP local dir")
        file = _find_checkpoint_in_dir(Path(rest)) or ""
        if not file:
            raise ValueError(f"no weights file in {rest}")
    oc_name, model_cfg, pre = resolve_model(name)
    sd = to_finegrain(load_state_dict_file(file))
    mcfg = method_config(oc_name, model_cfg, siglip="logit_bias" in sd)
    method = build_method(mcfg)
    load_into(method, place_scale_bias(sd, method), file, strict=strict)
    mean, std = pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD)
    return method.eval(), run_config(mcfg, f"open_clip:{Path(name).stem}", mean, std)


# ---- export --------------------------------------------------------------------------
_BLOCK = {"attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
          "attn.proj.": "attn.out_proj.", "mlp.0.": "mlp.c_fc.", "mlp.2.": "mlp.c_proj."}  # fmt: skip


def _native_key(k: str) -> str:
    k = k.replace("transformer.blocks.", "transformer.resblocks.")
    for a, b in _BLOCK.items():
        k = k.replace(a, b)
    return k


def _tower_state(tower: nn.Module, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(OpenCLIP keys without the ``visual.`` prefix for images, tower config) of one tower."""
    name = type(tower).__name__
    # the learned iBOT mask token is a training-only parameter without an OpenCLIP equivalent
    sd = {k: v.detach().cpu() for k, v in tower.state_dict().items() if k != "mask_token"}
    if name in ("OpenCLIPVision",):
        return rename(sd, lambda k: k[len("visual.") :]), {}
    if name == "OpenCLIPText":
        return sd, {}
    if name == "VisionTransformer" and kind == "image":
        sd = rename(sd, _native_key)
        sd["positional_embedding"] = sd["positional_embedding"].reshape(
            -1, sd["positional_embedding"].shape[-1]
        )
        blk = tower.transformer.blocks
        heads = blk[0].attn.heads if len(blk) else 1
        patch = tower.patch_size[0] if isinstance(tower.patch_size, tuple) else tower.patch_size
        return sd, {"width": tower.width, "layers": len(blk), "patch_size": int(patch),
                    "head_width": tower.width // heads, "pool_type": tower.pool_type,
                    "mlp_ratio": blk[0].mlp[0].out_features / tower.width if len(blk) else 4.0}  # fmt: skip
    if name == "TextTransformer" and kind == "text":
        if not isinstance(tower.tokenizer, ClipTokenizer) or tower.pooling != "eot":
            raise ValueError("only text towers with the CLIP tokenizer and eot pooling export "
                             "to open_clip")  # fmt: skip
        blk = tower.transformer.blocks
        return rename(sd, _native_key), {
            "context_length": tower.context_length, "vocab_size": tower.token_embedding.num_embeddings,
            "width": tower.width, "heads": blk[0].attn.heads, "layers": len(blk),
            "mlp_ratio": blk[0].mlp[0].out_features / tower.width,
        }  # fmt: skip
    raise ValueError(f"{kind} tower {name} has no OpenCLIP equivalent; open_clip export supports "
                     "the vit/open_clip image and transformer/open_clip text towers")  # fmt: skip


def from_finegrain(
    method: nn.Module, image_size: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(OpenCLIP model config, OpenCLIP state dict) of a finegrain dual encoder."""
    vis_sd, vis_cfg = _tower_state(image_tower(method), "image")
    txt_sd, txt_cfg = _tower_state(method.text, "text")
    w_img = projection_weight(method.towers().get("image_proj"))
    w_txt = projection_weight(method.towers().get("text_proj"))
    if w_img is None or w_txt is None:
        raise ValueError("open_clip export needs linear image and text projections")
    sd = {f"visual.{k}": v for k, v in vis_sd.items()}
    sd.update(txt_sd)
    sd["visual.proj"] = w_img.t().contiguous().cpu()
    sd["text_projection"] = w_txt.t().contiguous().cpu()
    scale, bias = read_scale_bias(method)
    sd["logit_scale"] = scale
    if vis_cfg and txt_cfg:  # native towers: a generated config
        cfg: dict[str, Any] = {"embed_dim": int(w_img.shape[0]),
                               "vision_cfg": {"image_size": image_size, **vis_cfg},
                               "text_cfg": txt_cfg}  # fmt: skip
    elif not vis_cfg and not txt_cfg:
        cfg = dict(resolve_model(_oc_name(method))[1])
        cfg["vision_cfg"] = {**cfg["vision_cfg"], "image_size": image_size}
        cfg["text_cfg"] = {**cfg["text_cfg"], "context_length": method.text.context_length}
    else:
        raise ValueError("open_clip export needs both towers native or both open_clip")
    if bias is not None:
        sd["logit_bias"] = bias
        cfg["init_logit_bias"] = float(bias)
    return cfg, sd


def _oc_name(method: nn.Module) -> str:
    name = method.cfg.image.model
    if name != method.cfg.text.model:
        raise ValueError(
            f"open_clip export needs one architecture, got {name} and {method.cfg.text.model}"
        )
    return name.removeprefix("local-dir:")


def export(method: nn.Module, cfg: Any, out: Path) -> Path:
    """Write an OpenCLIP local-dir (config + safetensors) for ``method``; returns ``out``."""
    from safetensors.torch import save_file

    model_cfg, sd = from_finegrain(method, int(cfg.method.image.image_size))
    out.mkdir(parents=True, exist_ok=True)
    pre = {"size": int(cfg.method.image.image_size), "mean": list(cfg.data.mean),
           "std": list(cfg.data.std), "interpolation": "bicubic", "resize_mode": "shortest"}  # fmt: skip
    (out / CONFIG_FILE).write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}, indent=2)
    )
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / WEIGHTS_FILE))
    return out

"""Hugging Face ``CLIPModel`` / ``SiglipModel`` <-> finegrain.

Import (``hf:DIR``): ``clip`` with ``hf_clip`` towers (``finegrain.encoders.hf_clip``) and
linear projections, or ``siglip`` with ``hf_clip`` towers and no projection (SigLIP's text head
lives in the text tower; its MAP head in the image tower):

=================================  ==========================================
HF key                             finegrain key
=================================  ==========================================
``vision_model.<rest>``            ``image.vision_model.<rest>``
``text_model.<rest>``              ``text.text_model.<rest>``
``visual_projection.weight``       ``image_proj.weight`` (CLIP)
``text_projection.weight``         ``text_proj.weight`` (CLIP)
``logit_scale``, ``logit_bias``    the method's log scale and bias (shape () here, (1,) in SigLIP)
``*.position_ids``                 dropped (constant buffers of older checkpoints)
=================================  ==========================================

Preprocessing comes from ``preprocessor_config.json`` (mean/std/size) when present; else
OpenAI's mean/std (CLIP) or 0.5/0.5 (SigLIP). finegrain's evaluation resizes the short side
and centre-crops for every model; HF's SigLIP processor squashes the whole image to a square
instead, so SigLIP numbers on non-square images can differ slightly from HF pipelines.

Export (``--format hf``): ``hf_clip`` towers go back to their own class; ``clip`` methods with
native ``vit``/``transformer`` or ``open_clip`` towers become a ``CLIPModel`` (via the OpenCLIP
layout: fused ``in_proj`` split into ``q/k/v_proj``, ``ln_1/2`` -> ``layer_norm1/2``, ``c_fc`` /
``c_proj`` -> ``fc1``/``fc2``, ``ln_pre`` -> ``pre_layrnorm``, ``ln_post`` -> ``post_layernorm``),
with a CLIP BPE tokenizer (``vocab.json`` + ``merges.txt`` from open_clip's vocabulary, padding
id 0 as finegrain's tokenizer) so the folder is complete for ``CLIPModel.from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.encoders.hf_clip import read_config, weights_file
from finegrain.encoders.weights import load_into, load_state_dict_file
from finegrain.interop import OPENAI_MEAN, OPENAI_STD, run_config
from finegrain.interop import open_clip as oc
from finegrain.interop.common import (
    place_scale_bias,
    read_scale_bias,
    rename,
    scale_bias_keys,
)
from finegrain.methods.base import build_method
from finegrain.methods.clip import CLIPConfig, SigLIPConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "spiece.model")  # fmt: skip


# ---- import --------------------------------------------------------------------------
def _fg_key(k: str) -> str | None:
    if k.endswith("position_ids"):
        return None
    if k.startswith("vision_model."):
        return "image." + k
    if k.startswith("text_model."):
        return "text." + k
    return {"visual_projection.weight": "image_proj.weight",
            "text_projection.weight": "text_proj.weight"}.get(k, k)  # fmt: skip


def to_finegrain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = rename(sd, _fg_key)
    for k in ("logit_scale", "logit_bias"):
        if k in out:
            out[k] = out[k].reshape(())
    return out


def preprocessing(path: Path, kind: str, default_size: int) -> tuple[int, tuple, tuple]:
    """(image size, mean, std) from ``preprocessor_config.json`` or the family default."""
    mean, std = (OPENAI_MEAN, OPENAI_STD) if kind == "clip" else ((0.5,) * 3, (0.5,) * 3)
    size = default_size
    f = path / "preprocessor_config.json"
    if f.is_file():
        pre = json.loads(f.read_text())
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
        s = pre.get("crop_size") or pre.get("size") or {}
        s = s if isinstance(s, dict) else {"height": s}
        size = int(s.get("height") or s.get("shortest_edge") or size)
    return size, mean, std


def method_config(path: str, conf: Any) -> Any:

    vc, tc = conf.vision_config, conf.text_config
    image = ImageTowerConfig(name="hf_clip", pretrained=path, image_size=int(vc.image_size))
    text = TextTowerConfig(name="hf_clip", path=path, tokenizer="hf",
                           context_length=int(tc.max_position_embeddings))  # fmt: skip
    if conf.model_type == "clip":
        return CLIPConfig(image=image, text=text, embed_dim=int(conf.projection_dim))
    width = int(getattr(tc, "projection_size", None) or tc.hidden_size)
    if width != int(vc.hidden_size):
        raise ValueError(f"SigLIP text width {width} != vision width {vc.hidden_size}")
    return SigLIPConfig(image=image, text=text, embed_dim=width, projection="none")


def load(rest: str, strict: bool = True) -> tuple[Any, Any]:
    """``DIR`` of a CLIPModel / SiglipModel -> (clip/siglip method, RunConfig)."""
    path = Path(rest).expanduser()
    conf = read_config(str(path))
    f = weights_file(str(path))
    if f is None:
        raise ValueError(f"{path} has no model.safetensors or pytorch_model.bin")
    mcfg = method_config(str(path), conf)
    method = build_method(mcfg)
    load_into(
        method,
        place_scale_bias(to_finegrain(load_state_dict_file(f)), method),
        str(f),
        strict=strict,
    )
    size, mean, std = preprocessing(path, conf.model_type, mcfg.image.image_size)
    mcfg.image.image_size = size
    return method.eval(), run_config(mcfg, f"hf:{path.name}", mean, std)


# ---- export --------------------------------------------------------------------------
_OC_BLOCK = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
             "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}  # fmt: skip
_OC_TOP = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
           "visual.class_embedding": "vision_model.embeddings.class_embedding",
           "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
           "visual.ln_pre.": "vision_model.pre_layrnorm.", "visual.ln_post.": "vision_model.post_layernorm.",
           "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
           "positional_embedding": "text_model.embeddings.position_embedding.weight",
           "ln_final.": "text_model.final_layer_norm.", "logit_scale": "logit_scale"}  # fmt: skip


def open_clip_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP (CLIP ViT, causal text) state dict -> HF ``CLIPModel`` state dict."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == "visual.proj":
            out["visual_projection.weight"] = v.t().contiguous()
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif ".resblocks." in k:
            tower, rest = k.split(".resblocks.", 1)
            idx, sub = rest.split(".", 1)
            base = (
                "vision_model" if tower.startswith("visual") else "text_model"
            ) + f".encoder.layers.{idx}."
            if sub.startswith("attn.in_proj_"):
                kind = sub.split("_")[-1]  # weight | bias
                for name, part in zip("qkv", v.chunk(3, dim=0), strict=True):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            for a, b in _OC_BLOCK.items():
                sub = sub.replace(a, b)
            out[base + sub] = v
        else:
            hit = [a for a in _OC_TOP if k == a or (a.endswith(".") and k.startswith(a))]
            if not hit:
                raise ValueError(f"OpenCLIP key '{k}' has no Hugging Face CLIPModel equivalent")
            out[k.replace(hit[0], _OC_TOP[hit[0]], 1)] = v
    return out


# OpenCLIP options a CLIPModel can only express at these values (anything else is refused)
_PLAIN_VISION = {"ls_init_value": None, "no_ln_pre": False, "attentional_pool": False,
                 "pool_type": "tok", "final_ln_after_pool": False, "pos_embed_type": "learnable",
                 "act_kwargs": None, "norm_kwargs": None}  # fmt: skip
_PLAIN_TEXT = {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
               "pool_type": "argmax", "proj_bias": False, "proj_type": "linear",
               "final_ln_after_pool": False, "act_kwargs": None, "norm_kwargs": None}  # fmt: skip


def hf_clip_config(model_cfg: dict[str, Any]) -> Any:
    """A ``transformers.CLIPConfig`` equal to an OpenCLIP model config (CLIP ViT + causal text)."""
    from transformers import CLIPConfig

    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    for where, part, allowed in (("vision_cfg", v, _PLAIN_VISION), ("text_cfg", t, _PLAIN_TEXT)):
        odd = {k: x for k, x in part.items() if k in allowed and x != allowed[k]}
        odd.update({k: x for k, x in part.items() if k.startswith(("timm_", "hf_")) and x})
        if odd:
            raise ValueError(f"OpenCLIP {where} {odd} has no Hugging Face CLIPModel equivalent")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    vw, tw = int(v["width"]), int(t["width"])
    vision = {"hidden_size": vw, "intermediate_size": int(vw * v.get("mlp_ratio", 4.0)),
              "num_hidden_layers": int(v["layers"]), "num_attention_heads": vw // int(v.get("head_width", 64)),
              "image_size": int(v["image_size"]), "patch_size": int(v["patch_size"]),
              "hidden_act": act, "layer_norm_eps": 1e-5}  # fmt: skip
    text = {"vocab_size": int(t.get("vocab_size", 49408)), "hidden_size": tw,
            "intermediate_size": int(tw * t.get("mlp_ratio", 4.0)), "num_hidden_layers": int(t["layers"]),
            "num_attention_heads": int(t["heads"]), "max_position_embeddings": int(t["context_length"]),
            "hidden_act": act, "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 0}  # fmt: skip
    return CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=int(model_cfg["embed_dim"])
    )


def write_clip_tokenizer(out: Path, context_length: int) -> None:
    """``vocab.json`` + ``merges.txt`` of open_clip's CLIP BPE for HF ``CLIPTokenizer``; padding
    with id 0 (``!``) like finegrain's ``ClipTokenizer`` (ids are equal; tested)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(k, k): v for k, v in tok.encoder.items()}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m, _ in merges) + "\n"
    )
    conf = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length,
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": "!"}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2))


def _hf_tower_state(method: nn.Module) -> tuple[Any, dict[str, torch.Tensor], str]:
    """(HF config, HF state dict, source folder) for a method with ``hf_clip`` towers."""
    src = method.cfg.image.pretrained
    conf = read_config(src)
    inv = {"image.": "", "text.": "", "image_proj.weight": "visual_projection.weight",
           "text_proj.weight": "text_projection.weight"}  # fmt: skip
    sd = {}
    for k, v in method.state_dict().items():
        for a, b in inv.items():
            if k == a or (a.endswith(".") and k.startswith(a)):
                k = b + k[len(a) :] if a.endswith(".") else b
                break
        sd[k] = v.detach().cpu()
    scale_key, bias_key = scale_bias_keys(method)
    scale, bias = read_scale_bias(method)
    sd = {k: v for k, v in sd.items() if k not in (scale_key, bias_key)}
    sd["logit_scale"] = scale if bias is None else scale.reshape(1)  # SigLIP keeps shape (1,)
    if bias is not None:
        sd["logit_bias"] = bias.reshape(1)
    return conf, sd, src


def export(method: nn.Module, cfg: Any, out: Path) -> Path:
    """Write a HF ``CLIPModel`` / ``SiglipModel`` folder (``save_pretrained`` + tokenizer)."""
    from transformers import CLIPModel, SiglipModel

    out.mkdir(parents=True, exist_ok=True)
    if cfg.method.image.name == "hf_clip" and cfg.method.text.name == "hf_clip":
        conf, sd, src = _hf_tower_state(method)
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file():
                shutil.copy(Path(src) / name, out / name)
    else:
        if cfg.method.name != "clip":
            raise ValueError(f"hf export of method '{cfg.method.name}' with {cfg.method.image.name} "
                             "towers has no CLIPModel/SiglipModel equivalent; use --format open_clip")  # fmt: skip
        model_cfg, oc_sd = oc.from_finegrain(method, int(cfg.method.image.image_size))
        conf, sd = hf_clip_config(model_cfg), open_clip_to_hf(oc_sd)
        write_clip_tokenizer(out, int(model_cfg["text_cfg"]["context_length"]))
    model = (CLIPModel if conf.model_type == "clip" else SiglipModel)(conf)
    load_into(model, sd, "exported weights")
    model.save_pretrained(str(out))
    size = int(cfg.method.image.image_size)
    pre = {"image_mean": list(cfg.data.mean), "image_std": list(cfg.data.std),
           "size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
           "do_center_crop": conf.model_type == "clip", "resample": 3}  # fmt: skip
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return out

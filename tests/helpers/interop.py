"""Tiny reference models for the interop tests, built by the reference libraries themselves
(open_clip, transformers), plus a finegrain run saved without training."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXTS = ["a red square", "two blue circles next to a long striped triangle on the left", ""]
OC_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
HF_LAYER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4}  # fmt: skip


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal up to ``tol`` relative to the tensors' magnitude (machines differ in kernels)."""
    scale = max(1.0, float(a.abs().max()))
    return float((a.float() - b.float()).abs().max()) <= tol * scale


def open_clip_reference(d: Path, quick_gelu: bool = False) -> tuple[torch.nn.Module, Path]:
    """(tiny open_clip model with random weights, its model-config .json) under ``d``."""
    import open_clip

    d.mkdir(parents=True, exist_ok=True)
    cfg_file = d / "tiny-oc.json"
    cfg_file.write_text(json.dumps({**OC_CFG, "quick_gelu": quick_gelu}))
    open_clip.add_model_config(cfg_file)
    return open_clip.create_model("tiny-oc").eval(), cfg_file


def hf_clip_reference(d: Path) -> torch.nn.Module:
    """A tiny ``CLIPModel`` saved to ``d`` with a CLIP BPE tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from finegrain.interop.hf import write_clip_tokenizer

    text = {**HF_LAYER, "max_position_embeddings": 16, "bos_token_id": 49406,
            "eos_token_id": 49407, "pad_token_id": 0}  # fmt: skip
    vision = {**HF_LAYER, "image_size": 32, "patch_size": 8}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(str(d))
    write_clip_tokenizer(d, 16)
    return model


def hf_siglip_reference(d: Path) -> torch.nn.Module:
    """A tiny ``SiglipModel`` saved to ``d`` with a small word-level fast tokenizer
    (pad = eos = ``</s>``, as SigLIP's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import SiglipConfig, SiglipModel

    words = "a red square two blue circles next to long striped triangle on the left".split()
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])  # fmt: skip
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "</s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 16}))  # fmt: skip
    text = {**HF_LAYER, "max_position_embeddings": 16, "vocab_size": len(vocab),
            "pad_token_id": 1, "eos_token_id": 1, "bos_token_id": None}  # fmt: skip
    vision = {**HF_LAYER, "image_size": 32, "patch_size": 8}
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():  # non-default scale/bias so that their mapping is checked
        model.logit_scale.fill_(1.7)
        model.logit_bias.fill_(-3.0)
    model.save_pretrained(str(d))
    return model


def make_run(d: Path, recipe: str, overrides: list[str] | None = None) -> Path:
    """A finegrain run directory (config.yaml + one checkpoint) of an untrained recipe model."""
    from finegrain.config import apply_overrides, save_yaml
    from finegrain.interop.common import scale_bias_keys
    from finegrain.methods.base import build_method
    from finegrain.recipes.base import get_recipe
    from finegrain.train.checkpoint import model_state, save_checkpoint

    cfg = get_recipe(recipe)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    d.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, d / "config.yaml")
    method = build_method(cfg.method)
    scale, bias = scale_bias_keys(method)
    own = method.state_dict()  # shares storage with the parameters
    with torch.no_grad():  # non-trivial scale (and bias) so the export mapping is checked
        own[scale].fill_(2.5)
        if bias is not None:
            own[bias].fill_(-4.0)
    save_checkpoint(d / "ckpt", 1, model_state(method), {"step": 1})
    return d

"""Weight-decay groups per method against the released codebases' rules, written out by hand.

OpenCLIP ``main.py`` (also FLAIR ``src/main.py``): ``exclude = p.ndim < 2 or "bn" in n or "ln" in n
or "bias" in n or "logit_scale" in n``. GRAIN (grain-clip ``utils/train_utils.optim_policy``): the
same for the CLIP backbone; the decoder model by name only (".ln_", ".bn", ".bias",
".logit_scale", ".entropy_scale"), so decoder norm weights and queries are decayed.
"""

from __future__ import annotations

import pytest
import torch

from finegrain.methods.base import build_method
from finegrain.recipes.base import get_recipe
from finegrain.registry import METHODS
from finegrain.run_config import TrainConfig
from finegrain.train.optim import build_optimizer

METHOD_NAMES = [n for n, cls in METHODS.items() if cls.__module__.startswith("finegrain.")]


def open_clip_excluded(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def grain_excluded(name: str, p: torch.Tensor) -> bool:
    if name.split(".")[0] in ("decoder", "image_proj", "region_proj"):  # grain-clip's ObjDecoder
        return any(k in name for k in (".ln_", ".bn", ".bias", ".logit_scale", ".entropy_scale"))
    return open_clip_excluded(name, p)


def slip_excluded(name: str, p: torch.Tensor) -> bool:
    """DetailCLIP's ``main.get_optim`` (SLIP) on the released shapes: timm's CLS token is
    (1, 1, D), the native tower's (D,)."""
    ndim = 3 if name.endswith("class_embedding") else p.ndim
    return ndim < 2 or "bias" in name or "ln" in name or "bn" in name


def groups_by_name(method: torch.nn.Module, rule: str) -> tuple[set[str], set[str]]:
    opt = build_optimizer(method, TrainConfig(weight_decay=0.3, no_decay=rule))
    names = {id(p): n for n, p in method.named_parameters()}
    by_wd = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    return by_wd.get(0.3, set()), by_wd.get(0.0, set())


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_released_rule_per_method(name: str) -> None:
    method = build_method(get_recipe(f"{name}_smoke").method)
    decay, no_decay = groups_by_name(method, "released")
    excluded = {"grain": grain_excluded, "detailclip": slip_excluded}.get(name, open_clip_excluded)
    trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}
    assert no_decay == {n for n, p in trainable.items() if excluded(n, p)}
    assert decay == {n for n, p in trainable.items() if not excluded(n, p)}
    # the point of the change: >= 2-d embeddings are decayed, as in the released code
    assert any("positional_embedding" in n or "token_embedding" in n for n in decay), name
    assert any(n.endswith("logit_scale") for n in no_decay), name
    if name == "detailclip":  # README: "also position / class embeddings"
        assert {"image.class_embedding", "image.positional_embedding"} <= decay


def test_grain_decoder_norms_and_queries_decayed_only_under_released() -> None:
    method = build_method(get_recipe("grain_smoke").method)
    decay, no_decay = groups_by_name(method, "released")
    for n in ("decoder.query_embed", "decoder.layers.0.norm1.weight", "decoder.norm.weight"):
        assert n in decay, n
    assert "decoder.layers.0.norm1.bias" in no_decay and "image.ln_post.weight" in no_decay
    decay_x, no_decay_x = groups_by_name(method, "extended")
    for n in ("decoder.query_embed", "decoder.norm.weight", "image.positional_embedding"):
        assert n in no_decay_x, n
    assert "decoder.proj.weight" in decay_x


def test_extended_rule_spares_embeddings() -> None:
    method = build_method(get_recipe("clip_smoke").method)
    decay, no_decay = groups_by_name(method, "extended")
    assert {"text.token_embedding.weight", "text.positional_embedding"} <= no_decay
    assert "text_proj.weight" in decay


def test_unknown_rule_is_one_line_error() -> None:
    method = build_method(get_recipe("clip_smoke").method)
    with pytest.raises(ValueError, match="valid choices: released, extended"):
        method.param_groups(0.1, no_decay="paper")

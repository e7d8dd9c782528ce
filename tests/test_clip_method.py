"""CLIP and SigLIP methods: collate, losses, configs (the shared Method contract, incl. exact
accumulation, is checked for every method by tests/test_method_contract.py)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from finegrain.config import from_dict
from finegrain.data.collate import (
    caption_candidates,
    pick_captions,
    stack_images,
)
from finegrain.data.schema import sample_rng
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.losses.contrastive import clip_loss, multi_positive_sigmoid_loss, siglip_loss
from finegrain.methods.base import MethodConfig, build_method
from finegrain.methods.clip import CLIP, CLIPConfig, SigLIP, SigLIPConfig

TOWERS = {
    "image": ImageTowerConfig(name="vit", image_size=32, patch_size=8, width=32, depth=1, heads=2),
    "text": TextTowerConfig(name="transformer", context_length=16, width=32, depth=1, heads=2),
    "embed_dim": 24,
}


def samples(n: int = 4) -> list[dict]:
    words = ["red square", "blue circle", "green star", "small triangle", "big disc", "tiny hex"]
    return [
        {"key": str(i), "seed": 100 + i, "image": torch.randn(3, 32, 32), "caption": f"a {words[i]}",
         "captions": [f"one {words[i]}", f"the {words[i]} here"], "label": i % 3}
        for i in range(n)
    ]  # fmt: skip


def test_collate_picks_seeded_captions_and_pickles() -> None:
    clip = CLIP(CLIPConfig(**TOWERS))
    collate = clip.make_collate(train=True)  # pickling: tests/test_method_contract.py
    batch = collate(samples())
    assert batch["image"].shape == (4, 3, 32, 32) and batch["text"].shape == (4, 16)
    assert batch["labels"].tolist() == [0, 1, 2, 0] and batch["stats"]["skipped_samples"] == 0
    torch.testing.assert_close(collate(samples())["text"], batch["text"])  # seeded, not global RNG
    s = samples(1)[0]
    expected = sample_rng(s["seed"], "caption").choice(caption_candidates(s))
    torch.testing.assert_close(batch["text"][:1], clip.tokenize([expected]))
    first = clip.make_collate(train=False)(samples())["text"]
    torch.testing.assert_close(first[:1], clip.tokenize(["a red square"]))
    empty = {**samples(1)[0], "caption": "", "captions": ["  "]}
    assert collate([empty, *samples(2)])["stats"]["skipped_samples"] == 1
    with pytest.raises(ValueError, match="non-empty caption"):
        collate([empty])


def test_pick_captions_and_stack_images() -> None:
    rng = random.Random(0)
    got = pick_captions(["a", "b"], 5, rng)
    assert sorted(set(got)) == ["a", "b"] and len(got) == 5
    assert pick_captions(["a", "b", "c"], 2, None) == ["a", "b"]
    assert caption_candidates({"caption": "", "long_caption": "A long one."}) == ["A long one."]
    with pytest.raises(ValueError, match="share one size"):
        stack_images([torch.zeros(3, 8, 8), torch.zeros(3, 8, 9)])


def test_clip_forward_contract_and_gradients() -> None:
    clip = CLIP(CLIPConfig(**TOWERS))
    assert clip.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    batch = clip.make_collate()(samples())
    out = clip(batch)
    img, txt = clip.encode_image(batch["image"]), clip.encode_text(batch["text"])
    torch.testing.assert_close(out.loss, clip_loss(img, txt, 1 / 0.07), rtol=1e-4, atol=1e-5)
    assert set(out.losses) == {"clip_loss"} and out.metrics["logit_scale"] == pytest.approx(
        1 / 0.07, rel=1e-5
    )
    out.loss.backward()
    for name in (
        "logit_scale",
        "image.conv1.weight",
        "text.token_embedding.weight",
        "text_proj.weight",
    ):
        assert clip.get_parameter(name).grad is not None, name
    groups = clip.param_groups(0.1)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(clip.logit_scale) in no_decay and id(clip.image_proj.weight) not in no_decay


def test_bf16_autocast_forward_close_to_fp32() -> None:
    sig = SigLIP(SigLIPConfig(**TOWERS))
    batch = sig.make_collate()(samples())
    ref = sig(batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sig(batch)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(ref.item(), rel=5e-2)


def test_logit_scale_clamped_after_step() -> None:
    clip = CLIP(CLIPConfig(**TOWERS))
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)
    clip.after_optimizer_step(1, 10)
    assert clip.logit_scale.item() == pytest.approx(math.log(100.0))


def test_siglip_single_and_multi_positive() -> None:
    sig = SigLIP(SigLIPConfig(logit_bias_init="fixed", **TOWERS))  # b stays at -10
    assert sig.logit_scale.exp().item() == pytest.approx(10.0) and sig.logit_bias.item() == -10.0
    batch = sig.make_collate()(samples())
    out = sig(batch)
    ref = siglip_loss(sig.encode_image(batch["image"]), sig.encode_text(batch["text"]), 10.0, -10.0)
    torch.testing.assert_close(out.loss, ref, rtol=1e-4, atol=1e-4)
    assert out.metrics["logit_bias"] == -10.0 and set(out.losses) == {"siglip_loss"}

    multi = SigLIP(SigLIPConfig(num_captions=3, logit_bias_init="fixed", **TOWERS))
    batch = multi.make_collate()(samples())
    assert batch["texts"].shape == (4, 3, 16) and "text" not in batch
    assert len(set(map(tuple, batch["texts"][0].tolist()))) == 3  # 3 distinct captions available
    feats = multi.features(batch)
    assert feats["text"].shape == (4, 3, 24)
    out = multi.loss_from_features(feats)
    torch.testing.assert_close(
        out.loss, multi_positive_sigmoid_loss(feats["image"], feats["text"], 10.0, -10.0)
    )
    out.loss.backward()
    assert multi.logit_bias.grad is not None
    with pytest.raises(ValueError, match="needs batch\\['texts'\\]"):
        multi.features({"image": batch["image"], "text": batch["texts"][:, 0]})


def test_inference_hooks() -> None:
    clip = CLIP(CLIPConfig(**TOWERS)).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = clip.tokenize(["a red square", "a blue circle", "a star"])
    scores = clip.score(images, tokens)
    assert scores.shape == (2, 3)
    torch.testing.assert_close(scores, clip.encode_image(images) @ clip.encode_text(tokens).t())
    dense = clip.dense_features(images)
    assert dense.shape == (2, 24, 4, 4)
    out = clip.image(images)
    torch.testing.assert_close(dense[:, :, 1, 2], clip.image_proj(out.tokens[:, 1 * 4 + 2]))


def test_projection_init_from_pretrained() -> None:
    from finegrain.heads.projection import Projection

    proj = Projection(8, 4)
    w = torch.randn(4, 8)
    assert proj.init_from(w) and torch.equal(proj.weight, w)
    assert not proj.init_from(torch.randn(8, 4)) and not proj.init_from(None)
    torch.testing.assert_close(proj(torch.ones(2, 8)), torch.ones(2, 8) @ w.t())


def test_configs_registry_and_bad_input() -> None:
    cfg = from_dict(MethodConfig, {"name": "siglip", "num_captions": 2, "embed_dim": 24})
    assert isinstance(cfg, SigLIPConfig) and cfg.num_captions == 2
    assert isinstance(build_method(CLIPConfig(**TOWERS)), CLIP)
    with pytest.raises(ValueError, match="valid choices: .*clip.*siglip"):
        build_method(CLIPConfig(name="clipp"))
    with pytest.raises(ValueError, match="width \\(32\\) to equal embed_dim \\(24\\)"):
        CLIP(CLIPConfig(projection="none", **TOWERS))
    with pytest.raises(ValueError, match="valid choices: linear, none"):
        CLIP(CLIPConfig(projection="mlp", **TOWERS))
    with pytest.raises(ValueError, match="valid choices: ring, gather"):
        SigLIP(SigLIPConfig(exchange="all", **TOWERS))
    same = CLIP(CLIPConfig(projection="none", **{**TOWERS, "embed_dim": 32}))
    assert same.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 32)
